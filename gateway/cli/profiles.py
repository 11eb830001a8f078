"""``fhir-gateway profiles ...``: the tools of the people who own the profiles.

* ``check [PATH]``: schema, lint, golden examples (path-level diff on mismatch),
  unmapped-field coverage and JSON Schema freshness; exit 1 on any problem (CI);
* ``preview PROFILE INPUT.json``: the FHIR Bundle the gateway would produce with that
  profile file (deployed or a draft), with validation issues; writes nothing;
* ``schema [--out DIR]``: regenerate ``profiles/schema/*.schema.json``;
* ``remap MESSAGE_ID [--apply]``: re-map a stored message with the current profiles and
  show the FHIR diff; ``--apply`` stores the new versions and enqueues deliveries.

Problems print as ``<file>:<line>: <path>: <message> [<code>]``. Output may contain
values from the example files (synthetic) and, for ``remap``, from the stored message:
it goes to the terminal, never to the logs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import profiles_or_exit, settings_or_exit

app = typer.Typer(help="Mapping profiles: check, preview, schemas, re-map.", no_args_is_help=True)


def _default_dir() -> Path:
    return Path(settings_or_exit().profiles_dir)


def _problem_line(p: Any) -> str:
    return f"{p.location}: {p.message} [{p.code}]"


@app.command("check")
def check(
    path: Annotated[
        Path | None, typer.Argument(help="Profiles directory (default: GATEWAY_PROFILES_DIR)")
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Warnings (unmapped fields, lint warnings) fail too")
    ] = False,
    write_expected: Annotated[
        bool, typer.Option(help="Write missing golden files from the current output")
    ] = False,
    update_expected: Annotated[
        bool, typer.Option(help="Rewrite every golden file from the current output")
    ] = False,
) -> None:
    """Check every profile: schema, lint, examples, coverage. Exit 1 on any problem."""
    from gateway.secrets import SecretStore, unset_target_secrets
    from mappers.examples import run_examples
    from mappers.profiles import ProfileLoadError, load_profiles
    from mappers.profiles.schema import stale_schemas

    root = path or _default_dir()
    try:
        profiles = load_profiles(root)
    except ProfileLoadError as exc:
        for p in exc.problems:
            typer.secho(_problem_line(p), fg="red")
        typer.secho(f"FAILED: {len(exc.problems)} problem(s)", fg="red", bold=True)
        raise typer.Exit(1) from exc
    errors = 0
    warnings = len(profiles.warnings)
    for p in profiles.warnings:
        typer.secho(f"warning: {_problem_line(p)}", fg="yellow")
    # Where this runs, not in the files: shown and counted, but --strict does not fail on
    # it (CI that checks profiles need not hold the EHRs' secrets).
    unset = unset_target_secrets(profiles, SecretStore.from_settings(settings_or_exit()))
    for item in unset:
        typer.secho(f"warning: {item} [secret-unset]", fg="yellow")
    stale = stale_schemas(root / "schema") if (root / "schema").is_dir() else []
    for kind in stale:
        errors += 1
        typer.secho(
            f"schema/{kind}.schema.json: out of date (run `fhir-gateway profiles schema`)"
            " [stale-schema]",
            fg="red",
        )
    results = run_examples(
        profiles, write=write_expected or update_expected, overwrite=update_expected
    )
    for r in results:
        label = f"{r.profile} example {r.case}"
        if r.status in ("pass", "written"):
            typer.secho(f"ok   {label}{' (golden file written)' if r.status == 'written' else ''}")
        else:
            errors += 1
            typer.secho(f"FAIL {label}: {r.status}", fg="red")
            for line in r.diff:
                typer.echo(f"     {line}")
            for p in r.problems:
                typer.echo(f"     {_problem_line(p)}")
        for field in r.unmapped:
            warnings += 1
            typer.secho(
                f"warning: {label}: input field {field} is not mapped [unmapped-field]", fg="yellow"
            )
    kinds = {k: len(v) for k, v in profiles.by_kind.items()}
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items())
    typer.echo(
        f"{summary}, {len(profiles.concept_maps)} concept map(s), {len(results)} example(s): "
        f"{errors} error(s), {warnings + len(unset)} warning(s)"
    )
    if errors or (strict and warnings):
        raise typer.Exit(1)


@app.command("preview")
def preview_cmd(
    profile: Annotated[Path, typer.Argument(help="A profile file (deployed or a draft)")],
    input_file: Annotated[Path, typer.Argument(metavar="INPUT.json", help="The payload")],
    profiles_dir: Annotated[
        Path | None, typer.Option(help="The profiles the draft joins (default: the gateway's)")
    ] = None,
) -> None:
    """Print the FHIR Bundle the gateway would produce with PROFILE (issues on stderr; exit
    1 if any). An input that another profile maps (an intake naming another form version)
    is refused, never previewed with that profile."""
    from mappers.pipeline import preview
    from mappers.profiles import ProfileLoadError, load_profiles

    root = profiles_dir or _default_dir()
    if not profile.exists() and not profile.is_absolute() and (root / profile).is_file():
        profile = root / profile  # `intake/my-form.yaml`: a path inside the profiles directory
    try:
        raw = profile.read_bytes()
    except OSError as exc:
        typer.secho(
            f"{profile}: not readable here or under {root} ({exc.strerror})", fg="red", err=True
        )
        raise typer.Exit(2) from exc
    try:
        rel = profile.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        import yaml

        kind = (yaml.safe_load(raw) or {}).get("kind", "intake")
        rel = f"{kind}/{profile.stem}.yaml"
    try:
        profiles = load_profiles(root, drafts={rel: raw})
    except ProfileLoadError as exc:
        for p in exc.problems:
            typer.secho(_problem_line(p), fg="red", err=True)
        raise typer.Exit(1) from exc
    try:
        data = json.loads(input_file.read_text())
    except (OSError, ValueError) as exc:
        typer.secho(f"{input_file}: not readable JSON ({exc})", fg="red", err=True)
        raise typer.Exit(2) from exc
    from gateway.db.types import utcnow

    settings = settings_or_exit()
    from mappers.identifiers import IdentifierSystems

    result = preview(
        data,
        profiles,
        recorded=utcnow(),
        organization=settings.organization_name,
        systems=IdentifierSystems(settings.identifier_base),
        profile_key=profiles.key_of_file(rel),
    )
    if any(p.code == "other_profile" for p in result.problems):
        for p in result.problems:
            typer.secho(f"{profile}: {p.message}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(result.bundle(), indent=2, ensure_ascii=False))
    for p in result.problems:
        typer.secho(_problem_line(p), fg="red", err=True)
    if result.problems:
        raise typer.Exit(1)


@app.command("schema")
def schema_cmd(
    out: Annotated[
        Path | None, typer.Option(help="Directory (default: <profiles dir>/schema)")
    ] = None,
) -> None:
    """Write the JSON Schema of every profile kind."""
    from mappers.profiles.schema import write_schemas

    for path in write_schemas(out or _default_dir() / "schema"):
        typer.echo(f"wrote {path}")


@app.command("remap")
def remap(
    message_id: Annotated[str, typer.Argument(help="The inbound message id")],
    apply: Annotated[
        bool, typer.Option("--apply", help="Store the re-mapped versions and deliver them")
    ] = False,
) -> None:
    """Re-map a stored intake or checkout with the current profiles and show the FHIR diff
    against what is stored (what a resend would send). Nothing changes without --apply."""
    from gateway.errors import GatewayError
    from gateway.ingest.remap import remap_message
    from gateway.ingest.storage import IngestContext
    from gateway.runtime import Runtime

    settings = settings_or_exit()
    profiles = profiles_or_exit(settings)

    async def main() -> Any:
        runtime = Runtime.create(settings, profiles=profiles)
        try:
            async with runtime.sessionmaker() as session:
                result = await remap_message(
                    session,
                    IngestContext.of(runtime),
                    message_id,
                    apply=apply,
                    actor="cli:profiles-remap",
                )
                await session.commit()
                return result
        finally:
            await runtime.close()

    try:
        result = asyncio.run(main())
    except GatewayError as exc:
        typer.secho(f"{exc.detail}", fg="red", err=True)
        for p in exc.problems or []:
            typer.secho(f"  {_problem_line(p)}", fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"message {result.message_id} ({result.channel}) re-mapped with {result.profile}")
    if not result.diff:
        typer.echo("no difference: the stored resources are what the current profile produces")
        return
    for line in result.diff:
        typer.echo(f"  {line}")
    if result.applied and result.stored is not None:
        deliveries = result.stored.get("deliveries", [])
        typer.echo(
            f"applied: {len(result.stored.get('resources', []))} resource version(s) stored, "
            f"{len(deliveries)} delivery(ies) enqueued"
        )
    else:
        typer.echo(f"{len(result.diff)} difference(s); run again with --apply to store and deliver")
