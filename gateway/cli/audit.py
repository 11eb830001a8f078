"""``fhir-gateway audit verify|export|purge|seal``: the audit trail for auditors and
operators (see :mod:`gateway.audit.chain` for the hash chain).

Each command first chains the entries the worker has not chained yet (as the worker
would), so what it checks or exports is the whole trail up to now.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import Database, fail, run_on_database, settings_or_exit

app = typer.Typer(
    help="The audit trail: verify its hash chain, export, retention.", no_args_is_help=True
)


async def _seal_all(db: Database) -> int:
    from gateway.audit.chain import seal

    total = 0
    while True:
        async with db.session() as session:
            sealed = await seal(session)
            await session.commit()
        total += sealed
        if sealed == 0:
            return total


@app.command("verify")
def verify_cmd(
    seal_first: Annotated[
        bool, typer.Option("--seal/--no-seal", help="Chain pending entries first")
    ] = True,
) -> None:
    """Check the hash chain from its anchor to its head. Exit 0 when it holds, 1 with
    each problem (changed, missing or inserted entries) otherwise. Prints the head's
    seq and hash: keep them elsewhere to detect a rewritten chain later."""
    from gateway.audit.chain import Verification, verify

    async def work(db: Database) -> tuple[int, Verification]:
        sealed = await _seal_all(db) if seal_first else 0
        async with db.session() as session:
            return sealed, await verify(session)

    sealed, result = run_on_database(work)
    typer.echo(
        f"checked {result.checked} entries (seq {result.anchor_seq + 1}..{result.head_seq}), "
        f"chained {sealed} now, {result.unsealed} not chained yet"
    )
    typer.echo(f"head seq={result.head_seq} hash={result.head_hash}")
    if result.ok:
        typer.echo("audit chain OK")
        return
    for problem in result.problems[:100]:
        typer.secho(
            f"seq {problem['seq']} (id {problem['id']}): {problem['problem']}", fg="red", err=True
        )
    typer.secho(f"audit chain BROKEN: {len(result.problems)} problem(s)", fg="red", err=True)
    raise typer.Exit(1)


@app.command("export")
def export_cmd(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="NDJSON file (created 0600); default stdout"),
    ] = None,
    patient: Annotated[str | None, typer.Option(help="Patient/<id> or <id>")] = None,
    agent: Annotated[
        str | None, typer.Option(help="Agent name (API client, cli:<user>, worker)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Recorded at or after (ISO 8601 date or time)")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Recorded before (ISO 8601 date or time)")
    ] = None,
    action: Annotated[str | None, typer.Option(help="C, R, U, D or E (comma for any)")] = None,
) -> None:
    """Export audit entries as FHIR R4 AuditEvents (IHE BALP), one JSON object per line
    (NDJSON, as FHIR Bulk Data), oldest first, each with its place in the hash chain."""
    from gateway.audit import fhir as audit_fhir
    from gateway.audit import service as audit

    settings = settings_or_exit()
    dates = ([f"ge{since}"] if since else []) + ([f"lt{until}"] if until else [])
    try:
        query = audit_fhir.parse_query(
            patient=patient, agent=agent, dates=dates, action=action, count=None, offset=None
        )
    except audit_fhir.AuditSearchError as exc:
        raise fail(str(exc)) from exc
    if output is not None:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        sink: Any = os.fdopen(fd, "w", encoding="utf-8")
    else:
        sink = sys.stdout

    async def work(db: Database) -> int:
        await _seal_all(db)
        written = 0
        async with db.session() as session:
            async for row in audit_fhir.export(session, query):
                event = audit_fhir.to_audit_event(
                    row, identifier_base=settings.identifier_base, observer=settings.public_base_url
                )
                sink.write(json.dumps(event, separators=(",", ":")) + "\n")
                written += 1
        async with db.session() as session:
            audit.record(
                session,
                action="export",
                entity_type="AuditEvent",
                entity_id="*",
                patient_id=query.patient,
                detail={"entries": written},
            )
            await session.commit()
        return written

    try:
        written = run_on_database(work, settings)
    finally:
        if output is not None:
            sink.close()
    typer.echo(f"exported {written} AuditEvents", err=True)


@app.command("purge")
def purge_cmd(
    before: Annotated[
        str | None,
        typer.Option(
            help="Delete entries recorded before this ISO 8601 time (default: now - GATEWAY_AUDIT_RETENTION)"
        ),
    ] = None,
) -> None:
    """Delete chained entries past the retention period; the chain's anchor moves to the
    last one deleted, so `audit verify` still holds. The worker does this hourly."""
    from gateway.audit.chain import purge
    from gateway.db.types import utcnow

    settings = settings_or_exit()
    if before is not None:
        try:
            cutoff = datetime.fromisoformat(before.replace("Z", "+00:00"))
        except ValueError as exc:
            raise fail("--before must be an ISO 8601 time with its offset") from exc
        if cutoff.tzinfo is None:
            raise fail("--before must be an ISO 8601 time with its offset")
    else:
        cutoff = utcnow() - settings.audit_retention

    async def work(db: Database) -> int:
        await _seal_all(db)
        async with db.session() as session:
            deleted = await purge(session, before=cutoff)
            await session.commit()
            return deleted

    typer.echo(
        f"deleted {run_on_database(work, settings)} audit entries recorded before {cutoff.isoformat()}"
    )


@app.command("seal")
def seal_cmd() -> None:
    """Chain every entry not chained yet (what the worker's audit-seal loop does)."""

    typer.echo(f"chained {run_on_database(_seal_all)} audit entries")
