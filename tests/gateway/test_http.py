"""The request toolkit (``gateway.http``): every way a JSON body can fail is a problem with
a 4xx status, never a 500; refused payloads are kept for review."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from sqlalchemy import select

from gateway.cli import stripe_signature_header
from gateway.db.models import ExceptionRecord, InboundMessage
from gateway.errors import BadRequestError, GatewayError, UnprocessableError
from gateway.http import MAX_INT_DIGITS, decode_json_object
from gateway.runtime import Runtime
from tests import samples
from tests.support.api import STRIPE_SECRET, count, rows

TOO_LONG = "9" * (MAX_INT_DIGITS + 1)


@pytest.mark.parametrize(
    ("raw", "error", "code"),
    [
        pytest.param(
            f'{{"n": {TOO_LONG}}}'.encode(), UnprocessableError, "number_too_long", id="int"
        ),
        pytest.param(
            f'{{"n": [-{TOO_LONG}]}}'.encode(), UnprocessableError, "number_too_long", id="negative"
        ),
        pytest.param(b'{"n": "\xff"}', BadRequestError, "invalid_encoding", id="not-utf8"),
        pytest.param(b'{"n": }', BadRequestError, "invalid_json", id="syntax"),
        pytest.param(b"[" * 100_000, BadRequestError, "invalid_json", id="nested-too-deep"),
        pytest.param(b"[1, 2]", UnprocessableError, "type_error", id="not-an-object"),
    ],
)
def test_a_body_that_cannot_be_read_is_a_problem(
    raw: bytes, error: type[GatewayError], code: str
) -> None:
    with pytest.raises(error) as caught:
        decode_json_object(raw)
    assert [p.code for p in caught.value.problems] == [code]


def test_the_longest_integer_python_converts_is_read() -> None:
    longest = "9" * MAX_INT_DIGITS
    data = decode_json_object(f'{{"n": -{longest}, "f": 1.{longest}e5}}'.encode())
    assert data["n"] == -int(longest)
    assert data["f"] > 1e5


@pytest.mark.parametrize(
    ("path", "channel"),
    [
        ("/v1/intake-submissions", "intake"),
        ("/v1/checkouts", "checkout"),
        ("/v1/events", "events"),
    ],
)
async def test_a_too_long_integer_is_refused_with_422_and_kept_for_review(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    path: str,
    channel: str,
) -> None:
    raw = f'{{"submission_id": "s-1", "checkout_id": "c-1", "weight_lb": {TOO_LONG}}}'
    r = await client.post(
        path, content=raw, headers={**admin_headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert [e["code"] for e in r.json()["errors"]] == ["number_too_long"]
    [record] = await _rejected(runtime)
    assert (record.channel, record.payload) == (channel, raw.encode())
    assert await count(runtime, InboundMessage) == 0


async def test_a_signed_stripe_event_with_a_too_long_integer_is_refused(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    payload = (
        b'{"n": ' + TOO_LONG.encode() + b", " + json.dumps(samples.stripe_event()).encode()[1:]
    )
    signature = stripe_signature_header(STRIPE_SECRET, payload, timestamp=int(time.time()))
    r = await client.post(
        "/v1/webhooks/stripe",
        content=payload,
        headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    [record] = await _rejected(runtime)
    assert (record.channel, record.payload) == ("stripe", payload)


async def _rejected(runtime: Runtime) -> list[ExceptionRecord]:
    return await rows(runtime, ExceptionRecord, ExceptionRecord.kind == "rejected_input")


async def test_a_message_stored_alone_is_committed_on_its_own_on_postgresql(
    runtime: Runtime,
) -> None:
    """``store_if_new(..., alone=True)``: on PostgreSQL the INSERT is its own autocommit
    transaction (one round trip), so the row is durable whatever the session does next;
    on SQLite it is part of the session's transaction. A second copy is still found."""
    from gateway.http import store_if_new
    from gateway.inbox import repository as inbox

    def message(n: int) -> InboundMessage:
        return inbox.new_message(
            channel="events",
            sender="lab",
            external_id="ev-alone-1",
            body=b'{"n": %d}' % n,
            content_type="application/json",
        )

    async with runtime.sessionmaker() as session:
        assert await store_if_new(session, message(1), alone=True) is None
        await session.rollback()
    async with runtime.sessionmaker() as session:
        stored = await session.scalar(
            select(InboundMessage).where(InboundMessage.external_id == "ev-alone-1")
        )
        if runtime.engine.dialect.name == "postgresql":
            assert stored is not None
            again = await store_if_new(session, message(2), alone=True)
            assert again is not None and again.id == stored.id  # the copy finds the first
        else:
            assert stored is None  # rolled back with the session
