"""Oversize bodies are refused with 413 (by Content-Length, or while streaming without
one), before any of the body is processed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.runtime import Runtime
from gateway.settings import Settings
from tests import samples
from tests.support.api import signed_stripe, table_counts

LIMIT_BYTES = 2048


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test settings with a small body limit."""
    return settings.model_copy(update={"max_body_bytes": LIMIT_BYTES})


def oversize_intake() -> bytes:
    body = samples.intake()
    body["answers"]["additional_notes"] = "Patient note. " * 200
    raw = json.dumps(body).encode()
    assert len(raw) > LIMIT_BYTES
    return raw


def assert_413(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"] == "urn:fhir-gateway:problem:payload-too-large"
    assert body["errors"] == [
        {
            "field": "",
            "pointer": "#",
            "code": "payload_too_large",
            "detail": f"at most {LIMIT_BYTES} bytes",
        }
    ]
    assert "Patient note" not in r.text


async def test_a_body_over_the_limit_is_413(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    before = await table_counts(runtime)
    r = await client.post(
        "/v1/intake-submissions",
        content=oversize_intake(),
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_413(r)
    assert await table_counts(runtime) == before


async def test_a_streamed_body_without_content_length_is_cut_off_at_the_limit(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    raw = oversize_intake()
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 512):
            sent.append(i)
            yield raw[i : i + 512]

    before = await table_counts(runtime)
    r = await client.post(
        "/v1/intake-submissions",
        content=chunks(),
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert_413(r)
    assert len(sent) < len(raw) // 512 + 1  # the rest was never read
    assert await table_counts(runtime) == before


async def test_the_stripe_webhook_has_the_same_limit(client: httpx.AsyncClient) -> None:
    event = samples.stripe_event()
    event["data"]["object"]["metadata"]["note"] = "x" * LIMIT_BYTES  # type: ignore[index]
    payload, headers = signed_stripe(event)
    assert_413(await client.post("/v1/webhooks/stripe", content=payload, headers=headers))


async def test_a_body_under_the_limit_is_processed(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.post("/v1/checkouts", json={"checkout_id": "c-1"}, headers=admin_headers)
    assert r.status_code == 422  # read and validated, not refused for its size


async def test_an_oversize_body_keeps_nothing_and_is_logged_by_size_only(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/API.md: a 413 keeps nothing of the body (no exception row); one log line."""
    before = await table_counts(runtime)
    capsys.readouterr()
    r = await client.post(
        "/v1/intake-submissions",
        content=oversize_intake(),
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_413(r)
    assert await table_counts(runtime) == before  # the exceptions queue included
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if "http.body_too_large" in x]
    assert "/v1/intake-submissions" in line and str(LIMIT_BYTES) in line
    assert "Patient note" not in out
