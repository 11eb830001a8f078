"""HL7 v2 -> ClinicalEvent (golden files in golden/hl7v2: message beside expected event),
the errors answered with AE/AR, DTM parsing and the ACK."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7apy.parser import parse_message

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers.errors import MappingError
from mappers.hl7v2 import (
    Hl7MessageError,
    _build_ack,
    build_ack,
    hl7v2_to_clinical_event,
    normalize_er7,
    parse_er7,
    parse_hl7_datetime,
    refused_control_id,
    sender_not_accepted,
)
from mappers.profiles import PartnerProfile, ProfileSet, load_profiles
from mappers.profiles.events import Hl7Spec

GOLDEN = Path(__file__).parent / "golden" / "hl7v2"
BASE = "https://fhir-gateway.example.org/sid"
NOW = datetime(2026, 11, 24, 15, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_profiles(BUNDLED_PROFILES_DIR)


def _event_json(event: Any) -> dict[str, Any]:
    return {
        "source": event.source,
        "sender": event.sender,
        "event_id": event.event_id,
        "type": event.type,
        "detail": event.detail,
        "occurred_at": event.occurred_at.isoformat(),
        "patient": [[r.kind, r.value, r.system, r.target] for r in event.patient],
        "reference": event.reference,
    }


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.hl7")))
def test_golden_message_maps_to_expected_event(name: str, profiles: ProfileSet) -> None:
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    message = parse_er7((GOLDEN / f"{name}.hl7").read_bytes().decode())
    partner = profiles.hl7_sender(message.sending_facility)
    assert partner is not None and partner.name == expected["partner"]
    event = hl7v2_to_clinical_event(message, partner, identifier_base=BASE)
    assert event is not None
    got = _event_json(event)
    want = expected["event"]
    assert datetime.fromisoformat(got.pop("occurred_at")) == datetime.fromisoformat(
        want.pop("occurred_at")
    )
    assert got == want


def test_line_endings_are_normalized_so_nothing_after_msh_is_lost() -> None:
    text = "MSH|^~\\&|A|B|C|D|20260101||ADT^A08|1|P|2.5\r\nEVN|A08\nPID|1||X\r\n\r\n"
    assert normalize_er7(text) == "MSH|^~\\&|A|B|C|D|20260101||ADT^A08|1|P|2.5\rEVN|A08\rPID|1||X"
    assert [s[0] for s in parse_er7(text).segments] == ["MSH", "EVN", "PID"]
    # a message still in its MLLP block (hl7apy's to_mllp(), posted over HTTP)
    framed = "\x0b" + text.replace("\r\n", "\r").rstrip("\r") + "\r\x1c\r"
    assert normalize_er7(framed) == normalize_er7(text)
    assert parse_er7(framed).segments[-1] == ("PID", "1", "", "X")


def _partner(profiles: ProfileSet, name: str = "example-ehr-hl7") -> PartnerProfile:
    return profiles.partners[name]


MSH = "MSH|^~\\&|EPICRX|EXAMPLEEHR|FHIRGW|TELE|20261124093000||{type}|CTRL1|P|{version}"


@pytest.mark.parametrize(
    ("text", "ack_code", "hl7_code", "location"),
    [
        ("PID|1||X\r", "AR", 100, "MSH"),
        (MSH.format(type="ORM^O01", version="2.9") + "\rPID|1||X", "AR", 203, "MSH-12"),
        ("MSH|^~\\&|A|EXAMPLEEHR|C|D|20261124||ORM^O01||P|2.5.1\rPID|1||X", "AR", 101, "MSH-10"),
        ("MSH|^~\\&|A|EXAMPLEEHR|C|D|20261124||ORM|C1|P|2.5.1\rPID|1||X", "AR", 101, "MSH-9"),
        ("MSH|^^^^|A|EXAMPLEEHR|C|D|20261124||ORM^O01|C1|P|2.5.1", "AR", 100, "MSH-2"),
        # an HL7 batch file, and two messages pasted one after the other
        ("FHS|^~\\&\rBHS|^~\\&\r" + MSH.format(type="ORM^O01", version="2.5"), "AR", 100, "FHS"),
        (
            MSH.format(type="ORM^O01", version="2.5")
            + "\r"
            + MSH.format(type="ORM^O01", version="2.5"),
            "AR",
            100,
            "MSH",
        ),
    ],
)
def test_unreadable_envelopes_are_refused(
    text: str, ack_code: str, hl7_code: int, location: str
) -> None:
    with pytest.raises(Hl7MessageError) as err:
        parse_er7(text)
    assert (err.value.ack_code, err.value.hl7_code, err.value.location) == (
        ack_code,
        hl7_code,
        location,
    )


@pytest.mark.parametrize(
    ("text", "ack_code", "hl7_code", "location"),
    [
        # a message type the sender's table does not list
        (MSH.format(type="ADT^A04^ADT_A01", version="2.5.1") + "\rPID|1||X", "AR", 200, "MSH-9"),
        # no PID
        (MSH.format(type="ORM^O01^ORM_O01", version="2.5.1") + "\rORC|NW|P1", "AE", 100, "PID"),
        # no ORC-1
        (
            MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
            + "\rPID|1||M1^^^EXAMPLEEHR^MR\rORC||P1",
            "AE",
            101,
            "ORC-1",
        ),
        # an order control the table does not map
        (
            MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
            + "\rPID|1||M1^^^EXAMPLEEHR^MR\rORC|XX|P1",
            "AE",
            103,
            "ORC-1",
        ),
        # PID-3 with an identifier of no configured kind
        (
            MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
            + "\rPID|1||M1^^^OTHER^MR\rORC|NW|P1",
            "AE",
            101,
            "PID-3",
        ),
        # an order time that is not a time
        (
            MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
            + "\rPID|1||M1^^^EXAMPLEEHR^MR\rORC|NW|P1|||||||yesterday",
            "AE",
            102,
            "ORC-9",
        ),
    ],
)
def test_unmappable_messages_say_why_and_where(
    profiles: ProfileSet, text: str, ack_code: str, hl7_code: int, location: str
) -> None:
    message = parse_er7(text)
    with pytest.raises(Hl7MessageError) as err:
        hl7v2_to_clinical_event(message, _partner(profiles), identifier_base=BASE)
    assert (err.value.ack_code, err.value.hl7_code, err.value.location) == (
        ack_code,
        hl7_code,
        location,
    )
    assert "M1" not in str(err.value)


def test_ignore_rows_give_no_event(profiles: ProfileSet) -> None:
    text = (
        MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
        + "\rPID|1||M1^^^EXAMPLEEHR^MR\rORC|CA|P1"
    )
    assert (
        hl7v2_to_clinical_event(parse_er7(text), _partner(profiles), identifier_base=BASE) is None
    )


def test_unmatched_rows_can_be_ignored_by_the_profile(profiles: ProfileSet) -> None:
    partner = _partner(profiles)
    assert partner.hl7 is not None
    lenient = partner.model_copy(
        update={"hl7": partner.hl7.model_copy(update={"unmatched": "ignore"})}
    )
    text = (
        MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
        + "\rPID|1||M1^^^EXAMPLEEHR^MR\rORC|XX|P1"
    )
    assert hl7v2_to_clinical_event(parse_er7(text), lenient, identifier_base=BASE) is None


def test_escaped_identifier_is_unescaped(profiles: ProfileSet) -> None:
    text = (
        MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
        + "\rPID|1||A\\T\\B^^^EXAMPLEEHR^MR\rORC|NW|P1"
    )
    event = hl7v2_to_clinical_event(parse_er7(text), _partner(profiles), identifier_base=BASE)
    assert event is not None and event.patient[0].value == "A&B"


def test_identifier_rules_are_tried_in_profile_order(profiles: ProfileSet) -> None:
    # PID-3 lists the MRN first; the profile prefers the EHR's Patient id (PI)
    text = (
        MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
        + "\rPID|1||M1^^^EXAMPLEEHR^MR~e-9^^^EXAMPLEEHR^PI\rORC|NW|P1"
    )
    event = hl7v2_to_clinical_event(parse_er7(text), _partner(profiles), identifier_base=BASE)
    assert event is not None
    assert [(r.kind, r.value) for r in event.patient] == [
        ("remote_id", "e-9"),
        ("identifier", "M1"),
    ]


@pytest.mark.parametrize(
    ("raw", "zone", "expected"),
    [
        (
            "20261124093015-0500",
            "UTC",
            datetime(2026, 11, 24, 9, 30, 15, tzinfo=timezone(timedelta(hours=-5))),
        ),
        (
            "20261124093015.1234+0130",
            "UTC",
            datetime(
                2026, 11, 24, 9, 30, 15, 123400, tzinfo=timezone(timedelta(hours=1, minutes=30))
            ),
        ),
        ("202611240930", "UTC", datetime(2026, 11, 24, 9, 30, tzinfo=UTC)),
        ("20261124", "UTC", datetime(2026, 11, 24, tzinfo=UTC)),
        ("20260701120000", "America/Chicago", datetime(2026, 7, 1, 17, 0, tzinfo=UTC)),
    ],
)
def test_hl7_datetimes(raw: str, zone: str, expected: datetime) -> None:
    assert parse_hl7_datetime(raw, zone) == expected


@pytest.mark.parametrize("raw", ["", "2026-11-24", "20261324", "20260230", "2026112409301"])
def test_bad_hl7_datetimes(raw: str) -> None:
    with pytest.raises(MappingError):
        parse_hl7_datetime(raw)


@pytest.mark.parametrize(
    "version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.2", "2.3.1 "]
)
def test_every_version_hl7apy_reads_is_mapped_and_acked_in_it(
    version: str, profiles: ProfileSet
) -> None:
    text = (
        MSH.format(type="ORM^O01", version=version)
        + "\rPID|1||M1^^^EXAMPLEEHR^MR||M\u00fcller^Jos\u00e9\rZPI|1|custom\rORC|NW|P1\rXYZ|?"
    )
    message = parse_er7(text)
    event = hl7v2_to_clinical_event(message, _partner(profiles), identifier_base=BASE)
    assert event is not None and event.patient[0].value == "M1"
    ack = build_ack(message, "AA", control_id="ACK0", now=NOW)
    assert ack.split("\r")[0].split("|")[11] == version.strip()
    assert ack.split("\r")[1] == "MSA|AA|CTRL1"


def test_a_refused_but_readable_msh_is_still_answered_to_its_sender() -> None:
    """MSA-2 must echo MSH-10 whenever MSH could be read (HL7 v2.5.1 section 2.9.2), or the
    sender cannot match the AR to its message; an unsupported MSH-12 is echoed as sent."""
    for text, version in [
        (MSH.format(type="ORM^O01", version="2.9") + "\rPID|1||X", "2.9"),
        ("MSH|^~\\&|EPICRX|EXAMPLEEHR|FHIRGW|TELE|20261124||ORM|CTRL1|P|2.4", "2.4"),
    ]:
        with pytest.raises(Hl7MessageError) as err:
            parse_er7(text)
        ack = build_ack(err.value.envelope, "AR", control_id="ACK9", now=NOW, error=err.value)
        msh, msa = ack.split("\r")[:2]
        assert msh.split("|")[2:6] == ["FHIRGW", "TELE", "EPICRX", "EXAMPLEEHR"]
        assert msh.split("|")[11] == version
        assert msa.startswith("MSA|AR|CTRL1|")


def test_other_encoding_characters_are_used_to_read_and_in_the_ack(
    profiles: ProfileSet,
) -> None:
    """MSH-1/MSH-2 ``#$%@*``: escapes use ``@`` and stand for the declared separators, and
    the ACK's components are joined with ``$``."""
    text = (
        "MSH#$%@*#EPICRX#EXAMPLEEHR#FHIRGW#TELE#20261124093000##ORM$O01#CTRL1#P#2.5.1"
        "\rPID#1##A@T@B@S@C$$$EXAMPLEEHR$MR\rORC#NW#P1"
    )
    message = parse_er7(text)
    event = hl7v2_to_clinical_event(message, _partner(profiles), identifier_base=BASE)
    assert event is not None and event.patient[0].value == "A*B$C"
    ack = build_ack(message, "AA", control_id="ACK6", now=NOW)
    assert ack.split("\r")[0].split("#")[8] == "ACK$O01$ACK"
    error = Hl7MessageError("AE", 101, "missing", segment="PID", field_position=3)
    ack = build_ack(message, "AE", control_id="ACK7", now=NOW, error=error)
    assert ack.split("\r")[2] == "ERR##PID$1$3#101$Required field missing$HL70357#E####missing"


def test_components_past_the_end_of_a_datatype_do_not_crash(profiles: ProfileSet) -> None:
    """In v2.1 PID-3 is CK (4 components): hl7apy gives CX-style extra components no name;
    they have no known position, so the message is answered AE, not with a crash."""
    text = MSH.format(type="ORM^O01", version="2.1") + "\rPID|1||M1^^^EXAMPLEEHR^MR\rORC|NW|P1"
    with pytest.raises(Hl7MessageError) as err:
        hl7v2_to_clinical_event(parse_er7(text), _partner(profiles), identifier_base=BASE)
    assert (err.value.ack_code, err.value.hl7_code, err.value.location) == ("AE", 101, "PID-3")


def test_hex_escapes_are_decoded(profiles: ProfileSet) -> None:
    text = (
        MSH.format(type="ORM^O01^ORM_O01", version="2.5.1")
        + "\rPID|1||A\\X2D\\B\\E\\X41\\E\\^^^EXAMPLEEHR^MR\rORC|NW|P1"
    )
    event = hl7v2_to_clinical_event(parse_er7(text), _partner(profiles), identifier_base=BASE)
    assert event is not None and event.patient[0].value == "A-B\\X41\\"


def test_ack_accepts_and_echoes_the_control_id() -> None:
    message = parse_er7((GOLDEN / "rds_o13_dispensed.hl7").read_text())
    ack = build_ack(message, "AA", control_id="ACK1", now=NOW)
    parsed = parse_message(ack)
    parsed.validate()
    assert parsed.msh.msh_9.to_er7() == "ACK^O13^ACK"
    assert parsed.msh.msh_3.to_er7() == "FHIRGW" and parsed.msh.msh_5.to_er7() == "RXSYS"
    assert parsed.msh.msh_6.to_er7() == "SUNRISE-RX"
    assert parsed.msa.msa_1.value == "AA"
    assert parsed.msa.msa_2.value == "RDS0003"
    assert "ERR" not in ack


def test_ack_error_has_err_segment_with_code_and_location() -> None:
    message = parse_er7((GOLDEN / "rds_o13_dispensed.hl7").read_text())
    error = Hl7MessageError("AE", 101, "PID-3 has no identifier", segment="PID", field_position=3)
    ack = build_ack(message, "AE", control_id="ACK2", now=NOW, error=error)
    parsed = parse_message(ack)
    parsed.validate()
    segments = ack.split("\r")
    assert [s[:3] for s in segments] == ["MSH", "MSA", "ERR"]
    assert segments[1] == "MSA|AE|RDS0003|PID-3 has no identifier"
    assert (
        segments[2]
        == "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 has no identifier"
    )


@pytest.mark.parametrize("version", ["2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.2"])
def test_error_ack_fields_are_in_place_in_every_version(version: str) -> None:
    """Read by position (python-hl7): hl7apy's v2.8+ ERR lacks ERR-1 and shifted every
    field (ERR-3 held the severity); MSA-3 is withdrawn from v2.7 on. hl7apy validates it."""
    message = parse_er7(MSH.format(type="ORM^O01", version=version))
    error = Hl7MessageError("AE", 101, "PID-3 missing", segment="PID", field_position=3)
    ack = build_ack(message, "AE", control_id="ACK8", now=NOW, error=error)
    parse_message(ack).validate()
    parsed = hl7.parse(ack)
    msa, err = parsed.segment("MSA"), parsed.segment("ERR")
    assert (str(msa[1]), str(msa[2])) == ("AE", "CTRL1")
    assert len(msa) == (4 if version < "2.7" else 3)
    if version >= "2.5":
        assert (str(err[2]), str(err[3][0][0]), str(err[4]), str(err[8])) == (
            "PID^1^3",
            "101",
            "E",
            "PID-3 missing",
        )
    else:
        assert str(err[1]) == "PID^1^3^101&Required field missing&HL70357"


def test_ack_before_2_5_uses_err_1() -> None:
    message = parse_er7((GOLDEN / "adt_a08_no_structure.hl7").read_text().replace("2.3.1", "2.3"))
    error = Hl7MessageError("AE", 101, "missing", segment="PID", field_position=3)
    ack = build_ack(message, "AE", control_id="ACK3", now=NOW, error=error)
    assert ack.split("\r")[0].split("|")[8] == "ACK^A08"
    assert ack.split("\r")[2] == "ERR|PID^1^3^101&Required field missing&HL70357"


def test_ack_for_an_unreadable_message_rejects_with_empty_msa_2() -> None:
    error = Hl7MessageError("AR", 100, "no MSH", segment="MSH")
    ack = build_ack(None, "AR", control_id="ACK4", now=NOW, error=error)
    segments = ack.split("\r")
    assert segments[1] == "MSA|AR||no MSH"
    assert segments[2].startswith("ERR||MSH^1|100^Segment sequence error^HL70357|E")


def test_ack_text_cannot_break_the_message_structure() -> None:
    message = parse_er7((GOLDEN / "rds_o13_dispensed.hl7").read_text())
    error = Hl7MessageError("AE", 207, "bad|text^with~separators\\and&more\rsegment")
    ack = build_ack(message, "AE", control_id="ACK5", now=NOW, error=error)
    assert len(ack.split("\r")) == 3
    assert ack.split("\r")[1].count("|") == 3


def test_hl7_spec_validates_peers_and_zone() -> None:
    base = {
        "facilities": ["F"],
        "patient_identifiers": [{"system": "urn:x"}],
        "messages": [{"message": "ORU^R01", "event": "result_available"}],
    }
    Hl7Spec.model_validate({**base, "peers": ["10.0.0.0/8"], "timezone": "Europe/Paris"})
    for bad in ({"peers": ["not-a-net"]}, {"timezone": "Mars/Olympus"}):
        with pytest.raises(ValueError):
            Hl7Spec.model_validate({**base, **bad})
    with pytest.raises(ValueError):
        Hl7Spec.model_validate({**base, "messages": [{"message": "ADT^A04", "event": "x"}]})


@pytest.mark.parametrize(
    "text",
    [
        (GOLDEN / "rds_o13_dispensed.hl7").read_text(),
        (GOLDEN / "adt_a08_no_structure.hl7").read_text().replace("2.3.1", "2.3"),
        "MSH|#~\\&|APP#X|FAC|GW|TELE|20261124||ORU#R01#ORU_R01|C-9|T|2.5.1\rPID|1||M1",
    ],
)
def test_cached_accept_ack_is_the_one_hl7apy_builds(text: str) -> None:
    message = parse_er7(text)
    fast = build_ack(message, "AA", control_id="ACK9", now=NOW)
    slow = _build_ack(
        message,
        "AA",
        control_id="ACK9",
        time_text=NOW.strftime("%Y%m%d%H%M%S+0000"),
        error=None,
        application="FHIR-GATEWAY",
        facility="FHIR-GATEWAY",
    )
    assert fast == slow
    later = build_ack(message, "AA", control_id="ACK10", now=NOW + timedelta(seconds=1))
    assert later != fast and "ACK10" in later and message.control_id in later


# --------------------------------------------------------------------------- refusals a sender can act on

# An HL7 batch (v2.5.1 chapter 2.10.3): FHS-11 is the file control id, BHS-11 the batch's.
FHS = "FHS|^~\\&|EPICRX|EXAMPLEEHR|FHIRGW|TELE|20261124093000||||FILE-7"
BHS = "BHS|^~\\&|EPICRX|EXAMPLEEHR|FHIRGW|TELE|20261124093000||||BATCH-42"


def _batch(*messages: str, headers: tuple[str, ...] = (FHS, BHS)) -> str:
    trailer = ["BTS|" + str(len(messages)), "FTS|1"][: len(headers)]
    return "\r".join([*headers, *messages, *trailer])


def _refusal(text: str) -> Hl7MessageError:
    with pytest.raises(Hl7MessageError) as err:
        parse_er7(text)
    return err.value


def _with_batch_msa_2(profiles: ProfileSet, choice: str) -> PartnerProfile:
    partner = _partner(profiles)
    assert partner.hl7 is not None
    hl7_spec = partner.hl7.model_copy(update={"batch_refusal_msa_2": choice})
    return partner.model_copy(update={"hl7": hl7_spec})


def test_a_refused_batch_is_answered_to_its_first_message() -> None:
    """MSA-2 used to be empty although MSH-10 was readable: the sender could not match the
    refusal. The ACK is addressed and versioned as the batch's first message."""
    first = MSH.format(type="ORM^O01", version="2.5.1") + "\rPID|1||M1^^^EXAMPLEEHR^MR"
    second = first.replace("|CTRL1|", "|CTRL2|")
    error = _refusal(_batch(first, second))
    assert (error.ack_code, error.hl7_code, error.location) == ("AR", 100, "FHS")
    assert error.envelope is not None and error.envelope.control_id == "CTRL1"
    assert error.batch_control_id == "BATCH-42"
    ack = build_ack(
        error.envelope,
        "AR",
        control_id="ACK10",
        now=NOW,
        error=error,
        acknowledged_id=refused_control_id(error, None),
    )
    parse_message(ack).validate()
    msh, msa, err = ack.split("\r")
    assert msh.split("|")[2:6] == ["FHIRGW", "TELE", "EPICRX", "EXAMPLEEHR"]
    assert msh.split("|")[11] == "2.5.1"
    assert (
        msa == "MSA|AR|CTRL1|an HL7 batch (FHS/BHS) is not accepted: send each message on its own"
    )
    assert err.startswith("ERR||FHS^1|100^Segment sequence error^HL70357|E")


@pytest.mark.parametrize(
    ("choice", "text", "expected"),
    [
        ("MSH-10", _batch(MSH.format(type="ORM^O01", version="2.5")), "CTRL1"),
        ("BHS-11", _batch(MSH.format(type="ORM^O01", version="2.5")), "BATCH-42"),
        # no BHS: FHS-11 stands for the batch
        ("BHS-11", _batch(MSH.format(type="ORM^O01", version="2.5"), headers=(FHS,)), "FILE-7"),
        # the header alone (mllp_send --loose sends it as a message of its own): MSH-10
        # falls back to BHS-11
        ("MSH-10", f"{FHS}\r{BHS}", "BATCH-42"),
        # a BHS without a control id: BHS-11 falls back to MSH-10
        (
            "BHS-11",
            _batch(
                MSH.format(type="ORM^O01", version="2.5"),
                headers=("BHS|^~\\&|EPICRX|EXAMPLEEHR",),
            ),
            "CTRL1",
        ),
    ],
)
def test_msa_2_of_a_refused_batch_is_what_the_sender_profile_expects(
    profiles: ProfileSet, choice: str, text: str, expected: str
) -> None:
    error = _refusal(text)
    assert refused_control_id(error, _with_batch_msa_2(profiles, choice)) == expected


def test_a_batch_without_a_readable_msh_is_answered_from_its_header() -> None:
    error = _refusal(f"{FHS}\r{BHS}")
    ack = build_ack(
        error.envelope,
        "AR",
        control_id="ACK11",
        now=NOW,
        error=error,
        acknowledged_id=refused_control_id(error, None),
    )
    msh, msa = ack.split("\r")[:2]
    assert msh.split("|")[2:6] == ["FHIRGW", "TELE", "EPICRX", "EXAMPLEEHR"]
    assert msa.startswith("MSA|AR|BATCH-42|")


def test_a_message_holding_a_batch_header_keeps_its_own_control_id() -> None:
    text = MSH.format(type="ORM^O01", version="2.5") + f"\r{BHS}\rPID|1||X"
    error = _refusal(text)
    assert (error.location, error.batch_control_id) == ("MSH", "BATCH-42")
    assert refused_control_id(error, None) == "CTRL1"


def test_other_refusals_echo_msh_10_whatever_the_profile(profiles: ProfileSet) -> None:
    error = _refusal(MSH.format(type="ORM^O01", version="2.9"))
    assert refused_control_id(error, _with_batch_msa_2(profiles, "BHS-11")) == "CTRL1"
    assert refused_control_id(_refusal("PID|1||X"), None) == ""


@pytest.mark.parametrize(
    ("check", "position", "version"),
    [
        ("facility", 4, "2.3"),
        ("facility", 4, "2.5.1"),
        ("application", 3, "2.6"),
        ("peer", 4, "2.7"),
        ("facility", 4, "2.8.2"),
    ],
)
def test_an_unknown_sender_gets_table_value_not_found_with_the_reason(
    check: str, position: int, version: str
) -> None:
    """103 "Table value not found" (MSH-3/MSH-4 values come from user tables 0361/0362),
    never 207 "Application internal error"; the reason is in MSA-3 before v2.7 and in
    ERR-8 from v2.5 on (ERR-1 before)."""
    error = sender_not_accepted(check)  # type: ignore[arg-type]
    assert (error.ack_code, error.hl7_code, error.location) == ("AR", 103, f"MSH-{position}")
    message = parse_er7(MSH.format(type="ORM^O01", version=version))
    ack = build_ack(message, "AR", control_id="ACK12", now=NOW, error=error)
    if version >= "2.3.1":  # hl7apy cannot validate a v2.3 ACK (ERR-1 only)
        parse_message(ack).validate()
    parsed = hl7.parse(ack)
    msa, err = parsed.segment("MSA"), parsed.segment("ERR")
    assert (str(msa[1]), str(msa[2])) == ("AR", "CTRL1")
    reason = str(error)
    assert (str(msa[3]) if len(msa) > 3 else None) == (reason if version < "2.7" else None)
    if version >= "2.5":
        assert str(err[3]) == "103^Table value not found^HL70357"
        assert (str(err[2]), str(err[8])) == (f"MSH^1^{position}", reason)
    else:
        assert str(err[1]) == f"MSH^1^{position}^103&Table value not found&HL70357"


# ------------------------------------------------------- times from the future (issue 15)


def _adt_at(local: str) -> Any:
    """An ADT^A08 of EXAMPLEEHR (zone America/New_York) with MSH-7 and EVN-6 ``local``
    (no offset: read in the sender's zone)."""
    return parse_er7(
        f"MSH|^~\\&|ADT|EXAMPLEEHR|FHIRGW|TELE|{local}||ADT^A08|ADT-F1|P|2.3.1\r"
        f"EVN|A08|{local}||||{local}\r"
        "PID|1||MRN48213^^^EXAMPLEEHR^MR||RIVERA^JORDAN||19880412|F\r"
    )


def test_a_time_hours_in_the_future_is_refused_with_its_field(profiles: ProfileSet) -> None:
    """A UTC wall-clock time sent without an offset, read in New York: 5 hours ahead."""
    received = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    message = _adt_at("20261127120000")  # meant as UTC, read as 12:00 in New York = 17:00 UTC
    partner = profiles.hl7_sender("EXAMPLEEHR")
    assert partner is not None and partner.max_future == timedelta(minutes=5)
    with pytest.raises(Hl7MessageError) as caught:
        hl7v2_to_clinical_event(message, partner, identifier_base=BASE, received_at=received)
    error = caught.value
    assert (error.ack_code, error.hl7_code, error.segment, error.field_position) == (
        "AE",
        102,
        "EVN",
        6,
    )
    assert "300 minute(s) after it was received" in str(error)
    # without a receipt time (the golden tests, tools) nothing is checked
    assert hl7v2_to_clinical_event(message, partner, identifier_base=BASE) is not None


def test_clock_skew_within_the_senders_max_future_is_accepted(profiles: ProfileSet) -> None:
    partner = profiles.hl7_sender("EXAMPLEEHR")
    assert partner is not None
    message = _adt_at("20261127070400")  # 12:04 UTC: 4 minutes ahead
    received = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    event = hl7v2_to_clinical_event(message, partner, identifier_base=BASE, received_at=received)
    assert event is not None
    later = _adt_at("20261127071000")  # 10 minutes ahead: this sender may allow it
    lenient = partner.model_copy(update={"max_future": timedelta(minutes=15)})
    assert (
        hl7v2_to_clinical_event(later, lenient, identifier_base=BASE, received_at=received)
        is not None
    )
    with pytest.raises(Hl7MessageError):
        hl7v2_to_clinical_event(later, partner, identifier_base=BASE, received_at=received)
