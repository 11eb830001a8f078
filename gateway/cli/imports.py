"""``fhir-gateway import FILE... [--source NAME] [--notify] [--csv-profile NAME] [--workers N]``: bulk
backfill of history through the live channels (:mod:`gateway.imports.service`), with a
progress bar (rich: bytes read, records per second, ETA) and a summary.

Running the same files again resumes an unfinished job at each file's cursor, or (for a
finished one) starts a new job whose records all come back ``duplicate``: nothing is
written twice. Output carries counts and ids, never record content; refused records (the
only place content goes) are written to ``--refusals FILE`` as NDJSON when asked.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import fail, profiles_or_exit, settings_or_exit


def import_cmd(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="NDJSON (intake submissions, canonical checkouts, Stripe events, or the "
            "Patient, QuestionnaireResponse and MedicationRequest files of a FHIR Bulk Data "
            "export: Patient files are imported first) or CSV",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    source: Annotated[
        str, typer.Option(help="The legacy system the records come from (in the Provenance)")
    ] = "legacy",
    notify: Annotated[
        bool,
        typer.Option(
            "--notify/--no-notify",
            help="Send the ops webhooks of the historical case changes (default: recorded, "
            "not sent)",
        ),
    ] = False,
    csv_profile: Annotated[
        str | None, typer.Option(help="CSV import profile (profiles/imports/NAME.yaml)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=5000, help="Records per commit")] = 200,
    refusals: Annotated[
        Path | None, typer.Option(help="Write the refused records with their problems here")
    ] = None,
    new_job: Annotated[
        bool, typer.Option("--new-job", help="Do not resume an unfinished job of these files")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Processes importing side by side, each NDJSON file cut in as many parts "
            "(PostgreSQL only; about one per core)",
        ),
    ] = 1,
) -> None:
    """Import history through the same profiles, matching and outbox as live traffic."""
    from gateway.logging import configure_logging

    settings = settings_or_exit()
    configure_logging(settings.log_level, json=settings.log_json)
    if workers > 1 and not settings.database_url.startswith("postgresql"):
        raise fail("--workers needs PostgreSQL: SQLite has one writing process")
    profiles = profiles_or_exit(settings)
    result = asyncio.run(
        _run(
            settings,
            profiles,
            files,
            source=source,
            notify=notify,
            csv_profile=csv_profile,
            batch_size=batch_size,
            refusals_path=refusals,
            new_job=new_job,
            show_progress=progress,
            workers=workers,
        )
    )
    typer.echo(json.dumps(result, sort_keys=True))


async def _run(
    settings: Any,
    profiles: Any,
    files: list[Path],
    *,
    source: str,
    notify: bool,
    csv_profile: str | None,
    batch_size: int,
    refusals_path: Path | None,
    new_job: bool,
    show_progress: bool,
    workers: int = 1,
) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from gateway.clients.actor import acting_as, cli_actor
    from gateway.db.models import ImportFile
    from gateway.imports import repository as repo
    from gateway.imports.parallel import run_parallel
    from gateway.imports.readers import file_sha256
    from gateway.imports.service import (
        ImportFileError,
        ImportSource,
        ImportTakenOver,
        create_job,
        csv_profile_or_raise,
        find_resumable,
        run_job,
    )
    from gateway.runtime import Runtime

    runtime = Runtime.create(settings, profiles=profiles)
    try:
        with acting_as(cli_actor()) as actor:
            try:
                csv_profile_or_raise(runtime, csv_profile)
            except ImportFileError as exc:
                raise fail(str(exc)) from exc
            # each file read once per run, before any database transaction is open
            digests = {p: file_sha256(p) for p in files}
            sources = [ImportSource(name=str(p), path=p, sha256=digests[p]) for p in files]
            async with runtime.write_session() as session:
                job = None
                if not new_job:
                    job = await find_resumable(session, list(digests.values()))
                if job is None:
                    job = await create_job(
                        session,
                        source=source,
                        notify=notify,
                        actor=actor.name,
                        csv_profile=csv_profile,
                        files=sources,
                        parts=workers,
                    )
                    typer.echo(f"import job {job.id}", err=True)
                else:
                    typer.echo(f"resuming import job {job.id}", err=True)
                    # the job's files by content: the same files under another path
                    # (another working directory) resume it too
                    by_digest = {digest: path for path, digest in digests.items()}
                    sources = [
                        ImportSource(name=name, path=by_digest[sha], sha256=sha)
                        for name, sha in {
                            (f.name, f.sha256) for f in await repo.job_files(session, job.id)
                        }
                    ]
                job_id, read_at_start = job.id, job.read
                await session.commit()
                done = {
                    f.id: f.cursor - f.start_offset for f in await repo.job_files(session, job_id)
                }
            total = sum(p.stat().st_size for p in files)
            with Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[records]} records"),
                TextColumn("{task.fields[rate]:.0f}/s"),
                TextColumn("refused {task.fields[refused]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                disable=not show_progress,
                transient=False,
            ) as bar:
                task = bar.add_task(
                    "import", total=total, records=0, rate=0.0, refused=0, completed=0
                )
                start = asyncio.get_running_loop().time()
                offsets = dict(done)
                bar.update(task, completed=sum(offsets.values()))

                def on_tick(done_bytes: int, counts: dict[str, int]) -> None:
                    elapsed = max(1e-6, asyncio.get_running_loop().time() - start)
                    bar.update(
                        task,
                        completed=done_bytes,
                        records=counts["read"],
                        refused=counts["refused"],
                        rate=(counts["read"] - read_at_start) / elapsed,
                    )

                def on_progress(row: ImportFile, counts: dict[str, int]) -> None:
                    offsets[row.id] = row.cursor - row.start_offset
                    on_tick(sum(offsets.values()), counts)

                try:
                    if workers > 1:
                        counts = await run_parallel(
                            runtime,
                            job_id,
                            sources,
                            workers=workers,
                            batch_size=batch_size,
                            actor=actor,
                            on_tick=on_tick,
                        )
                    else:
                        counts = await run_job(
                            runtime, job_id, sources, batch_size=batch_size, on_progress=on_progress
                        )
                except ImportFileError as exc:
                    raise fail(str(exc), code=1) from exc
                except ImportTakenOver as exc:
                    raise fail(
                        f"import job {job_id} was taken over by another run (a second "
                        "import of the same files, or the API); this one stopped",
                        code=1,
                    ) from exc
            if refusals_path is not None:
                await _write_refusals(runtime, job_id, refusals_path)
            return {"job_id": job_id, **counts}
    finally:
        await runtime.close()


async def _write_refusals(runtime: Any, job_id: str, path: Path) -> None:
    from gateway.imports import repository as repo
    from gateway.imports.schemas import refusal_line

    after = 0
    with path.open("w", encoding="utf-8") as out:
        while True:
            async with runtime.sessionmaker() as session:
                page = await repo.refusals(session, job_id, after_id=after)
            if not page:
                return
            for row in page:
                out.write(refusal_line(row) + "\n")
            after = page[-1].id
