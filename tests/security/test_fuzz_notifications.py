"""Property-based fuzzing (hypothesis) of FHIR Subscription notification bodies
(``POST /v1/ehr/{target}/notifications``), on SQLite and PostgreSQL.

A valid notification Bundle (a status and a Task) has one of its values, picked
anywhere in the tree, replaced by arbitrary JSON: strings with NUL and separators, huge
and negative numbers, deep lists and objects. Whatever the body, the answer is a 2xx or a
4xx problem, never a 5xx. A fixed derandomized run, bounded examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.db.models import ExceptionRecord
from gateway.runtime import Runtime
from tests.support.api import rows
from tests.support.events_env import (
    BEACON_ENV,
    BEACON_SECRET,
    NOTIFY_ENV,
    NOTIFY_SECRET,
    PHARMACY_ENV,
    PHARMACY_SECRET,
    TARGET,
    events_profiles,
    standard_webhook_headers,
)
from tests.support.notifications import bundle, task

URL = f"/v1/ehr/{TARGET}/notifications"
AUTH = {"Authorization": f"Bearer {NOTIFY_SECRET}", "Content-Type": "application/fhir+json"}

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\x00", "Task/..", "Patient/a\x00b", "../../metadata", "", "x" * 300]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture
def profiles_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The events profiles: ``test-ehr`` takes notifications with :data:`NOTIFY_SECRET`."""
    for name, value in (
        (NOTIFY_ENV, NOTIFY_SECRET),
        (PHARMACY_ENV, PHARMACY_SECRET),
        (BEACON_ENV, BEACON_SECRET),
    ):
        monkeypatch.setenv(name, value)
    return events_profiles(tmp_path / "profiles")


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in ``node`` (itself included)."""
    found = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*at, i))
    return found


@st.composite
def hostile_notifications(draw: st.DrawFn) -> bytes:
    """A notification Bundle with one value replaced by arbitrary JSON."""
    number = draw(st.integers(1, 10**6))
    doc = bundle(
        "event-notification",
        events_since=number,
        events=[(number, "2026-11-24T16:00:00Z", "Task/t-1")],
        resources=[task("t-1", "p-1", status="completed")],
    )
    path = draw(st.sampled_from(_paths(doc)[1:]))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(doc).encode()


@FUZZ
@given(raw=hostile_notifications())
async def test_any_notification_body_is_answered_without_a_server_error(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    r = await client.post(URL, content=raw, headers=AUTH)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith(
            ("application/problem+json", "application/fhir+json")
        )


async def test_the_notification_the_fuzzing_starts_from_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    doc = bundle(
        "event-notification",
        events_since=1,
        events=[(1, "2026-11-24T16:00:00Z", "Task/t-1")],
        resources=[task("t-1", "p-1", status="completed")],
    )
    r = await client.post(URL, content=json.dumps(doc).encode(), headers=AUTH)
    assert r.status_code in (200, 202), r.text


async def test_signed_channels_refuse_huge_integers_and_nul_with_422_and_keep_the_payload(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    # after the signature or secret check, the same decoding as every JSON route
    huge = b'{"id": "evt-1", "amount": 1' + b"0" * 5000 + b"}"
    nul = json.dumps({"id": "evt-2", "data": {"patient": "a\u0000b"}}).encode()
    sent: list[bytes] = []
    for raw in (huge, nul):
        r = await client.post(
            "/v1/partners/sunrise-pharmacy/webhooks",
            content=raw,
            headers=standard_webhook_headers(raw),
        )
        assert r.status_code == 422, r.text
        r = await client.post(URL, content=raw, headers=AUTH)
        assert r.status_code == 422, r.text
        sent += [raw, raw]
    kept = sorted(record.payload or b"" for record in await rows(runtime, ExceptionRecord))
    assert kept == sorted(sent)
