"""``fhir-gateway clients create|list|revoke|scopes``: API clients (keys and scopes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from sqlalchemy.exc import IntegrityError

from gateway.cli.common import Database, fail, run_on_database

app = typer.Typer(help="API clients (keys and scopes).", no_args_is_help=True)


def _words(items: list[str]) -> list[str]:
    """``--scope a,b --scope c`` -> ``[a, b, c]``."""
    return [s for item in items for s in item.replace(",", " ").split()]


@app.command("create")
def clients_create(
    name: Annotated[str, typer.Argument(help="A unique client name, e.g. intake-app")],
    scope: Annotated[
        list[str], typer.Option("--scope", "-s", help="Scope (repeat); see `clients scopes`")
    ],
    event_source: Annotated[
        list[str] | None,
        typer.Option(
            "--event-source",
            help="Sender this client may send clinical events as (repeat), e.g. ehr, pharmacy; "
            "without it, any sender",
        ),
    ] = None,
    partner: Annotated[
        list[str] | None,
        typer.Option(
            "--partner",
            help="Partner profile this client may send HL7 v2 messages as (repeat); "
            "without it, any partner",
        ),
    ] = None,
    program: Annotated[
        list[str] | None,
        typer.Option(
            "--program",
            help="Program whose cases, resources and messages this client sees (repeat); "
            "without it, all",
        ),
    ] = None,
    jwks_url: Annotated[
        str | None,
        typer.Option(
            "--jwks-url",
            help="SMART Backend Services: the URL of the client's public keys (JWKS); it "
            "may then get tokens at POST /oauth/token with a private_key_jwt assertion "
            "(iss = sub = the client name)",
        ),
    ] = None,
    jwks: Annotated[
        Path | None,
        typer.Option(
            "--jwks",
            help="SMART Backend Services: a file with the client's public keys (a JWK Set)",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Create an API client and print its key once (only a hash is stored).

    With --jwks-url or --jwks it is also a SMART Backend Services client: it may get tokens at POST /oauth/token."""
    from gateway.audit import service as audit
    from gateway.clients.service import ClientLimitError, UnknownScopeError, create_client
    from gateway.oauth.server import validate_jwks

    if jwks_url is not None and jwks is not None:
        raise fail("give --jwks-url or --jwks, not both")
    key_set = None
    if jwks is not None:
        try:
            key_set = validate_jwks(json.loads(jwks.read_text()))
        except (ValueError, OSError) as exc:
            raise fail(f"--jwks: {exc}") from exc
    if jwks_url is not None and urlsplit(jwks_url).scheme not in ("https", "http"):
        raise fail("--jwks-url must be an https URL")
    scopes = _words(scope)
    sources = _words(event_source) if event_source else None
    partners = _words(partner) if partner else None
    programs = _words(program) if program else None

    async def work(db: Database) -> str:
        async with db.session() as session:
            client, key = await create_client(
                session,
                name=name,
                scopes=scopes,
                event_sources=sources,
                partners=partners,
                programs=programs,
                jwks=key_set,
                jwks_url=jwks_url,
            )
            audit.record(
                session,
                action="create",
                entity_type="ApiClient",
                entity_id=str(client.id),
                detail={"name": name, "scopes": " ".join(sorted(set(scopes)))},
            )
            await session.commit()
            return key

    try:
        key = run_on_database(work)
    except (UnknownScopeError, ClientLimitError) as exc:
        raise fail(str(exc)) from exc
    except IntegrityError as exc:
        raise fail(f"a client named {name!r} already exists") from exc
    typer.echo(f"client {name!r} created with scopes: {' '.join(sorted(set(scopes)))}", err=True)
    if "events:write" in scopes:
        typer.echo(
            f"it may send events as: {', '.join(sorted(set(sources)))}"
            if sources
            else "it may send events as any sender (restrict it with --event-source)",
            err=True,
        )
    if "hl7:write" in scopes:
        typer.echo(
            f"it may send HL7 v2 as: {', '.join(sorted(set(partners)))}"
            if partners
            else "it may send HL7 v2 as any partner (restrict it with --partner)",
            err=True,
        )
    if programs:
        typer.echo(f"it sees only the programs: {', '.join(sorted(set(programs)))}", err=True)
    typer.echo("API key (shown once; store it now):", err=True)
    typer.echo(key)


@app.command("list")
def clients_list() -> None:
    """List clients: name, state, scopes, limits and when the key was last used (UTC, to
    the minute); keys are never shown."""
    from sqlalchemy import select

    from gateway.db.models import ApiClient

    async def work(db: Database) -> list[ApiClient]:
        async with db.session() as session:
            return list((await session.scalars(select(ApiClient).order_by(ApiClient.name))).all())

    for c in run_on_database(work):
        state = "revoked" if c.revoked_at else "active"
        limits = [
            f"{what}={','.join(values)}"
            for what, values in (
                ("event-source", c.event_sources),
                ("partner", c.partners),
                ("program", c.programs),
            )
            if values is not None
        ]
        # When the key was last used (kept to the minute: gateway.clients.service).
        used = c.last_used_at.strftime("%Y-%m-%dT%H:%MZ") if c.last_used_at else "never"
        typer.echo("\t".join([c.name, state, " ".join(c.scopes), *limits, f"last-used={used}"]))


@app.command("revoke")
def clients_revoke(name: Annotated[str, typer.Argument()]) -> None:
    """Revoke a client's key."""
    from gateway.audit import service as audit
    from gateway.clients.service import revoke_client

    async def work(db: Database) -> bool:
        async with db.session() as session:
            ok = await revoke_client(session, name=name)
            if ok:
                audit.record(session, action="revoke", entity_type="ApiClient", entity_id=name)
            await session.commit()
            return ok

    if not run_on_database(work):
        raise fail(f"no client named {name!r}", code=1)
    typer.echo(f"client {name!r} revoked")


@app.command("scopes")
def clients_scopes() -> None:
    """List the scopes routes check."""
    from gateway.clients.service import SCOPES

    for scope, what in SCOPES.items():
        typer.echo(f"{scope:16} {what}")
