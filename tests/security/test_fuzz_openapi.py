"""Property-based fuzzing of the OpenAPI document with schemathesis: every operation, a
fixed seed, a bounded number of examples, every check; on SQLite and PostgreSQL.

Finds: server errors (any 5xx), answers the document does not describe (status codes,
media types, headers, body schemas), 405 without ``Allow``, routes that ignore their
declared security, schema-valid input refused and schema-invalid input accepted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events
from schemathesis.python import asgi

from gateway.app import create_app
from gateway.clients.service import SCOPES, create_client
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests.support.profiles import shared_profiles

#: Fixed, so a failure is reproduced by running the test again.
SEED = 20261207
#: Examples per operation and phase (fuzzing); the coverage phase adds its own cases.
MAX_EXAMPLES = 10

#: Operations whose schema-valid input may still be refused, and why: their bodies are
#: checked against data the document cannot hold (the profiles: which forms, plans,
#: questions and event vocabularies exist; a draft profile's YAML) or against a
#: signature (which a generated request cannot carry). Every other answer of theirs is
#: still checked against the document.
_ACCEPTED = ["2xx", "401", "403", "404", "409"]
BEYOND_THE_SCHEMA: dict[str, list[str]] = {
    "/v1/intake-submissions": [*_ACCEPTED, "422"],  # the form's profile
    "/v1/checkouts": [*_ACCEPTED, "422"],  # the plan's checkout profile
    "/v1/events": [*_ACCEPTED, "422"],  # the workflow's events and owners
    "/v1/profiles/preview": [*_ACCEPTED, "422"],  # the draft profile and its input
    "/v1/hl7v2": [*_ACCEPTED],  # AR/AE are answered with 200
    "/v1/webhooks/stripe": [*_ACCEPTED, "400"],  # the Stripe-Signature header
    "/v1/partners/{partner}/webhooks": [*_ACCEPTED, "400", "503"],  # the signature
    "/v1/ehr/{target}/notifications": [*_ACCEPTED, "503"],  # the shared secret
    "/v1/ops/deliveries/replay": [*_ACCEPTED, "422"],  # ids or filter, exactly one
}


def _accepting(statuses: list[str]) -> dict[str, Any]:
    return {"positive_data_acceptance": {"expected-statuses": statuses}}


async def _admin_key(settings: Settings) -> str:
    rt = Runtime.create(settings, profiles=shared_profiles(settings.profiles_dir))
    try:
        async with rt.sessionmaker() as session:
            _, key = await create_client(session, name="fuzzer", scopes=list(SCOPES))
            await session.commit()
    finally:
        await rt.close()
    return key


@pytest.fixture
def fuzzed_api(settings: Settings) -> Iterator[schemathesis.schemas.BaseSchema]:
    """The app's OpenAPI document loaded by schemathesis, calls going to the app in-process
    with a key holding every scope."""
    key = asyncio.run(_admin_key(settings))
    app = create_app(settings, run_worker=False)
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "headers": {"Authorization": f"Bearer {key}"},
            "operations": [
                {
                    "include-path": path,
                    "include-method": "POST",
                    "checks": _accepting(statuses),
                    "phases": {
                        phase: {"checks": _accepting(statuses)}
                        for phase in ("examples", "coverage", "fuzzing", "stateful")
                    },
                }
                for path, statuses in BEYOND_THE_SCHEMA.items()
            ],
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    try:
        yield schema
    finally:
        asgi.shutdown_lifespans()


def run_schemathesis(schema: schemathesis.schemas.BaseSchema) -> list[str]:
    """Run every phase of schemathesis over ``schema``; the failures, one line each."""
    failures: list[str] = []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.failure_info is not None:
                        case = event.recorder.cases[case_id].value
                        interaction = event.recorder.interactions.get(case_id)
                        response = interaction.response if interaction else None
                        answer = (
                            f"{response.status_code} {response.headers.get('content-type')} "
                            f"{(response.content or b'')[:200]!r}"
                            if response is not None
                            else "no response"
                        )
                        failures.append(
                            f"{event.label} [{event.phase.name}] {check.name}: "
                            f"{check.failure_info.failure.title} | {case.method} "
                            f"{case.formatted_path} {case.query or ''} -> {answer}"
                        )
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"error: {event!r}")
    return failures


#: Mismatches found and not fixed yet, by (operation, check), each with what is known.
#: Anything else the run finds fails the test.
KNOWN_MISMATCHES: dict[tuple[str, str], str] = {
    ("POST /v1/webhooks/stripe", "positive_data_acceptance"): (
        "a missing or wrong Stripe-Signature is 400 (docs/API.md), and a generated request "
        "cannot be signed; the per-operation expected statuses of the config did not apply"
    ),
    ("POST /v1/events", "negative_data_rejection"): "not investigated yet",
    ("POST /v1/ops/deliveries/replay", "negative_data_rejection"): "not investigated yet",
}


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """PostgreSQL only: the database where NUL characters and 64-bit ids used to fail (the
    SQLite half of the same answers is in the other tests); one run keeps the CPU time of
    the fuzzing near 15 s."""
    return postgres_url


def test_openapi_fuzz(fuzzed_api: schemathesis.schemas.BaseSchema) -> None:
    failures = [
        line
        for line in run_schemathesis(fuzzed_api)
        if not any(line.startswith(op) and f"] {check}:" in line for op, check in KNOWN_MISMATCHES)
    ]
    assert not failures, "\n".join(sorted(set(failures)))
