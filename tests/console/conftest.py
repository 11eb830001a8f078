"""Fixtures of the console tests: staff accounts, an in-process client at a loopback
address (the session cookie is not Secure there), and a seeded queue: a case with its
history, an open exception, a dead-lettered delivery with the EHR's OperationOutcome."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest

from gateway.app import create_app
from gateway.db.models import (
    Case,
    CaseEvent,
    Delivery,
    DeliveryStatus,
    ExceptionRecord,
    FhirResource,
)
from gateway.db.types import utcnow
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.staff.service import create_staff

PASSWORD = "correct horse battery staple"

StaffFactory = Callable[[str], Awaitable[str]]


@pytest.fixture
def make_staff(runtime: Runtime) -> StaffFactory:
    """``await make_staff("operator")`` -> the username of a new account with that role
    (password :data:`PASSWORD`)."""
    made = 0

    async def make(role: str) -> str:
        nonlocal made
        made += 1
        username = f"{role}{made}"
        async with runtime.sessionmaker() as session:
            await create_staff(
                session,
                username=username,
                password=PASSWORD,
                role=role,
                display_name=f"{role.title()} {made}",
                now=utcnow(),
            )
            await session.commit()
        return username

    return make


@pytest.fixture
async def console(settings: Settings, runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app at http://127.0.0.1 (lifespan run, no worker)."""
    app = create_app(settings, runtime=runtime, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 50000)),
            base_url="http://127.0.0.1",
        ) as http,
    ):
        yield http


def csrf_of(html: str) -> str:
    """The CSRF token of the first form of a page."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


async def sign_in(http: httpx.AsyncClient, username: str, password: str = PASSWORD) -> str:
    """Sign in through the form; returns the CSRF token of the session's forms."""
    page = await http.get("/console/login")
    assert page.status_code == 200
    answer = await http.post(
        "/console/login",
        data={"csrf_token": csrf_of(page.text), "username": username, "password": password},
    )
    assert answer.status_code == 303, answer.text
    overview = await http.get("/console")
    assert overview.status_code == 200, overview.text
    return csrf_of(overview.text)


@dataclass(frozen=True)
class Seeded:
    """Ids of the seeded rows."""

    case_id: str
    patient_id: str
    exception_id: int
    delivery_id: int
    target: str


OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "invariant",
            "details": {"text": "Patient.identifier: a system is required"},
            "expression": ["Patient.identifier[0].system"],
        }
    ],
}


async def seed(runtime: Runtime, *, n: int = 1) -> Seeded:
    """A case stuck in ``awaiting_review`` past its SLA, its patient's resource, an open
    exception about it, and a delivery to ``example-ehr`` dead-lettered with a 422 and
    an OperationOutcome."""
    now = utcnow()
    async with runtime.sessionmaker() as session:
        case = Case(
            id=f"case-{n}",
            patient_id=f"pat-{n}",
            program="weight-loss",
            state="awaiting_review",
            opened_at=now - timedelta(days=2),
            updated_at=now - timedelta(days=1),
            state_entered_at=now - timedelta(days=1),
            sla_due_at=now - timedelta(hours=2),
            sla_timer="review_overdue",
        )
        session.add(case)
        session.add(
            CaseEvent(
                case_id=case.id,
                source="intake",
                sender="intake",
                channel="intake",
                event_id=f"evt-{n}",
                type="intake_submitted",
                occurred_at=now - timedelta(days=2),
                received_at=now - timedelta(days=2),
                from_state=None,
                to_state="awaiting_review",
                outcome="applied",
                principal="client:intake-app",
                inbound_message_id=f"msg-{n}",
            )
        )
        session.add(
            FhirResource(
                resource_type="Patient",
                id=f"pat-{n}",
                version_id=2,
                resource={"resourceType": "Patient", "id": f"pat-{n}"},
                patient_id=f"pat-{n}",
            )
        )
        exception = ExceptionRecord(
            kind="transition_not_allowed",
            channel="events",
            sender="pharmacy",
            case_id=case.id,
            problems=[
                {"location": "type", "code": "transition_not_allowed", "message": "not from here"}
            ],
        )
        session.add(exception)
        delivery = Delivery(
            kind="ehr",
            target="example-ehr",
            ordering_key=case.patient_id,
            inbound_message_id=f"msg-{n}",
            resource_refs=[f"Patient/pat-{n}"],
            status=DeliveryStatus.DEAD,
            attempts=1,
            last_status_code=422,
            last_error="HTTP 422",
            operation_outcome=OUTCOME,
            dead_reason="rejected",
            created_at=now - timedelta(hours=3),
            last_attempt_at=now - timedelta(hours=3),
        )
        session.add(delivery)
        await session.commit()
        return Seeded(case.id, case.patient_id, exception.id, delivery.id, "example-ehr")
