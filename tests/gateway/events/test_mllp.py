"""The MLLP listener with a real HL7 client written by others (the ``hl7`` package's
asyncio MLLP client and its ``mllp_send`` command): several messages on one connection,
several connections at once, a broken frame, a malformed message, an oversize one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import hl7
import httpx
import pytest
from hl7.mllp import open_hl7_connection

from gateway.events.apply import apply_received
from gateway.hl7.mllp import MllpDecoder, MllpServer
from gateway.hl7.service import Hl7Reply
from gateway.runtime import Runtime
from tests.support.events_env import (
    EHR_FACILITY,
    Patient,
    add_remote_patient_id,
    case_of,
    hl7_message,
    new_patient,
)

SB, EB, CR = b"\x0b", b"\x1c", b"\r"


@pytest.fixture
async def mllp(runtime: Runtime) -> AsyncIterator[MllpServer]:
    async def apply(reply: Hl7Reply) -> object:
        assert reply.message is not None
        return await apply_received(runtime, reply.message, prepared=reply.prepared)

    server = MllpServer(
        runtime, port=0, max_message_bytes=4096, after_store=apply, allow_plaintext=True
    )
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def _patient(
    client: httpx.AsyncClient, runtime: Runtime, headers: dict[str, str], remote: str
) -> Patient:
    patient = await new_patient(client, headers)
    await add_remote_patient_id(runtime, patient.patient_id, remote)
    return patient


def _msa(message: hl7.Message) -> tuple[str, str]:
    msa = message.segment("MSA")
    return str(msa[1]), str(msa[2])


async def _settle(server: MllpServer) -> None:
    """Wait for the after-ACK work of the listener."""
    for _ in range(200):
        if not server._background:
            return
        await asyncio.sleep(0.01)


async def test_several_messages_on_one_connection(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    patient = await _patient(client, runtime, admin_headers, "e-1")
    reader, writer = await open_hl7_connection("127.0.0.1", mllp.port)
    try:
        messages = [
            hl7_message("ADT^A08", control_id="M-1", pid3="e-1^^^TESTEHR^PI"),
            hl7_message(
                "ORU^R01",
                control_id="M-2",
                pid3="e-1^^^TESTEHR^PI",
                extra=["OBR|1|O1|F1|4548-4^A1c^LN"],
            ),
            hl7_message("SIU^S12", control_id="M-3", pid3="e-1^^^TESTEHR^PI"),
        ]
        for message in messages:
            writer.writemessage(hl7.parse(message))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readmessage(), 5)
            assert _msa(ack) == ("AA", message.split("|")[9])
    finally:
        writer.close()
        await writer.wait_closed()
    await _settle(mllp)
    case = await case_of(client, admin_headers, patient.case_id)
    assert {e["event_id"] for e in case["history"] if e["channel"] == "hl7v2"} == {
        "M-1",
        "M-2",
        "M-3",
    }


async def test_broken_frame_and_malformed_message_leave_the_connection_usable(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    await _patient(client, runtime, admin_headers, "e-2")
    reader, writer = await open_hl7_connection("127.0.0.1", mllp.port)
    try:
        # a frame without its start block
        writer.write(
            b"MSH|^~\\&|EHRAPP|TESTEHR|FHIRGW|TELE|20261124||ADT^A08|B-1|P|2.5.1" + EB + CR
        )
        ack = await asyncio.wait_for(reader.readmessage(), 5)
        assert _msa(ack) == ("AR", "")
        assert "Segment sequence error" in str(ack.segment("ERR"))
        # a proper frame with something that is not HL7
        writer.writeblock(b"HELLO WORLD")
        ack = await asyncio.wait_for(reader.readmessage(), 5)
        assert _msa(ack) == ("AR", "")
        # a readable message that cannot be mapped
        writer.writemessage(
            hl7.parse(hl7_message("ORM^O01", control_id="B-2", pid3="X^^^NOWHERE", orc="ORC|NW|P1"))
        )
        ack = await asyncio.wait_for(reader.readmessage(), 5)
        assert _msa(ack) == ("AE", "B-2")
        # junk between frames, then a good message: still accepted on the same connection
        writer.write(b"\r\n")
        writer.writemessage(
            hl7.parse(hl7_message("ADT^A08", control_id="B-3", pid3="e-2^^^TESTEHR^PI"))
        )
        ack = await asyncio.wait_for(reader.readmessage(), 5)
        assert _msa(ack) == ("AA", "B-3")
    finally:
        writer.close()
        await writer.wait_closed()
    exceptions = (await client.get("/v1/ops/exceptions", headers=admin_headers)).json()["items"]
    assert sorted(e["kind"] for e in exceptions) == [
        "hl7_rejected",
        "hl7_rejected",
        "unmappable_input",
    ]


async def test_an_oversize_message_is_refused_and_the_connection_closed(
    mllp: MllpServer,
) -> None:
    reader, writer = await open_hl7_connection("127.0.0.1", mllp.port)
    try:
        writer.write(SB + b"MSH|" + b"X" * 5000)
        await writer.drain()
        ack = await asyncio.wait_for(reader.readmessage(), 5)
        assert _msa(ack) == ("AR", "")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    finally:
        writer.close()


async def test_several_connections_at_once(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    patient = await _patient(client, runtime, admin_headers, "e-3")

    async def sender(n: int) -> list[tuple[str, str]]:
        reader, writer = await open_hl7_connection("127.0.0.1", mllp.port)
        acks = []
        try:
            for i in range(3):
                writer.writemessage(
                    hl7.parse(
                        hl7_message("ADT^A08", control_id=f"C{n}-{i}", pid3="e-3^^^TESTEHR^PI")
                    )
                )
                acks.append(_msa(await asyncio.wait_for(reader.readmessage(), 10)))
        finally:
            writer.close()
            await writer.wait_closed()
        return acks

    results = await asyncio.gather(*(sender(n) for n in range(4)))
    assert [a for acks in results for a in acks] == [
        ("AA", f"C{n}-{i}") for n in range(4) for i in range(3)
    ]
    await _settle(mllp)
    case = await case_of(client, admin_headers, patient.case_id)
    assert sum(1 for e in case["history"] if e["channel"] == "hl7v2") == 12


async def test_mllp_send_command(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    mllp: MllpServer,
    tmp_path: Path,
) -> None:
    await _patient(client, runtime, admin_headers, "e-4")
    batch = tmp_path / "batch.hl7"
    batch.write_text(
        "\n".join(
            hl7_message("ADT^A08", control_id=f"S-{i}", pid3="e-4^^^TESTEHR^PI").replace("\r", "\n")
            for i in range(3)
        )
    )
    acks = await _mllp_send_msa(mllp.port, batch)
    assert acks == ["MSA|AA|S-0", "MSA|AA|S-1", "MSA|AA|S-2"]


def test_decoder_splits_frames_and_reports_framing_errors() -> None:
    decoder = MllpDecoder(max_bytes=50)
    assert decoder.feed(SB + b"on") == []
    assert decoder.partial
    assert decoder.feed(b"e" + EB + CR + b"\n" + SB + b"two" + EB + CR) == [
        ("frame", b"one"),
        ("frame", b"two"),
    ]
    assert not decoder.partial
    assert decoder.feed(b"junk" + EB + CR) == [("broken", b"junk")]
    assert decoder.feed(SB + b"cut" + SB + b"three" + EB + CR) == [
        ("broken", b"cut"),
        ("frame", b"three"),
    ]
    assert decoder.feed(SB + b"x" * 60) == [("oversize", b"")]
    # an end block without its CR ends the frame; the CR arriving later is skipped
    assert decoder.feed(SB + b"four" + EB) == [("frame", b"four")]
    assert decoder.feed(CR + SB + b"five" + EB + SB + b"six" + EB + CR) == [
        ("frame", b"five"),
        ("frame", b"six"),
    ]
    assert not decoder.partial


async def _mllp_send_msa(port: int, batch: Path) -> list[str]:
    """python-hl7's ``mllp_send --loose --file batch`` to ``port``: the MSA segments of the
    ACKs it printed, in order."""
    command = Path(sys.executable).with_name("mllp_send")
    proc = await asyncio.create_subprocess_exec(
        str(command),
        "--port",
        str(port),
        "--file",
        str(batch),
        "--loose",
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    text = out.decode().replace("\x0b", "").replace("\x1c", "").replace("\r", "\n")
    return [line for line in text.split("\n") if line.startswith("MSA")]


@contextlib.asynccontextmanager
async def mllp_command(
    tmp_path: Path, profiles_dir: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``fhir-gateway mllp`` with ``GATEWAY_MLLP_PORT=0`` (a setting, as in ``.env``) on a
    migrated SQLite file: the process and its port; stopped with SIGTERM at the end, which
    must exit 0."""
    from gateway.db.migrate import upgrade_async

    database = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    await upgrade_async(database)
    env = {
        **os.environ,
        "GATEWAY_DATABASE_URL": database,
        "GATEWAY_PROFILES_DIR": str(profiles_dir),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_MLLP_PORT": "0",
        "GATEWAY_MLLP_ALLOW_PLAINTEXT": "true",
    }
    command = Path(sys.executable).with_name("fhir-gateway")
    proc = await asyncio.create_subprocess_exec(
        str(command),
        "mllp",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert line.startswith("MLLP listening on 127.0.0.1:"), line
        yield proc, int(line.rsplit(":", 1)[1])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0


async def _send_a08(port: int, control_id: str, facility: str = EHR_FACILITY) -> tuple[str, str]:
    """One ADT^A08 over a new MLLP connection; its ACK's MSA-1 and MSA-2."""
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    message = hl7_message(
        "ADT^A08", control_id=control_id, facility=facility, pid3="x^^^TESTEHR^MR"
    )
    writer.writemessage(hl7.parse(message))
    ack = await asyncio.wait_for(reader.readmessage(), 10)
    writer.close()
    return _msa(ack)


async def test_the_mllp_command_listens_acks_and_stops(tmp_path: Path, profiles_dir: Path) -> None:
    async with mllp_command(tmp_path, profiles_dir) as (_proc, port):
        assert await _send_a08(port, "CLI-1") == ("AA", "CLI-1")


async def test_the_mllp_command_reloads_the_profiles_on_sighup(
    tmp_path: Path, profiles_dir: Path
) -> None:
    """docs/PROFILES.md: reload with ``kill -HUP <pid>``, each process. The listener used
    to die on SIGHUP (the default action) instead of learning a new sending facility."""
    from tests.support.profiles import edit_yaml

    async with mllp_command(tmp_path, profiles_dir) as (proc, port):
        # not a configured sender yet
        assert await _send_a08(port, "HUP-1", "NEWFAC") == ("AR", "HUP-1")
        edit_yaml(
            profiles_dir / "events/test-ehr-hl7.yaml",
            lambda d: d["hl7"]["facilities"].append("NEWFAC"),
        )
        proc.send_signal(signal.SIGHUP)
        codes: tuple[str, str] = ("", "")
        for attempt in range(50):
            assert proc.returncode is None, "the listener died on SIGHUP"
            codes = await _send_a08(port, f"HUP-{attempt + 2}", "NEWFAC")
            if codes[0] == "AA":
                break
            await asyncio.sleep(0.1)
        assert codes[0] == "AA"


async def test_close_with_connections_open_ends_them_quietly(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown with idle clients connected: each connection is closed (the client reads
    EOF) and asyncio logs no "Exception in callback" traceback for the cancelled handlers
    (Python 3.11's stream callback raises on a cancelled handler task)."""
    server = MllpServer(runtime, port=0, max_message_bytes=4096, allow_plaintext=True)
    await server.start()
    clients = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    for _ in range(100):  # the handlers have started
        if len(server._connections) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(server._connections) == 3
    with caplog.at_level("ERROR", logger="asyncio"):
        await server.close()
        for reader, _ in clients:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.sleep(0.05)  # asyncio's done callbacks run after the handlers end
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    for _, writer in clients:
        writer.close()


async def _read_acks(reader: asyncio.StreamReader, count: int) -> list[tuple[str, str]]:
    """Read ``count`` MLLP-framed ACKs with a plain stream reader; MSA-1 and MSA-2 of each."""
    acks = []
    for _ in range(count):
        block = await asyncio.wait_for(reader.readuntil(EB + CR), 5)
        msa = next(s for s in block.strip(SB + EB + CR).split(CR) if s.startswith(b"MSA"))
        fields = msa.decode().split("|")
        acks.append((fields[1], fields[2]))
    return acks


def _framed(control_id: str, pid3: str) -> bytes:
    return SB + hl7_message("ADT^A08", control_id=control_id, pid3=pid3).encode() + EB + CR


async def test_frames_split_across_reads_and_several_in_one_read(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    await _patient(client, runtime, admin_headers, "e-5")
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp.port)
    try:
        # one message dribbled out in small pieces (the end block and its CR apart)
        data = _framed("F-1", "e-5^^^TESTEHR^PI")
        for i in range(0, len(data) - 1, 7):
            writer.write(data[i : min(i + 7, len(data) - 1)])
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.write(CR)
        assert await _read_acks(reader, 1) == [("AA", "F-1")]
        # three messages in one write, with junk that is not a frame before the first
        writer.write(
            b"GET / HTTP/1.0\r\n\r\n"
            + b"".join(_framed(f"F-{i}", "e-5^^^TESTEHR^PI") for i in (2, 3, 4))
        )
        assert await _read_acks(reader, 3) == [("AA", "F-2"), ("AA", "F-3"), ("AA", "F-4")]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_an_end_block_without_its_cr_still_ends_the_frame(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    await _patient(client, runtime, admin_headers, "e-6")
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp.port)
    try:
        for control_id in ("N-1", "N-2"):
            message = hl7_message("ADT^A08", control_id=control_id, pid3="e-6^^^TESTEHR^PI")
            writer.write(SB + message.encode() + EB)  # no CR after the end block
            await writer.drain()
            assert await _read_acks(reader, 1) == [("AA", control_id)]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_half_closed_connection_still_gets_its_acks(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    await _patient(client, runtime, admin_headers, "e-7")
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp.port)
    writer.write(_framed("H-1", "e-7^^^TESTEHR^PI") + _framed("H-2", "e-7^^^TESTEHR^PI"))
    writer.write_eof()  # the client is done sending, but still reads
    assert await _read_acks(reader, 2) == [("AA", "H-1"), ("AA", "H-2")]
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_an_idle_or_stalled_client_does_not_hold_up_others(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    await _patient(client, runtime, admin_headers, "e-8")
    idle = await asyncio.open_connection("127.0.0.1", mllp.port)  # sends nothing
    stalled = await asyncio.open_connection("127.0.0.1", mllp.port)
    stalled[1].write(SB + b"MSH|^~\\&|EHRAPP|TESTEHR")  # stops in the middle of a frame
    await stalled[1].drain()
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp.port)
    try:
        writer.write(_framed("I-1", "e-8^^^TESTEHR^PI"))
        assert await _read_acks(reader, 1) == [("AA", "I-1")]
    finally:
        for _, w in (idle, stalled, (reader, writer)):
            w.close()


async def test_a_message_as_hl7apy_frames_it(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    """hl7apy's ``to_mllp()`` ends the message with a CR before the end block."""
    from hl7apy.parser import parse_message

    await _patient(client, runtime, admin_headers, "e-9")
    message = parse_message(hl7_message("ADT^A08", control_id="P-1", pid3="e-9^^^TESTEHR^PI"))
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp.port)
    try:
        writer.write(message.to_mllp().encode())
        assert await _read_acks(reader, 1) == [("AA", "P-1")]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_mllp_send_of_a_batch_file(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    mllp: MllpServer,
    tmp_path: Path,
) -> None:
    """``mllp_send --loose`` splits a file on ``MSH|^~\\&|`` and so sends an FHS/BHS batch
    header as a message of its own: it is refused as a batch, the messages are accepted
    (the trailing BTS/FTS are ignored)."""
    await _patient(client, runtime, admin_headers, "e-10")
    messages = [
        hl7_message("ADT^A08", control_id=f"B-{i}", pid3="e-10^^^TESTEHR^PI") for i in (1, 2)
    ]
    batch = tmp_path / "batch.hl7"
    batch.write_text(
        "\n".join(
            [
                "FHS|^~\\&|EHRAPP|TESTEHR|FHIRGW|TELE|20261124",
                "BHS|^~\\&|EHRAPP|TESTEHR|FHIRGW|TELE|20261124",
                *(m.replace("\r", "\n") for m in messages),
                "BTS|2",
                "FTS|1",
            ]
        )
    )
    acks = await _mllp_send_msa(mllp.port, batch)
    assert acks == [
        "MSA|AR||an HL7 batch (FHS/BHS) is not accepted: send each message on its own",
        "MSA|AA|B-1",
        "MSA|AA|B-2",
    ]


async def test_a_retransmission_is_acknowledged_again_and_applied_once(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    """A sender that got no ACK in time sends the message again, on the same connection or
    on a new one: AA each time, one event in the case history."""
    patient = await _patient(client, runtime, admin_headers, "e-11")
    data = _framed("D-1", "e-11^^^TESTEHR^PI")
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", mllp.port)
        try:
            writer.write(data + data)
            assert await _read_acks(reader, 2) == [("AA", "D-1"), ("AA", "D-1")]
        finally:
            writer.close()
            await writer.wait_closed()
    await _settle(mllp)
    case = await case_of(client, admin_headers, patient.case_id)
    assert [e["event_id"] for e in case["history"]].count("D-1") == 1


async def test_a_message_stored_for_a_client_that_left_before_its_ack_is_still_applied(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str], mllp: MllpServer
) -> None:
    """A sender that resets the connection right after sending (a fire-and-forget script,
    a sender giving up): the message was stored, so it is applied even though its ACK could
    not be written (else it waited for the worker's sweep, or forever without a worker)."""
    import socket
    import struct

    patient = await _patient(client, runtime, admin_headers, "e-12")
    sock = socket.create_connection(("127.0.0.1", mllp.port))
    sock.sendall(_framed("G-1", "e-12^^^TESTEHR^PI"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST: the ACK cannot be delivered
    history: list[str] = []
    for _ in range(150):
        await asyncio.sleep(0.02)
        case = await case_of(client, admin_headers, patient.case_id)
        history = [e["event_id"] for e in case["history"]]
        if "G-1" in history:
            break
    assert "G-1" in history
