"""``fhir-gateway demo``: the sample intake, a signed Stripe checkout and clinical events
sent to a running gateway, and what it made of them.

The sample payloads are package data (``gateway/examples/``), so the demo runs from any
directory and from a non-editable install. Without ``--api-key`` the demo creates an API
client named ``demo-<run>`` in the configured database for the run and revokes it at the
end, failed runs included: no key with every scope is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from importlib.resources import files
from typing import Annotated, Any

import typer

from gateway.cli.common import Database, fail, run_on_database, settings_or_exit
from gateway.settings import Settings


def example(name: str) -> Any:
    """A sample payload shipped with the package (``gateway/examples/<name>``), parsed."""
    return json.loads(files("gateway").joinpath("examples", name).read_text(encoding="utf-8"))


def stripe_signature_header(secret: str, payload: bytes, *, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``payload`` (the scheme Stripe signs with:
    HMAC-SHA256 of ``"<t>.<payload>"`` keyed with the whole ``whsec_`` secret)."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def demo(
    url: Annotated[
        str, typer.Option(help="Base URL of a running gateway")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(help="API key; default: create a demo client in the database")
    ] = None,
) -> None:
    """Send the sample intake, a signed sample Stripe checkout and clinical events to a
    running gateway, then print the FHIR resources and the case it produced.

    Without --api-key it creates an API client demo-RUN for the run and revokes it at the
    end (failed runs included)."""
    import httpx

    settings = settings_or_exit()
    run = uuid.uuid4().hex[:8]
    try:
        httpx.get(f"{url.rstrip('/')}/healthz", timeout=5)
        with _demo_key(settings, run, api_key) as key:
            _run_demo(settings, url=url, key=key, run=run)
    except httpx.TransportError as exc:
        raise _unreachable(url, exc) from exc


def _unreachable(url: str, exc: Exception) -> typer.Exit:
    """One line naming where the demo tried (never the traceback, nor ``str(exc)``, which
    may hold a URL with a query)."""
    return fail(
        f"demo: no gateway answering at {url} ({type(exc).__name__}); start one with "
        "`make run` (or `fhir-gateway serve`), or pass --url",
        code=1,
    )


@contextlib.contextmanager
def _demo_key(settings: Settings, run: str, api_key: str | None) -> Iterator[str]:
    """``api_key``, or a client ``demo-<run>`` with every scope, revoked on the way out
    (whatever happened in between)."""
    if api_key:
        yield api_key
        return
    name = f"demo-{run}"
    key = _demo_client(settings, name)
    typer.echo(f"created API client {name} for this run (it is revoked at the end)")
    try:
        yield key
    finally:
        _revoke(settings, name)
        typer.echo(f"revoked API client {name}")


def _run_demo(settings: Settings, *, url: str, key: str, run: str) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    intake = example("intake-glp1.json")
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
        event = example("stripe-checkout-session-completed.json")
        event["id"] = f"evt_demo_{run}"
        event["created"] = int(time.time())
        session = event["data"]["object"]
        session["id"] = f"cs_demo_{run}"
        session["metadata"]["intake_submission_id"] = intake["submission_id"]
        session["metadata"]["patient_external_id"] = intake["patient"]["external_id"]
        session["customer_details"]["email"] = intake["patient"]["email"]
        if settings.stripe_webhook_secret is None:
            _step("2. canonical checkout -> MedicationRequest (draft proposal)")
            typer.echo(
                "GATEWAY_STRIPE_WEBHOOK_SECRET is not set: sending the canonical checkout "
                "instead of the signed Stripe event"
            )
            r = client.post("/v1/checkouts", json=_canonical_from_stripe(event), headers=headers)
        else:
            _step(
                "2. Stripe checkout.session.completed (signed) -> MedicationRequest "
                "(draft proposal)"
            )
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


def _demo_client(settings: Settings, name: str) -> str:
    from gateway.clients.service import SCOPES, create_client

    async def work(db: Database) -> str:
        async with db.session() as session:
            _, key = await create_client(session, name=name, scopes=list(SCOPES))
            await session.commit()
            return key

    return run_on_database(work, settings)


def _revoke(settings: Settings, name: str) -> None:
    from gateway.clients.service import revoke_client

    async def work(db: Database) -> None:
        async with db.session() as session:
            await revoke_client(session, name=name)
            await session.commit()

    run_on_database(work, settings)


def _step(title: str) -> None:
    typer.secho(f"\n== {title}", bold=True)


def _show(response: Any) -> None:
    typer.echo(f"{response.request.method} {response.request.url.path} -> {response.status_code}")
    with contextlib.suppress(ValueError):
        typer.echo(json.dumps(response.json(), indent=2))
