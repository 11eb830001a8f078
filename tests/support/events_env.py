"""Helpers for clinical-event tests: profiles with a test EHR target that takes
notifications and a test HL7 feed, signed partner webhooks, HL7 messages, a local
subscriber server, and shortcuts to drive a case."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import shutil
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.db.models import RemoteId
from gateway.runtime import Runtime
from gateway.settings import BUNDLED_PROFILES_DIR
from tests import samples

TARGET = "test-ehr"
NOTIFY_ENV = "TEST_EHR_NOTIFY_SECRET"
NOTIFY_SECRET = "notify-secret-for-tests"
PHARMACY_ENV = "SUNRISE_PHARMACY_WEBHOOK_SECRET"
PHARMACY_SECRET = "whsec_" + base64.b64encode(b"p" * 32).decode()
BEACON_ENV = "BEACON_WEBHOOK_SECRET"
BEACON_SECRET = "beacon-secret-for-tests"
EHR_FACILITY = "TESTEHR"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5.1"
EXTERNAL_SYSTEM = "https://fhir-gateway.example.org/sid/external-patient-id"

EVENTS_BLOCK: dict[str, Any] = {
    "source": "ehr",
    "notifications": {"header": "Authorization", "prefix": "Bearer ", "secret_env": NOTIFY_ENV},
    "unmatched": "ignore",
    "resources": [
        {
            "resource": "Task",
            "code": ["approve"],
            "status": ["accepted"],
            "event": "provider_assigned",
        },
        {
            "resource": "Task",
            "code": ["approve"],
            "status": ["completed"],
            "business_status": ["approved"],
            "event": "decision:approved",
        },
        {
            "resource": "Task",
            "code": ["approve"],
            "status": ["completed"],
            "business_status": ["denied"],
            "event": "decision:denied",
        },
        {"resource": "Task", "status": ["cancelled"], "ignore": True},
        {
            "resource": "MedicationRequest",
            "status": ["active"],
            "intent": ["order"],
            "event": "prescription_sent",
        },
        {"resource": "Encounter", "status": ["planned"], "event": "appointment_booked"},
        {"resource": "CommunicationRequest", "status": ["active"], "event": "follow_up_required"},
        {"resource": "ServiceRequest", "status": ["active"], "event": "follow_up_required"},
    ],
}

TEST_EHR_HL7: dict[str, Any] = {
    "kind": "partner",
    "name": "test-ehr-hl7",
    "source": "ehr",
    "hl7": {
        "facilities": [EHR_FACILITY],
        "timezone": "America/New_York",
        "patient_identifiers": [
            {"authority": EHR_FACILITY, "type": "PI", "remote_id_of": TARGET},
            {"authority": EHR_FACILITY, "type": "MR", "system": MRN_SYSTEM},
            {"authority": "TELEHEALTH", "system": "{base}/external-patient-id"},
        ],
        "messages": [
            {"message": "ORM^O01", "orc_1": ["NW"], "event": "prescription_sent"},
            {"message": "RDE^O11", "orc_1": ["NW"], "event": "prescription_sent"},
            {"message": "RDE^O11", "orc_1": ["CA"], "ignore": True},
            {"message": "ORU^R01", "event": "result_available"},
            {"message": "ADT^A08", "event": "demographics_updated"},
            {"message": "SIU^S12", "event": "appointment_booked"},
        ],
    },
}


def events_profiles(
    dest: Path,
    *,
    fhir_base: str = "http://127.0.0.1:9/fhir",
    token_url: str | None = None,
    enabled: bool = False,
    workflow: dict[str, Any] | None = None,
    partners: list[dict[str, Any]] | None = None,
) -> Path:
    """The bundled profiles plus ``test-ehr`` (with an ``events`` block) and the
    ``test-ehr-hl7`` feed; ``workflow`` keys override ``workflow.yaml``."""
    shutil.copytree(BUNDLED_PROFILES_DIR, dest)
    target: dict[str, Any] = {
        "kind": "ehr",
        "name": TARGET,
        "enabled": enabled,
        "base_url": fhir_base,
        "timeout_s": 2,
        "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05, "max_attempts": 6},
        "events": EVENTS_BLOCK,
    }
    if token_url:
        target["auth"] = {
            "method": "client_secret_basic",
            "token_url": token_url,
            "client_id": "gateway",
            "client_secret_env": "TEST_EHR_CLIENT_SECRET",
            "scopes": ["system/*.cruds"],
        }
    (dest / "ehr" / f"{TARGET}.yaml").write_text(yaml.safe_dump(target))
    for partner in [TEST_EHR_HL7, *(partners or [])]:
        (dest / "events" / f"{partner['name']}.yaml").write_text(yaml.safe_dump(partner))
    if workflow:
        data = yaml.safe_load((dest / "workflow.yaml").read_text())
        data.update(workflow)
        (dest / "workflow.yaml").write_text(yaml.safe_dump(data))
    return dest


# --------------------------------------------------------------------------- patients


@dataclass
class Patient:
    """A patient created through the intake API, with its case."""

    patient_id: str
    external_id: str
    case_id: str

    @property
    def identifier(self) -> dict[str, str]:
        return {"system": EXTERNAL_SYSTEM, "value": self.external_id}


async def new_patient(client: httpx.AsyncClient, headers: dict[str, str]) -> Patient:
    """Submit a sample intake: a new Patient with a case in ``intake_received``."""
    body = samples.intake()
    r = await client.post("/v1/intake-submissions", json=body, headers=headers)
    assert r.status_code == 202, r.text
    out = r.json()
    return Patient(out["patient"]["id"], body["patient"]["external_id"], out["case"]["id"])


async def add_remote_patient_id(runtime: Runtime, patient_id: str, remote_id: str) -> None:
    """Record the EHR's Patient id for our patient, as a delivery to ``test-ehr`` would."""
    async with runtime.sessionmaker() as session:
        session.add(
            RemoteId(
                target=TARGET,
                resource_type="Patient",
                local_id=patient_id,
                remote_id=remote_id,
                updated_at=datetime.now(UTC),
            )
        )
        await session.commit()


async def remote_patient_id(runtime: Runtime, patient_id: str) -> str | None:
    """The EHR's id for our patient, if delivered."""
    async with runtime.sessionmaker() as session:
        return await session.scalar(
            select(RemoteId.remote_id).where(
                RemoteId.target == TARGET,
                RemoteId.resource_type == "Patient",
                RemoteId.local_id == patient_id,
            )
        )


async def send_event(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    patient: Patient,
    event_type: str,
    *,
    detail: str | None = None,
    source: str = "ehr",
    occurred_at: str,
    event_id: str | None = None,
) -> httpx.Response:
    """A canonical event through ``POST /v1/events`` (applied before the call returns)."""
    body: dict[str, Any] = {
        "event_id": event_id or f"ev-{uuid.uuid4().hex[:10]}",
        "source": source,
        "type": event_type,
        "occurred_at": occurred_at,
        "patient": patient.identifier,
    }
    if detail:
        body["status"] = detail
    r = await client.post("/v1/events", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r


async def case_of(
    client: httpx.AsyncClient, headers: dict[str, str], case_id: str
) -> dict[str, Any]:
    r = await client.get(f"/v1/cases/{case_id}", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


# --------------------------------------------------------------------------- HL7


def hl7_message(
    message_type: str,
    *,
    control_id: str,
    facility: str = EHR_FACILITY,
    pid3: str = "",
    orc: str = "",
    extra: list[str] | None = None,
    version: str = "2.5.1",
    when: str = "20261124100000-0500",
) -> str:
    """An ER7 message (``\\r`` separators) with MSH, PID and optional ORC / segments."""
    code, trigger = message_type.split("^")
    structure = {
        "ORM": "ORM_O01",
        "RDE": "RDE_O11",
        "RDS": "RDS_O13",
        "ORU": "ORU_R01",
        "ADT": "ADT_A01",
        "SIU": "SIU_S12",
    }[code]
    segments = [
        f"MSH|^~\\&|EHRAPP|{facility}|FHIRGW|TELE|{when}||{code}^{trigger}^{structure}|{control_id}|P|{version}",
    ]
    if message_type == "ADT^A08":
        segments.append(f"EVN|A08|{when}")
    if message_type == "SIU^S12":
        segments.append("SCH|APT1|APT1F|||||||30|MIN|^^30^20261125090000^20261125093000")
    segments.append(f"PID|1||{pid3}||DOE^JANE||19900401|F")
    if orc:
        segments.append(orc)
    segments += extra or []
    return "\r".join(segments) + "\r"


# --------------------------------------------------------------------------- webhooks


def pharmacy_webhook(
    patient_external_id: str | None,
    status: str,
    *,
    event_id: str | None = None,
    created_at: str = "2026-11-24T15:00:00Z",
    mrn: str | None = None,
    pharmacy_patient_id: str | None = None,
) -> bytes:
    """A Sunrise pharmacy webhook body (see profiles/events/sunrise-pharmacy.yaml)."""
    patient: dict[str, Any] = {}
    if patient_external_id:
        patient["external_id"] = patient_external_id
    if mrn:
        patient["mrn"] = mrn
    if pharmacy_patient_id:
        patient["pharmacy_patient_id"] = pharmacy_patient_id
    return json.dumps(
        {
            "id": event_id or f"evt_{uuid.uuid4().hex[:12]}",
            "type": "prescription.status_changed",
            "created_at": created_at,
            "data": {"prescription_id": "rx_81723", "status": status, "patient": patient},
        }
    ).encode()


def standard_webhook_headers(
    body: bytes,
    *,
    secret: str = PHARMACY_SECRET,
    msg_id: str | None = None,
    at: float | None = None,
) -> dict[str, str]:
    """Standard Webhooks headers signed with the reference library."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = datetime.fromtimestamp(int(at if at is not None else time.time()), tz=UTC)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(ts.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, ts, body.decode()),
    }


def beacon_headers(
    body: bytes, *, secret: str = BEACON_SECRET, at: float | None = None
) -> dict[str, str]:
    """The Beacon network's HMAC-SHA256 headers (hex over ``<timestamp>.<body>``)."""
    ts = str(int(at if at is not None else time.time()))
    digest = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "X-Beacon-Timestamp": ts,
        "X-Beacon-Signature": f"sha256={digest}",
    }


# --------------------------------------------------------------------------- subscriber


@dataclass
class Received:
    """One webhook as the subscriber got it."""

    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any]


@dataclass
class Subscriber:
    """A local ops subscriber: verifies every webhook with the ``standardwebhooks``
    library (rejecting bad ones with 400, as a real one would) and records it.
    ``fail_next`` answers that many requests with ``fail_status`` first."""

    secret: str
    received: list[Received] = field(default_factory=list)
    rejected: int = 0
    fail_next: int = 0
    fail_status: int = 503
    attempts: int = 0

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        self.attempts += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            return Response(status_code=self.fail_status)
        headers = {k: v for k, v in request.headers.items()}
        try:
            Webhook(self.secret).verify(body, headers)
        except Exception:
            self.rejected += 1
            return Response(status_code=400)
        self.received.append(Received(headers, body, json.loads(body)))
        return Response(status_code=204)


@contextlib.asynccontextmanager
async def run_subscriber(subscriber: Subscriber) -> AsyncIterator[str]:
    """Serve ``subscriber`` on 127.0.0.1 (a uvicorn thread); yields its URL."""
    app = Starlette(routes=[Route("/hooks", subscriber.endpoint, methods=["POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(2000):  # uvicorn sets a flag, not an event
            if server.started:
                break
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}/hooks"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 5)
        sock.close()
