"""``fhir-gateway reconcile TARGET [--since ISO] [--format csv|ndjson] [--out FILE]
[--requeue]``: what the gateway holds against what the EHR target holds, by business
identifier (:mod:`gateway.ops.reconcile`).

The mismatches go to ``--out`` (or stdout) as CSV or NDJSON; the summary goes to stderr
as one JSON line. ``--requeue`` queues the missing and different resources for
redelivery (the worker sends them). Exit 0 when the two sides agree, 1 when there are
mismatches, 2 on a configuration error.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import fail, profiles_or_exit, settings_or_exit


def reconcile_cmd(
    target: Annotated[str, typer.Argument(help="EHR target name (profiles/ehr)")],
    since: Annotated[
        datetime | None,
        typer.Option(help="Only what changed since (ISO 8601, UTC if no offset)"),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv or ndjson")] = "csv",
    out: Annotated[Path | None, typer.Option(help="Write the mismatches here")] = None,
    requeue: Annotated[
        bool, typer.Option("--requeue", help="Queue the mismatches for redelivery")
    ] = False,
) -> None:
    """Compare the gateway with an EHR target: missing, different, EHR only."""
    from gateway.logging import configure_logging

    if fmt not in ("csv", "ndjson"):
        raise fail("--format is csv or ndjson")
    settings = settings_or_exit()
    configure_logging(settings.log_level, json=settings.log_json)
    profiles = profiles_or_exit(settings)
    profile = profiles.ehr.get(target)
    if profile is None:
        raise fail(f"no EHR target {target!r} in {settings.profiles_dir}/ehr")
    if since is not None and since.tzinfo is None:
        from datetime import UTC

        since = since.replace(tzinfo=UTC)
    summary, text = asyncio.run(_run(settings, profiles, target, since, fmt, requeue))
    if out is not None:
        out.write_text(text, encoding="utf-8")
    else:
        typer.echo(text, nl=False)
    typer.echo(json.dumps(summary, sort_keys=True), err=True)
    if summary["mismatches"]:
        raise typer.Exit(1)


async def _run(
    settings: Any, profiles: Any, name: str, since: datetime | None, fmt: str, requeue: bool
) -> tuple[dict[str, Any], str]:
    from gateway.clients.actor import acting_as, cli_actor
    from gateway.db.types import utcnow
    from gateway.db.uow import unit_of_work
    from gateway.ehr.errors import EhrError
    from gateway.ops import reconcile as rec
    from gateway.runtime import Runtime
    from gateway.worker import ehr_clients

    runtime = Runtime.create(settings, profiles=profiles)
    clients = ehr_clients(runtime)
    target = profiles.ehr[name]
    try:
        with acting_as(cli_actor()):
            try:
                async with runtime.sessionmaker() as session:
                    report = await rec.reconcile(
                        session,
                        clients.client_for(target),
                        target,
                        profiles,
                        provenance_tag_system=runtime.systems.provenance,
                        since=since,
                    )
            except EhrError as exc:
                raise fail(f"the EHR search failed: {exc}", code=1) from exc
            summary = report.summary()
            if requeue:
                async with unit_of_work(runtime.write_session) as session:
                    rows = await rec.requeue(session, target, report.items, now=utcnow())
                    job_id = await rec.create_job(session, target=name, since=since)
                    await rec.finish_job(session, job_id, report=report)
                summary["requeued"] = len(rows)
            text = rec.to_csv(report) if fmt == "csv" else rec.to_ndjson(report)
            return summary, text
    finally:
        await clients.aclose()
        await runtime.close()
