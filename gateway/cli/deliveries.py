"""``fhir-gateway deliveries list|show|replay``: dead letters from the command line.

Settings come from ``GATEWAY_*`` environment variables (and ``.env``), as for the service
(:mod:`gateway.cli.common`).
Output carries ids, statuses and errors, never resources.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from gateway.cli.common import Database, profiles_or_exit, run_on_database, settings_or_exit

app = typer.Typer(help="Deliveries: list dead letters, show one, replay.", no_args_is_help=True)

STATUSES = ("dead", "review", "pending", "in_flight", "delivered")


def _filter(statuses: list[str], kind: str | None, target: str | None, reason: str | None) -> Any:
    from gateway.db.models import DeliveryStatus
    from gateway.delivery.ops_repository import DeliveryFilter

    unknown = [s for s in statuses if s not in STATUSES]
    if unknown:
        typer.secho(f"unknown status {unknown[0]!r}; one of {', '.join(STATUSES)}", err=True)
        raise typer.Exit(2)
    return DeliveryFilter(
        statuses=tuple(DeliveryStatus(s) for s in statuses),
        kind=kind,
        target=target,
        reason=reason,
    )


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


@app.command("list")
def list_cmd(
    status: Annotated[
        list[str],
        typer.Option("--status", "-s", help="dead, review, pending, in_flight, delivered"),
    ] = ["dead"],  # noqa: B006 - typer option default
    target: Annotated[str | None, typer.Option(help="Target name")] = None,
    kind: Annotated[str | None, typer.Option(help="ehr or webhook")] = None,
    reason: Annotated[str | None, typer.Option(help="rejected, max_attempts, max_age...")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
) -> None:
    """List deliveries (dead letters by default), oldest first."""
    from gateway.delivery import ops_repository as repo
    from gateway.ehr.client import outcome_summary

    where = _filter(status, kind, target, reason)

    async def work(db: Database) -> tuple[list[Any], int]:
        async with db.session() as session:
            rows = await repo.list_deliveries(session, where=where, limit=limit)
            total = await repo.count_deliveries(session, where=where)
            return rows, total

    rows, total = run_on_database(work)
    if as_json:
        from gateway.ops.deliveries import delivery_out

        for row in rows:
            typer.echo(delivery_out(row).model_dump_json())
        return
    typer.echo(f"{total} deliveries match; showing {len(rows)}", err=True)
    for d in rows:
        typer.echo(
            "\t".join(
                [
                    str(d.id),
                    d.kind,
                    d.target,
                    d.status,
                    d.dead_reason or "-",
                    f"attempts={d.attempts}",
                    f"status={d.last_status_code or '-'}",
                    _when(d.last_attempt_at),
                    outcome_summary(d.operation_outcome)
                    if d.operation_outcome
                    else (d.last_error or "-")[:120],
                ]
            )
        )


@app.command("show")
def show_cmd(delivery_id: Annotated[int, typer.Argument(help="Delivery id")]) -> None:
    """Show one delivery with its attempts and OperationOutcome (JSON).

    attempts counts toward the target's max_attempts since the delivery was created or
    last replayed; tries and attempt_log are every try ever made."""
    from gateway.delivery import ops_repository as repo
    from gateway.ops.deliveries import delivery_detail

    async def work(db: Database) -> dict[str, Any] | None:
        async with db.session() as session:
            row = await repo.get_delivery(session, delivery_id)
            if row is None:
                return None
            attempts = list(await repo.attempts_of(session, delivery_id))
            return delivery_detail(row, attempts).model_dump(mode="json")

    body = run_on_database(work)
    if body is None:
        typer.secho(f"no delivery {delivery_id}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(body, indent=2))


@app.command("replay")
def replay_cmd(
    ids: Annotated[list[int] | None, typer.Argument(help="Delivery ids (or use filters)")] = None,
    status: Annotated[list[str], typer.Option("--status", "-s", help="dead or review")] = ["dead"],  # noqa: B006 - typer option default
    target: Annotated[str | None, typer.Option(help="Only this target")] = None,
    kind: Annotated[str | None, typer.Option(help="ehr or webhook")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this dead reason")] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Replay every match of --status without other filters")
    ] = False,
    batch: Annotated[int, typer.Option(min=1, max=1000, help="Rows per transaction")] = 200,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, change nothing")] = False,
) -> None:
    """Put dead (or review) deliveries back in the queue, by id or in bulk by filter.

    Safe: every write is idempotent. Bulk replays run in batches with a progress bar, each
    batch its own transaction; every replayed row is in the audit log (actor ``cli``).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from gateway.db.types import utcnow
    from gateway.delivery import ops_repository as repo
    from gateway.delivery.service import replay_deliveries

    settings = settings_or_exit()
    profiles = profiles_or_exit(settings)  # a replay decides again what EHR deliveries send
    if any(s not in ("dead", "review") for s in status):
        typer.secho("only dead or review deliveries can be replayed", fg="red", err=True)
        raise typer.Exit(2)
    if ids:
        if dry_run:
            typer.echo(f"would replay up to {len(ids)} deliveries")
            return

        async def by_id(db: Database) -> tuple[list[int], dict[int, str | None]]:
            async with db.session() as session:
                result = await replay_deliveries(
                    session, actor="cli", now=utcnow(), profiles=profiles, ids=ids
                )
                await session.commit()
                left = sorted(set(ids) - set(result.replayed))
                states: dict[int, str | None] = {}
                for delivery_id in left:
                    row = await repo.get_delivery(session, delivery_id)
                    states[delivery_id] = str(row.status) if row is not None else None
                return result.replayed, states

        replayed, left_alone = run_on_database(by_id, settings)
        if replayed:
            typer.echo(
                f"replayed {len(replayed)} {'delivery' if len(replayed) == 1 else 'deliveries'}: "
                + " ".join(map(str, replayed))
            )
        else:
            typer.echo("replayed nothing")
        for delivery_id, state in left_alone.items():
            why = "no such delivery" if state is None else f"it is {state}"
            typer.echo(
                f"delivery {delivery_id} left alone: {why} (only dead or review deliveries "
                "are replayed)",
                err=True,
            )
        if not replayed:
            raise typer.Exit(1)
        return
    if not (target or kind or reason or all_):
        typer.secho(
            "give delivery ids, a filter (--target, --kind, --reason) or --all", fg="red", err=True
        )
        raise typer.Exit(2)
    where = _filter(status, kind, target, reason)

    async def count(db: Database) -> int:
        async with db.session() as session:
            return await repo.count_deliveries(session, where=where)

    total = run_on_database(count, settings)
    if total == 0 or dry_run:
        typer.echo(
            f"{total} deliveries match" + ("; nothing replayed (dry run)" if dry_run else "")
        )
        return
    if not yes:
        typer.confirm(f"replay {total} deliveries?", abort=True)

    async def bulk(db: Database) -> int:
        done = 0
        after_id: int | None = None
        with Progress(
            TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), transient=False
        ) as progress:
            task = progress.add_task("replay", total=total)
            while True:
                async with db.session() as session:
                    result = await replay_deliveries(
                        session,
                        actor="cli",
                        now=utcnow(),
                        profiles=profiles,
                        where=where,
                        limit=batch,
                        after_id=after_id,
                    )
                    await session.commit()
                if result.matched == 0:
                    break
                done += len(result.replayed)
                progress.update(task, advance=result.matched)
                after_id = result.last_matched_id
                if result.matched < batch:
                    break
        return done

    count_replayed = run_on_database(bulk, settings)
    typer.echo(f"replayed {count_replayed} of {total} deliveries")
