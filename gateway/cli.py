"""``fhir-gateway`` command line (typer).

Commands: ``serve``, ``worker``, ``db upgrade``, ``clients create|list|revoke``, ``demo``,
``deliveries list|show|replay``, ``keys rotate|list|jwks|prune``.
Settings come from ``GATEWAY_*`` environment variables (and ``.env``), as for the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import time
import uuid
from typing import Annotated, Any

import typer

from gateway.delivery.cli import app as deliveries_app
from gateway.hl7.cli import mllp as mllp_command
from gateway.oauth.cli import app as keys_app
from gateway.profiles.cli import app as profiles_app
from gateway.settings import BUNDLED_PROFILES_DIR, Settings, load_settings

app = typer.Typer(
    help="fhir-gateway: FHIR R4 interoperability gateway for telehealth.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
clients_app = typer.Typer(help="API clients (keys and scopes).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(clients_app, name="clients")
app.command("mllp")(mllp_command)
app.add_typer(profiles_app, name="profiles")
app.add_typer(deliveries_app, name="deliveries")
app.add_typer(keys_app, name="keys")

EXAMPLES_DIR = BUNDLED_PROFILES_DIR.parent / "examples"


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic ValidationError: show which setting, not a traceback
        typer.secho(f"configuration error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


def _load_profiles_or_exit(settings: Settings) -> None:
    from mappers.profiles import ProfileLoadError, load_profiles

    try:
        load_profiles(settings.profiles_dir)
    except ProfileLoadError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from exc


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision")] = "head") -> None:
    """Apply the database migrations (idempotent)."""
    from gateway.db.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url, revision)
    typer.echo(f"database at revision {revision} ({settings.database_url.split('://', 1)[0]})")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (GATEWAY_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (GATEWAY_PORT)")] = None,
    worker: Annotated[
        bool | None, typer.Option("--worker/--no-worker", help="Run the delivery worker in-process")
    ] = None,
    migrate: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Apply migrations first")
    ] = True,
    workers: Annotated[
        int,
        typer.Option(min=1, max=64, help="Server processes (PostgreSQL only; each runs a worker)"),
    ] = 1,
) -> None:
    """Run the HTTP API (and, by default, the delivery worker) in one process, or in
    ``--workers N`` processes sharing one PostgreSQL database."""
    import os

    import uvicorn

    from gateway.app import create_app
    from gateway.db.migrate import upgrade

    settings = _settings(host=host, port=port, run_worker=worker)
    _load_profiles_or_exit(settings)
    if workers > 1 and settings.is_sqlite:
        typer.secho(
            "--workers > 1 needs PostgreSQL: SQLite takes one writing process "
            "(set GATEWAY_DATABASE_URL=postgresql+psycopg://...)",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    if migrate:
        upgrade(settings.database_url)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,
        "proxy_headers": False,
        "ws": "none",
    }
    if workers == 1:
        uvicorn.run(create_app(settings, server_process=True), **common)
        return
    # Each process builds its app from the environment: pass the command-line choices on.
    os.environ["GATEWAY_RUN_WORKER"] = "true" if settings.run_worker else "false"
    uvicorn.run("gateway.app:create_app_from_env", factory=True, workers=workers, **common)


@app.command("worker")
def worker_cmd(
    concurrency: Annotated[
        int, typer.Option(min=1, max=256, help="Deliveries in flight at once")
    ] = 4,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve this worker's Prometheus metrics on 127.0.0.1:PORT"),
    ] = None,
) -> None:
    """Run the worker alone (scale out: several on one PostgreSQL): deliveries to EHRs and
    ops webhooks, stored events left to apply, workflow timers.

    SIGTERM/SIGINT: stop claiming and let the work in hand finish. SIGHUP: reload the
    profiles (a profile with problems is refused and the running set kept).
    """
    from gateway.logging import configure_logging
    from gateway.profiles.service import install_sighup_reload
    from gateway.runtime import Runtime
    from gateway.worker import build_worker

    settings = _settings()
    _load_profiles_or_exit(settings)
    configure_logging(settings.log_level, json=settings.log_json)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from gateway.metrics import REGISTRY

        start_http_server(metrics_port, addr="127.0.0.1", registry=REGISTRY)

    async def main() -> None:
        runtime = Runtime.create(settings)
        install_sighup_reload(runtime)
        worker = build_worker(runtime, concurrency=concurrency)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await worker.run(stop)
        finally:
            await worker.aclose()
            await runtime.close()

    asyncio.run(main())


@clients_app.command("create")
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
) -> None:
    """Create an API client and print its key once (only a hash is stored)."""
    from gateway.clients.service import UnknownScopeError, create_client
    from gateway.db.engine import make_engine, make_sessionmaker

    settings = _settings()
    scopes = [s for item in scope for s in item.replace(",", " ").split()]
    sources = (
        [s for item in event_source for s in item.replace(",", " ").split()]
        if event_source
        else None
    )

    async def main() -> str:
        engine = make_engine(settings.database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                _, key = await create_client(
                    session, name=name, scopes=scopes, event_sources=sources
                )
                await session.commit()
                return key
        finally:
            await engine.dispose()

    try:
        key = asyncio.run(main())
    except UnknownScopeError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from exc
    except Exception as exc:
        if "UNIQUE" in str(exc).upper() or "unique" in str(exc):
            typer.secho(f"a client named {name!r} already exists", fg="red", err=True)
            raise typer.Exit(2) from exc
        raise
    typer.echo(f"client {name!r} created with scopes: {' '.join(sorted(set(scopes)))}", err=True)
    if "events:write" in scopes:
        typer.echo(
            f"it may send events as: {', '.join(sorted(set(sources)))}"
            if sources
            else "it may send events as any sender (restrict it with --event-source)",
            err=True,
        )
    typer.echo("API key (shown once; store it now):", err=True)
    typer.echo(key)


@clients_app.command("list")
def clients_list() -> None:
    """List clients (names, scopes, state); keys are never shown."""
    from sqlalchemy import select

    from gateway.db.engine import make_engine, make_sessionmaker
    from gateway.db.models import ApiClient

    settings = _settings()

    async def main() -> list[ApiClient]:
        engine = make_engine(settings.database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                return list(
                    (await session.scalars(select(ApiClient).order_by(ApiClient.name))).all()
                )
        finally:
            await engine.dispose()

    for c in asyncio.run(main()):
        state = "revoked" if c.revoked_at else "active"
        typer.echo(f"{c.name}\t{state}\t{' '.join(c.scopes)}")


@clients_app.command("revoke")
def clients_revoke(name: Annotated[str, typer.Argument()]) -> None:
    """Revoke a client's key."""
    from gateway.clients.service import revoke_client
    from gateway.db.engine import make_engine, make_sessionmaker

    settings = _settings()

    async def main() -> bool:
        engine = make_engine(settings.database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                ok = await revoke_client(session, name=name)
                await session.commit()
                return ok
        finally:
            await engine.dispose()

    if not asyncio.run(main()):
        typer.secho(f"no client named {name!r}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"client {name!r} revoked")


@clients_app.command("scopes")
def clients_scopes() -> None:
    """List the scopes routes check."""
    from gateway.clients.service import SCOPES

    for scope, what in SCOPES.items():
        typer.echo(f"{scope:16} {what}")


# --------------------------------------------------------------------------- demo


def stripe_signature_header(secret: str, payload: bytes, *, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``payload`` (the scheme Stripe signs with:
    HMAC-SHA256 of ``"<t>.<payload>"`` keyed with the whole ``whsec_`` secret)."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


@app.command()
def demo(
    url: Annotated[
        str, typer.Option(help="Base URL of a running gateway")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(help="API key; default: create a demo client in the database")
    ] = None,
) -> None:
    """Send the sample intake, a signed sample Stripe checkout and clinical events to a
    running gateway, then print the FHIR resources and the case it produced."""
    import httpx

    settings = _settings()
    run = uuid.uuid4().hex[:8]
    key = api_key or _demo_client(settings, run)
    headers = {"Authorization": f"Bearer {key}"}
    intake = json.loads((EXAMPLES_DIR / "intake-glp1.json").read_text())
    now = time.time()
    intake["submission_id"] = f"demo-{run}"
    intake["submitted_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60))
    for consent in intake["consents"]:
        consent["accepted_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 120))
    intake["patient"]["external_id"] = f"demo-patient-{run}"
    intake["patient"]["email"] = f"jordan.rivera+{run}@example.com"
    ident_system = f"{settings.identifier_base}/external-patient-id"

    with httpx.Client(base_url=url, timeout=10) as client:
        _step(
            "1. intake submission -> Patient, QuestionnaireResponse, derived resources, Provenance"
        )
        r = client.post("/v1/intake-submissions", json=intake, headers=headers)
        _show(r)
        if r.status_code != 202:
            raise typer.Exit(1)
        refs = [x["reference"] for x in r.json().get("resources", [])]
        _step("2. Stripe checkout.session.completed (signed) -> MedicationRequest (draft proposal)")
        event = json.loads((EXAMPLES_DIR / "stripe-checkout-session-completed.json").read_text())
        event["id"] = f"evt_demo_{run}"
        event["created"] = int(time.time())
        session = event["data"]["object"]
        session["id"] = f"cs_demo_{run}"
        session["metadata"]["intake_submission_id"] = intake["submission_id"]
        session["metadata"]["patient_external_id"] = intake["patient"]["external_id"]
        session["customer_details"]["email"] = intake["patient"]["email"]
        if settings.stripe_webhook_secret is None:
            typer.echo(
                "GATEWAY_STRIPE_WEBHOOK_SECRET is not set: sending the canonical checkout instead"
            )
            r = client.post("/v1/checkouts", json=_canonical_from_stripe(event), headers=headers)
        else:
            payload = json.dumps(event).encode()
            signature = stripe_signature_header(
                settings.stripe_webhook_secret.get_secret_value(), payload
            )
            r = client.post(
                "/v1/webhooks/stripe",
                content=payload,
                headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
            )
        _show(r)
        if r.status_code < 300:
            refs += [x["reference"] for x in r.json().get("resources", [])]
        _step("3. clinical events from the EHR: provider assigned, decision approved")
        for i, (etype, status) in enumerate(
            [("provider_assigned", None), ("decision", "approved")]
        ):
            ev: dict[str, Any] = {
                "event_id": f"demo-{run}-{i}",
                "source": "ehr",
                "type": etype,
                "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + i)),
                "patient": {"system": ident_system, "value": intake["patient"]["external_id"]},
            }
            if status:
                ev["status"] = status
            _show(client.post("/v1/events", json=ev, headers=headers))
        _step("4. the FHIR resources")
        for ref in refs:
            res = client.get(f"/fhir/{ref}", headers=headers)
            typer.echo(json.dumps(res.json(), indent=2))
        _step("5. the case")
        deadline = time.time() + 5
        cases: list[dict[str, Any]] = []
        while time.time() < deadline:
            cases = client.get(
                "/v1/cases",
                params={"patient": f"{ident_system}|{intake['patient']['external_id']}"},
                headers=headers,
            ).json()
            if cases and cases[0]["state"] == "approved":
                break
            time.sleep(0.2)
        typer.echo(json.dumps(cases, indent=2))


def _canonical_from_stripe(event: dict[str, Any]) -> dict[str, Any]:
    from mappers.checkout import stripe_session_to_checkout

    data = stripe_session_to_checkout(event)
    data["processor"] = "demo"
    return data


def _demo_client(settings: Settings, run: str) -> str:
    from gateway.clients.service import SCOPES, create_client
    from gateway.db.engine import make_engine, make_sessionmaker

    async def main() -> str:
        engine = make_engine(settings.database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                _, key = await create_client(session, name=f"demo-{run}", scopes=list(SCOPES))
                await session.commit()
                return key
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _step(title: str) -> None:
    typer.secho(f"\n== {title}", bold=True)


def _show(response: Any) -> None:
    typer.echo(f"{response.request.method} {response.request.url.path} -> {response.status_code}")
    with contextlib.suppress(ValueError):
        typer.echo(json.dumps(response.json(), indent=2))


def main() -> None:
    """Entry point for ``python -m gateway``."""
    app()


if __name__ == "__main__":
    main()
