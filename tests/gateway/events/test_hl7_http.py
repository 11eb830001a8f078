"""POST /v1/hl7v2: ACKs (AA / AE / AR with MSA-2 and ERR), dedupe on MSH-10 per sending
facility, patient matching by the EHR's Patient id and a learned MRN."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml
from hl7apy.parser import parse_message
from sqlalchemy import select

from gateway.db.models import ExceptionRecord, InboundMessage
from gateway.runtime import Runtime
from tests.conftest import ApiKeyFactory
from tests.support.events_env import (
    TEST_EHR_HL7,
    Patient,
    add_remote_patient_id,
    case_of,
    hl7_message,
    new_patient,
    send_event,
)

ER7 = {"Content-Type": "application/hl7-v2"}


async def _send(client: httpx.AsyncClient, headers: dict[str, str], message: str) -> list[str]:
    r = await client.post("/v1/hl7v2", content=message.encode(), headers={**headers, **ER7})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/hl7-v2")
    segments = r.text.split("\r")
    assert r.headers["x-hl7-ack-code"] == segments[1].split("|")[1]
    return segments


async def _approved(
    client: httpx.AsyncClient, runtime: Runtime, headers: dict[str, str]
) -> Patient:
    patient = await new_patient(client, headers)
    for i, (event, detail, source) in enumerate(
        [
            ("payment_completed", None, "checkout"),
            ("provider_assigned", None, "ehr"),
            ("decision", "approved", "ehr"),
        ]
    ):
        await send_event(
            client,
            headers,
            patient,
            event,
            detail=detail,
            source=source,
            occurred_at=f"2026-11-24T0{i + 1}:00:00Z",
        )
    await add_remote_patient_id(runtime, patient.patient_id, "e-300")
    return patient


async def _exceptions(runtime: Runtime) -> list[ExceptionRecord]:
    async with runtime.sessionmaker() as session:
        return list(
            (await session.scalars(select(ExceptionRecord).order_by(ExceptionRecord.id))).all()
        )


async def test_accepted_message_is_applied_and_its_mrn_learned(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await _approved(client, runtime, admin_headers)
    order = hl7_message(
        "RDE^O11",
        control_id="RX-1",
        pid3="e-300^^^TESTEHR^PI~MRN-9^^^TESTEHR^MR",
        orc="ORC|NW|PL-1|||IP||||20261124120000-0500",
    )
    ack = await _send(client, admin_headers, order)
    assert ack[1] == "MSA|AA|RX-1"
    parse_message("\r".join(ack)).validate()
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "prescribed"
    last = case["history"][-1]
    assert (last["sender"], last["channel"], last["event_id"], last["reference"]) == (
        "test-ehr-hl7",
        "hl7v2",
        "RX-1",
        "ORC-2:PL-1",
    )
    # the MRN alone now finds the patient
    result = hl7_message(
        "ORU^R01",
        control_id="LAB-1",
        pid3="MRN-9^^^TESTEHR^MR",
        extra=["OBR|1|O1|F1|4548-4^A1c^LN|||20261124130000-0500", "OBX|1|NM|4548-4^A1c^LN||6.1|%"],
    )
    assert (await _send(client, admin_headers, result))[1] == "MSA|AA|LAB-1"
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["history"][-1]["type"] == "result_available"
    assert case["history"][-1]["outcome"] == "recorded"
    assert await _exceptions(runtime) == []


async def test_retransmission_gets_the_same_answer_and_is_applied_once(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    patient = await _approved(client, runtime, admin_headers)
    message = hl7_message(
        "ORM^O01", control_id="ORM-7", pid3="e-300^^^TESTEHR^PI", orc="ORC|NW|PL-7"
    )
    first = await _send(client, admin_headers, message)
    second = await _send(client, admin_headers, message)
    assert first[1] == second[1] == "MSA|AA|ORM-7"
    case = await case_of(client, admin_headers, patient.case_id)
    assert [e["event_id"] for e in case["history"]].count("ORM-7") == 1
    # another message reusing the control id is refused
    other = hl7_message("ORM^O01", control_id="ORM-7", pid3="e-300^^^TESTEHR^PI", orc="ORC|NW|PL-8")
    reused = await _send(client, admin_headers, other)
    assert reused[1].startswith("MSA|AR|ORM-7")
    assert reused[2].startswith("ERR||MSH^1^10|205^Duplicate key identifier^HL70357|E")


async def test_unmappable_message_gets_ae_and_is_kept(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    message = hl7_message(
        "ORM^O01", control_id="ORM-9", pid3="X1^^^ELSEWHERE^MR", orc="ORC|NW|PL-9"
    )
    ack = await _send(client, admin_headers, message)
    assert ack[1].startswith("MSA|AE|ORM-9|")
    assert ack[2].startswith("ERR||PID^1^3|101^Required field missing^HL70357|E")
    [exc] = await _exceptions(runtime)
    assert (exc.kind, exc.channel, exc.sender) == ("unmappable_input", "hl7v2", "TESTEHR")
    async with runtime.sessionmaker() as session:
        stored = await session.get(InboundMessage, exc.inbound_message_id)
    assert stored is not None and stored.status == "failed"
    assert (await _send(client, admin_headers, message))[1].startswith("MSA|AE|ORM-9")


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (hl7_message("ORU^R01", control_id="Z-1", facility="STRANGER", pid3="1^^^X"), "103"),
        (hl7_message("ORU^R01", control_id="Z-2", pid3="1^^^X", version="2.9"), "203"),
        (
            hl7_message("SIU^S12", control_id="Z-3", pid3="1^^^X").replace(
                "SIU^S12^SIU_S12", "ADT^A04^ADT_A01"
            ),
            "200",
        ),
        ("this is not HL7", "100"),
    ],
)
async def test_messages_we_will_not_process_get_ar_and_are_kept_whole(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    message: str,
    code: str,
) -> None:
    ack = await _send(client, admin_headers, message)
    assert ack[1].split("|")[1] == "AR"
    assert f"|{code}^" in ack[2]
    [exc] = await _exceptions(runtime)
    assert exc.kind == "hl7_rejected" and exc.payload == message.encode()
    async with runtime.sessionmaker() as session:
        assert (await session.scalars(select(InboundMessage.id))).all() == []


async def test_ignored_order_control_is_acknowledged(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    message = hl7_message("RDE^O11", control_id="CA-1", pid3="e-1^^^TESTEHR^PI", orc="ORC|CA|PL-1")
    assert (await _send(client, admin_headers, message))[1] == "MSA|AA|CA-1"
    assert await _exceptions(runtime) == []


async def test_http_errors_are_problem_details(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    message = hl7_message("ORU^R01", control_id="Q-1", pid3="1^^^X").encode()
    assert (await client.post("/v1/hl7v2", content=message, headers=ER7)).status_code == 401
    weak = {"Authorization": f"Bearer {await make_api_key('events:write')}"}
    assert (
        await client.post("/v1/hl7v2", content=message, headers={**weak, **ER7})
    ).status_code == 403
    key = {"Authorization": f"Bearer {await make_api_key('hl7:write')}"}
    r = await client.post(
        "/v1/hl7v2", content=message, headers={**key, "Content-Type": "application/json"}
    )
    assert r.status_code == 415
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_several_messages_in_one_body_are_refused_not_half_applied(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """A file of two messages posted at once used to be acknowledged AA with only the
    first applied; a batch file (FHS/BHS) is named as such."""
    first = hl7_message("ADT^A08", control_id="TWO-1", pid3="e-1^^^TESTEHR^PI")
    second = hl7_message("ADT^A08", control_id="TWO-2", pid3="e-1^^^TESTEHR^PI")
    ack = await _send(client, admin_headers, first + "\r\n" + second + "\r\n")
    assert ack[1].startswith("MSA|AR|TWO-1|more than one message")
    batch = "FHS|^~\\&|EHRAPP|TESTEHR\rBHS|^~\\&|EHRAPP|TESTEHR\r" + first + "\rBTS|1\rFTS|1"
    ack = await _send(client, admin_headers, batch)
    assert ack[1].startswith("MSA|AR|TWO-1|an HL7 batch (FHS/BHS) is not accepted")
    async with runtime.sessionmaker() as session:
        assert (await session.scalars(select(InboundMessage.id))).all() == []
    assert [e.kind for e in await _exceptions(runtime)] == ["hl7_rejected", "hl7_rejected"]


async def test_an_unsupported_version_is_refused_with_msa_2_echoing_msh_10(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    message = hl7_message("ADT^A08", control_id="V-29", pid3="e-1^^^TESTEHR^PI", version="2.9")
    msh, msa, err = await _send(client, admin_headers, message)
    assert msh.split("|")[2:6] == ["FHIRGW", "TELE", "EHRAPP", "TESTEHR"]
    assert msh.split("|")[11] == "2.9"
    assert msa.startswith("MSA|AR|V-29|")
    assert err.startswith("ERR||MSH^1^12|203^Unsupported version id^HL70357|E")
    [exc] = await _exceptions(runtime)
    assert exc.sender == "TESTEHR"


@pytest.mark.parametrize(
    ("separator", "tail", "charset"),
    [
        ("\r", "", "utf-8"),
        ("\n", "\n", "utf-8"),
        ("\r\n", "\r\n\r\n  ", "utf-8"),
        ("\r", "\r", "latin-1"),
    ],
)
async def test_line_endings_trailing_blanks_and_charsets(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    separator: str,
    tail: str,
    charset: str,
) -> None:
    patient = await new_patient(client, admin_headers)
    await add_remote_patient_id(runtime, patient.patient_id, "e-77")
    message = hl7_message("ADT^A08", control_id="LE-1", pid3="e-77^^^TESTEHR^PI").replace(
        "DOE^JANE", "M\u00fcller^Jos\u00e9"
    )
    if charset == "latin-1":
        message = message.replace("|P|2.5.1", "|P|2.5.1|||||8859/1")
    body = (message.replace("\r", separator) + tail).encode(charset)
    r = await client.post("/v1/hl7v2", content=body, headers={**admin_headers, **ER7})
    assert r.text.split("\r")[1] == "MSA|AA|LE-1"
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["history"][-1]["event_id"] == "LE-1"


async def test_a_retransmission_with_other_line_endings_is_still_a_duplicate(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """The same message resent from a file (``\\n`` line endings, a trailing newline, or
    still in its MLLP block) is acknowledged as the duplicate it is, not refused as MSH-10
    reused (205)."""
    patient = await _approved(client, runtime, admin_headers)
    message = hl7_message(
        "ORM^O01", control_id="ORM-LE", pid3="e-300^^^TESTEHR^PI", orc="ORC|NW|PL-LE"
    )
    assert (await _send(client, admin_headers, message))[1] == "MSA|AA|ORM-LE"
    for resent in (
        message.replace("\r", "\n") + "\n",
        message.replace("\r", "\r\n"),
        "\x0b" + message + "\r\x1c\r",
    ):
        assert (await _send(client, admin_headers, resent))[1] == "MSA|AA|ORM-LE"
    case = await case_of(client, admin_headers, patient.case_id)
    assert [e["event_id"] for e in case["history"]].count("ORM-LE") == 1
    assert await _exceptions(runtime) == []


async def test_an_unknown_sending_facility_is_told_which_field_and_why(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """103 "Table value not found" at MSH-4 with the reason in ERR-8 and MSA-3 (v2.5.1),
    not 207, which a sender's interface team reads as a crash on our side."""
    message = hl7_message("ORU^R01", control_id="U-1", facility="STRANGER", pid3="1^^^X")
    _, msa, err = await _send(client, admin_headers, message)
    reason = "MSH-4 sending facility is not a sender configured at this gateway"
    assert msa == f"MSA|AR|U-1|{reason}"
    assert err == f"ERR||MSH^1^4|103^Table value not found^HL70357|E||||{reason}"
    [exc] = await _exceptions(runtime)
    assert (exc.kind, exc.sender) == ("hl7_rejected", "STRANGER")


async def test_a_refused_batch_echoes_the_batch_control_id_when_the_sender_wants_it(
    client: httpx.AsyncClient,
    runtime: Runtime,
    admin_headers: dict[str, str],
    profiles_dir: Path,
) -> None:
    """A sender whose profile says ``batch_refusal_msa_2: BHS-11`` gets its BHS-11 in MSA-2;
    the others the first message's MSH-10."""
    partner = {
        **TEST_EHR_HL7,
        "name": "batch-ehr-hl7",
        "hl7": {
            **TEST_EHR_HL7["hl7"],
            "facilities": ["BATCHEHR"],
            "batch_refusal_msa_2": "BHS-11",
        },
    }
    (profiles_dir / "events" / "batch-ehr-hl7.yaml").write_text(yaml.safe_dump(partner))
    r = await client.post("/v1/ops/profiles/reload", headers=admin_headers)
    assert r.status_code == 200, r.text
    for facility, expected in [("BATCHEHR", "BATCH-77"), ("TESTEHR", "B-1")]:
        first = hl7_message("ADT^A08", control_id="B-1", facility=facility, pid3="e-1^^^X^PI")
        batch = "\r".join(
            [
                f"FHS|^~\\&|EHRAPP|{facility}",
                f"BHS|^~\\&|EHRAPP|{facility}|FHIRGW|TELE|20261124||||BATCH-77",
                first,
                "BTS|1",
                "FTS|1",
            ]
        )
        msh, msa, _ = await _send(client, admin_headers, batch)
        assert msa.startswith(f"MSA|AR|{expected}|an HL7 batch")
        assert msh.split("|")[4:6] == ["EHRAPP", facility]


async def test_a_message_hours_in_the_future_gets_ae_and_does_not_make_later_events_late(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    """Issue 15: an ORC-9 read in the wrong zone lands hours ahead; refused (AE 102, kept
    for review), so the correct later event still moves the case."""
    from datetime import UTC, datetime, timedelta

    patient = await _approved(client, runtime, admin_headers)
    ahead = (datetime.now(UTC) + timedelta(hours=5)).strftime("%Y%m%d%H%M%S+0000")
    order = hl7_message(
        "RDE^O11",
        control_id="RX-F",
        pid3="e-300^^^TESTEHR^PI",
        orc=f"ORC|NW|PL-F|||IP||||{ahead}",
    )
    ack = await _send(client, admin_headers, order)
    assert ack[1].startswith("MSA|AE|RX-F")
    assert ack[2].startswith("ERR||ORC^1^9|102^")
    [exc] = await _exceptions(runtime)
    assert exc.kind == "unmappable_input" and exc.channel == "hl7v2"
    assert [p["code"] for p in exc.problems] == ["hl7_102"]
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "approved"  # the future event did not apply
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    order = hl7_message(
        "RDE^O11", control_id="RX-G", pid3="e-300^^^TESTEHR^PI", orc=f"ORC|NW|PL-G|||IP||||{now}"
    )
    assert (await _send(client, admin_headers, order))[1] == "MSA|AA|RX-G"
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "prescribed"
    assert case["history"][-1]["outcome"] != "late"


async def test_a_canonical_event_from_the_future_is_refused(
    client: httpx.AsyncClient, runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    from datetime import UTC, datetime, timedelta

    patient = await new_patient(client, admin_headers)
    ahead = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    body = {
        "event_id": "ev-future",
        "source": "checkout",
        "type": "payment_completed",
        "occurred_at": ahead,
        "patient": patient.identifier,
    }
    r = await client.post("/v1/events", json=body, headers=admin_headers)
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert (error["field"], error["code"]) == ("occurred_at", "future_timestamp")
    case = await case_of(client, admin_headers, patient.case_id)
    assert case["state"] == "intake_received"
    skewed = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()  # clock skew: accepted
    r = await send_event(
        client, admin_headers, patient, "payment_completed", source="checkout", occurred_at=skewed
    )
    assert r.status_code == 202, r.text
