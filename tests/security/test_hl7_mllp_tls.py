"""HL7 v2 senders over MLLP with mutual TLS, spoken to with python-hl7's asyncio MLLP
client (``hl7.mllp.open_hl7_connection`` with an ``ssl`` context): a certificate speaks
only for the partners whose ``hl7.certificates`` name it; anything else is refused with
AR and kept for review; the certificate is recorded as the principal of each event.

Certificates are made at test time (``tests/support/tls_certs.py``)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
import yaml
from hl7.mllp import open_hl7_connection
from sqlalchemy import select
from typer.testing import CliRunner

from gateway.cli import app as cli_app
from gateway.db.models import AuditEntry, CaseEvent, ExceptionRecord, InboundMessage
from gateway.events.apply import apply_received
from gateway.hl7.mllp import MllpConfigError, MllpServer, mllp_tls_context
from gateway.hl7.service import Hl7Reply
from gateway.runtime import Runtime
from gateway.settings import BUNDLED_PROFILES_DIR
from tests.support.events_env import (
    BEACON_ENV,
    BEACON_SECRET,
    NOTIFY_ENV,
    NOTIFY_SECRET,
    PHARMACY_ENV,
    PHARMACY_SECRET,
    TEST_EHR_HL7,
    add_remote_patient_id,
    case_of,
    events_profiles,
    hl7_message,
    new_patient,
)
from tests.support.tls_certs import Authority, Issued, client_context

PHARMACY_CN = "sunrise-rx-engine"


class Pki:
    """The CA the listener trusts, its server certificate, and clients."""

    def __init__(self, directory: Path) -> None:
        self.ca = Authority.create(directory, "partners")
        self.server = self.ca.issue("mllp-listener", server=True)
        self.ehr = self.ca.issue("ehr-engine")  # named by fingerprint in test-ehr-hl7
        self.pharmacy = self.ca.issue(PHARMACY_CN)  # named by CN in sunrise-pharmacy
        self.stranger = self.ca.issue("stranger")  # issued by the CA, named by no partner
        self.rogue_ca = Authority.create(directory, "rogue")
        self.rogue = self.rogue_ca.issue("ehr-engine")  # same CN, another CA

    def context(self, client: Issued | None) -> ssl.SSLContext:
        return client_context(self.ca, client)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def profiles_dir(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Path:
    for env, value in (
        (NOTIFY_ENV, NOTIFY_SECRET),
        (PHARMACY_ENV, PHARMACY_SECRET),
        (BEACON_ENV, BEACON_SECRET),
    ):
        monkeypatch.setenv(env, value)
    ehr_feed: dict[str, Any] = {
        **TEST_EHR_HL7,
        "hl7": {**TEST_EHR_HL7["hl7"], "certificates": [f"sha256:{pki.ehr.sha256}"]},
    }
    pharmacy = yaml.safe_load((BUNDLED_PROFILES_DIR / "events/sunrise-pharmacy.yaml").read_text())
    pharmacy["hl7"]["certificates"] = [f"CN={PHARMACY_CN}"]
    return events_profiles(tmp_path / "profiles", partners=[ehr_feed, pharmacy])


@pytest.fixture
async def mllp(runtime: Runtime, pki: Pki) -> AsyncIterator[MllpServer]:
    async def apply(reply: Hl7Reply) -> object:
        assert reply.message is not None
        return await apply_received(runtime, reply.message, prepared=reply.prepared)

    tls = mllp_tls_context(
        cert_file=str(pki.server.cert),
        key_file=str(pki.server.key),
        client_ca_file=str(pki.ca.ca_file),
    )
    server = MllpServer(runtime, port=0, after_store=apply, tls=tls, read_timeout_s=5)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def _message(facility: str, application: str, control_id: str, **kw: Any) -> str:
    """An ER7 message from ``facility`` (MSH-4) and ``application`` (MSH-3)."""
    text = hl7_message(kw.pop("type", "ADT^A08"), control_id=control_id, facility=facility, **kw)
    return text.replace("|EHRAPP|", f"|{application}|", 1)


def _dispense(control_id: str) -> str:
    """A pharmacy dispense (RDS^O13): the message that moved a case to ``dispensed``."""
    return _message(
        "SUNRISE-RX",
        "RXSYS",
        control_id,
        type="RDS^O13",
        pid3="MRN-1^^^EXAMPLEEHR^MR",
        orc="ORC|RE|P1",
    )


async def _send(port: int, context: ssl.SSLContext, message: str) -> tuple[str, str]:
    """Send one message with python-hl7's client; (MSA-1, MSA-2) of the ACK."""
    reader, writer = await open_hl7_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )
    try:
        writer.writemessage(hl7.parse(message))
        await writer.drain()
        ack = await asyncio.wait_for(reader.readmessage(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    msa = ack.segment("MSA")
    return str(msa[1]), str(msa[2])


async def _settle(server: MllpServer) -> None:
    for _ in range(300):
        if not server._background:
            return
        await asyncio.sleep(0.01)


async def _rows(runtime: Runtime, model: Any) -> list[Any]:
    async with runtime.sessionmaker() as session:
        return list((await session.scalars(select(model))).all())


async def test_a_certificate_speaks_for_its_partner_and_is_recorded_in_the_case_history(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    mllp: MllpServer,
    pki: Pki,
) -> None:
    patient = await new_patient(client, admin_headers)
    await add_remote_patient_id(runtime, patient.patient_id, "e-1")
    message = _message("TESTEHR", "EHRAPP", "T-1", pid3="e-1^^^TESTEHR^PI")
    assert await _send(mllp.port, pki.context(pki.ehr), message) == ("AA", "T-1")
    await _settle(mllp)
    case = await case_of(client, admin_headers, patient.case_id)
    [event] = [e for e in case["history"] if e["channel"] == "hl7v2"]
    assert event["principal"] == f"cert:ehr-engine:sha256:{pki.ehr.sha256}"
    [stored] = [m for m in await _rows(runtime, InboundMessage) if m.channel == "hl7v2"]
    assert stored.principal == event["principal"]
    # the audit trail's agent for the connection's work is the certificate too
    agents = {(a.agent_kind, a.actor) for a in await _rows(runtime, AuditEntry)}
    assert ("client", event["principal"]) in agents


async def test_the_ehr_certificate_cannot_send_as_the_pharmacy(
    runtime: Runtime, mllp: MllpServer, pki: Pki
) -> None:
    """The issue's finding: MSH-4 SUNRISE-RX moved a case to ``dispensed`` as the
    pharmacy. With the EHR's certificate it is refused with AR and kept for review."""
    assert await _send(mllp.port, pki.context(pki.ehr), _dispense("X-1")) == ("AR", "X-1")
    assert [m for m in await _rows(runtime, InboundMessage) if m.channel == "hl7v2"] == []
    assert await _rows(runtime, CaseEvent) == []
    [kept] = await _rows(runtime, ExceptionRecord)
    assert (kept.kind, kept.sender) == ("hl7_rejected", "SUNRISE-RX")
    assert kept.payload is not None and b"RDS^O13" in kept.payload
    assert [p["code"] for p in kept.problems] == ["hl7_103"]
    assert kept.principal == f"cert:ehr-engine:sha256:{pki.ehr.sha256}"
    # control: the pharmacy's own certificate (named by CN) is accepted
    assert await _send(mllp.port, pki.context(pki.pharmacy), _dispense("X-2")) == ("AA", "X-2")


async def test_the_ehr_certificate_cannot_use_the_pharmacys_application(
    runtime: Runtime, mllp: MllpServer, pki: Pki
) -> None:
    """MSH-4 its own, MSH-3 another partner's application: refused too."""
    message = _message("TESTEHR", "RXSYS", "X-3", pid3="e-1^^^TESTEHR^PI")
    assert await _send(mllp.port, pki.context(pki.ehr), message) == ("AR", "X-3")
    [kept] = await _rows(runtime, ExceptionRecord)
    assert "MSH-3" in kept.problems[0]["message"]


async def test_a_certificate_no_partner_names_may_send_nothing(
    runtime: Runtime, mllp: MllpServer, pki: Pki
) -> None:
    message = _message("TESTEHR", "EHRAPP", "S-1", pid3="e-1^^^TESTEHR^PI")
    assert await _send(mllp.port, pki.context(pki.stranger), message) == ("AR", "S-1")
    assert [m for m in await _rows(runtime, InboundMessage) if m.channel == "hl7v2"] == []
    assert len(await _rows(runtime, ExceptionRecord)) == 1


@pytest.mark.parametrize("who", ["rogue", "none"])
async def test_a_client_without_a_certificate_of_the_ca_cannot_connect(
    runtime: Runtime, mllp: MllpServer, pki: Pki, who: str
) -> None:
    """A certificate from another CA (with the EHR's common name), or none at all: the
    handshake fails; nothing is stored."""
    context = pki.context(pki.rogue if who == "rogue" else None)
    message = _message("TESTEHR", "EHRAPP", "R-1", pid3="e-1^^^TESTEHR^PI")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _send(mllp.port, context, message)
    assert [m for m in await _rows(runtime, InboundMessage) if m.channel == "hl7v2"] == []
    assert await _rows(runtime, ExceptionRecord) == []


async def test_plaintext_mllp_to_the_tls_listener_gets_no_ack(
    runtime: Runtime, mllp: MllpServer
) -> None:
    reader, writer = await open_hl7_connection("127.0.0.1", mllp.port)
    try:
        writer.writemessage(hl7.parse(_message("TESTEHR", "EHRAPP", "P-1", pid3="x")))
        await writer.drain()
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, TimeoutError)):
            await asyncio.wait_for(reader.readmessage(), 5)
    finally:
        writer.close()
    assert [m for m in await _rows(runtime, InboundMessage) if m.channel == "hl7v2"] == []


def test_the_listener_needs_tls_or_plaintext_allowed(runtime: Runtime) -> None:
    with pytest.raises(MllpConfigError):
        MllpServer(runtime, port=0)


def test_the_mllp_command_refuses_to_start_without_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profiles_dir: Path
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("GATEWAY_PROFILES_DIR", str(profiles_dir))
    for name in ("CERT", "KEY", "CLIENT_CA"):
        monkeypatch.delenv(f"GATEWAY_MLLP_TLS_{name}_FILE", raising=False)
    monkeypatch.delenv("GATEWAY_MLLP_ALLOW_PLAINTEXT", raising=False)
    result = CliRunner().invoke(cli_app, ["mllp"])
    assert result.exit_code == 2, result.output
    assert "GATEWAY_MLLP_ALLOW_PLAINTEXT" in result.output
    monkeypatch.setenv("GATEWAY_MLLP_TLS_CERT_FILE", str(tmp_path / "missing.pem"))
    result = CliRunner().invoke(cli_app, ["mllp"])
    assert result.exit_code == 2, result.output
    assert "all three" in result.output
