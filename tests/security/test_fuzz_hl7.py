"""Property-based fuzzing (hypothesis) of HL7 v2 over MLLP, on SQLite and PostgreSQL.

A valid message is mutated (characters inserted, NUL and separators among them; a field
replaced; the message cut; bytes that are not text) and sent in an MLLP frame to the real
listener. Whatever arrives, the sender gets an ACK with MSA-1 ``AA``, ``AE`` or ``AR``
on the same connection, and the listener keeps serving: a valid message sent after the
run is still accepted. A fixed derandomized run, bounded examples.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.hl7.mllp import MllpServer
from gateway.runtime import Runtime
from tests.support.events_env import (
    BEACON_ENV,
    BEACON_SECRET,
    NOTIFY_ENV,
    NOTIFY_SECRET,
    PHARMACY_ENV,
    PHARMACY_SECRET,
    events_profiles,
    hl7_message,
)

SB, EB, CR = b"\x0b", b"\x1c", b"\r"

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Characters that mean something in ER7 or to a database, beside ordinary text.
NASTY = st.sampled_from(["\x00", "|", "^", "~", "\\", "&", "\r", "\n", "\x0b", "é", "\ud7ff"])
TEXT = st.lists(st.one_of(NASTY, st.characters(codec="utf-8")), max_size=40).map("".join)


@pytest.fixture
def profiles_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The events profiles (the ``test-ehr-hl7`` feed knows the sending facility)."""
    for name, value in (
        (NOTIFY_ENV, NOTIFY_SECRET),
        (PHARMACY_ENV, PHARMACY_SECRET),
        (BEACON_ENV, BEACON_SECRET),
    ):
        monkeypatch.setenv(name, value)
    return events_profiles(tmp_path / "profiles")


@pytest.fixture
async def mllp(runtime: Runtime) -> AsyncIterator[MllpServer]:
    server = MllpServer(runtime, port=0, max_message_bytes=8192, read_timeout_s=5)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@st.composite
def hostile_messages(draw: st.DrawFn) -> bytes:
    """A mutated ORU^R01 (ER7), as bytes."""
    control_id = f"FZ-{draw(st.integers(0, 10**9))}"
    message = hl7_message(
        "ORU^R01", control_id=control_id, pid3=f"{draw(TEXT)}^^^TESTEHR^PI", extra=None
    )
    mutation = draw(st.sampled_from(["insert", "replace_field", "cut", "bytes", "as_is"]))
    if mutation == "insert":
        at = draw(st.integers(0, len(message)))
        message = message[:at] + draw(TEXT) + message[at:]
    elif mutation == "replace_field":
        fields = message.split("|")
        fields[draw(st.integers(1, len(fields) - 1))] = draw(TEXT)
        message = "|".join(fields)
    elif mutation == "cut":
        message = message[: draw(st.integers(0, len(message)))]
    raw = message.encode("utf-8", "surrogatepass")
    if mutation == "bytes":
        raw = b"MSH|^~\\&|" + draw(st.binary(max_size=200))
    return raw.replace(EB, b"")  # an end block inside would only split the frame


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(SB + raw + EB + CR)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(EB + CR), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def _msa1(ack: bytes) -> str:
    text = ack.strip(SB + EB + CR)
    separator = text[3:4]  # MSH-1: the ACK answers in the message's own delimiters
    for segment in text.split(CR):
        if segment.startswith(b"MSA" + separator):
            return segment.split(separator)[1].decode()
    raise AssertionError(f"no MSA segment in {ack!r}")


@FUZZ
@given(raw=hostile_messages())
async def test_any_hl7_message_over_mllp_gets_an_ack(mllp: MllpServer, raw: bytes) -> None:
    ack = await _exchange(mllp.port, raw)
    assert _msa1(ack) in ("AA", "AE", "AR")


async def test_a_nul_in_an_hl7_field_is_refused_and_the_listener_keeps_serving(
    mllp: MllpServer,
) -> None:
    nul = hl7_message("ORU^R01", control_id="NUL-1", pid3="e-1\x00^^^TESTEHR^PI")
    assert _msa1(await _exchange(mllp.port, nul.encode())) in ("AE", "AR")
    valid = hl7_message("ADT^A08", control_id="OK-1", pid3="e-1^^^TESTEHR^PI")
    assert _msa1(await _exchange(mllp.port, valid.encode())) in ("AA", "AE")
