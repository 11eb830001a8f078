"""HL7 v2 over HTTP: an API client bound to its partners (``clients create --partner``)
may not send a message whose MSH-4 or MSH-3 is another partner's (AR, kept for review),
and the client is recorded as the principal of each event it sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.db.models import CaseEvent, ExceptionRecord, InboundMessage
from gateway.runtime import Runtime
from tests.conftest import ApiKeyFactory
from tests.support.events_env import (
    BEACON_ENV,
    BEACON_SECRET,
    NOTIFY_ENV,
    NOTIFY_SECRET,
    PHARMACY_ENV,
    PHARMACY_SECRET,
    add_remote_patient_id,
    case_of,
    events_profiles,
    hl7_message,
    new_patient,
)

ER7 = {"Content-Type": "application/hl7-v2"}


@pytest.fixture
def profiles_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for env, value in (
        (NOTIFY_ENV, NOTIFY_SECRET),
        (PHARMACY_ENV, PHARMACY_SECRET),
        (BEACON_ENV, BEACON_SECRET),
    ):
        monkeypatch.setenv(env, value)
    return events_profiles(tmp_path / "profiles")


def _message(facility: str, application: str, control_id: str, **kw: Any) -> str:
    text = hl7_message(kw.pop("type", "ADT^A08"), control_id=control_id, facility=facility, **kw)
    return text.replace("|EHRAPP|", f"|{application}|", 1)


def _dispense(control_id: str) -> str:
    return _message(
        "SUNRISE-RX",
        "RXSYS",
        control_id,
        type="RDS^O13",
        pid3="MRN-1^^^EXAMPLEEHR^MR",
        orc="ORC|RE|P1",
    )


async def _post(client: httpx.AsyncClient, key: str, message: str) -> tuple[str, str]:
    r = await client.post(
        "/v1/hl7v2", content=message.encode(), headers={"Authorization": f"Bearer {key}", **ER7}
    )
    assert r.status_code == 200, r.text
    msa = r.text.split("\r")[1].split("|")
    return msa[1], msa[2]


async def _rows(runtime: Runtime, model: Any) -> list[Any]:
    async with runtime.sessionmaker() as session:
        return list((await session.scalars(select(model))).all())


async def test_a_client_bound_to_the_ehr_feed_cannot_send_as_the_pharmacy(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    ehr_key = await make_api_key("hl7:write", name="ehr-engine", partners=["test-ehr-hl7"])
    assert await _post(client, ehr_key, _dispense("H-1")) == ("AR", "H-1")
    assert [m for m in await _rows(runtime, InboundMessage) if m.channel == "hl7v2"] == []
    assert await _rows(runtime, CaseEvent) == []
    [kept] = await _rows(runtime, ExceptionRecord)
    assert (kept.kind, kept.sender) == ("hl7_rejected", "SUNRISE-RX")
    assert kept.payload is not None and b"RDS^O13" in kept.payload
    assert kept.principal == "client:ehr-engine"
    # control: a client bound to the pharmacy sends the same message
    rx_key = await make_api_key("hl7:write", name="rx", partners=["sunrise-pharmacy"])
    assert await _post(client, rx_key, _dispense("H-2")) == ("AA", "H-2")


async def test_a_bound_client_cannot_use_another_partners_application(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    key = await make_api_key("hl7:write", partners=["test-ehr-hl7"])
    message = _message("TESTEHR", "RXSYS", "H-3", pid3="e-1^^^TESTEHR^PI")
    assert await _post(client, key, message) == ("AR", "H-3")
    [kept] = await _rows(runtime, ExceptionRecord)
    assert kept.problems[0]["location"] == "MSH-3"


async def test_the_client_is_recorded_as_the_principal_of_its_events(
    client: httpx.AsyncClient,
    runtime: Runtime,
    make_api_key: ApiKeyFactory,
    admin_headers: dict[str, str],
) -> None:
    patient = await new_patient(client, admin_headers)
    await add_remote_patient_id(runtime, patient.patient_id, "e-7")
    key = await make_api_key("hl7:write", name="ehr-engine", partners=["test-ehr-hl7"])
    message = _message("TESTEHR", "EHRAPP", "H-4", pid3="e-7^^^TESTEHR^PI")
    assert await _post(client, key, message) == ("AA", "H-4")
    case = await case_of(client, admin_headers, patient.case_id)
    by_type = {e["type"]: e["principal"] for e in case["history"]}
    assert by_type["demographics_updated"] == "client:ehr-engine"
    # the intake that opened the case was sent by the admin client
    assert by_type["intake_submitted"].startswith("client:test-")


async def test_an_unbound_client_may_send_as_any_partner(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    """Without ``--partner`` the behaviour before the binding holds (the CLI warns)."""
    key = await make_api_key("hl7:write")
    assert await _post(client, key, _dispense("H-5")) == ("AA", "H-5")
