"""HL7 v2 (ER7) messages -> :class:`~mappers.events.ClinicalEvent`, and the ACK answering them.

Positions are 1-based as in the standard (``PID-3``, ``ORC-1``, ``MSH-10``). Segments are
split from the ER7 text (``\\r``; ``\\r\\n`` and ``\\n`` are normalized first, because
hl7apy silently drops everything after MSH on ``\\r\\n``), and only the fields the mapping
needs are parsed, with hl7apy's field parser (``hl7apy.parser.parse_field``) for
components, repetitions and escapes. Names, birth dates and addresses are never parsed.

Message types (dispatch on MSH-9.1 / MSH-9.2, never on the structure name, which is
absent when MSH-9.3 is):

=========  ===============================  ==========================================
message    meaning                          occurred at (first present)
=========  ===============================  ==========================================
ORM^O01    order placed / changed (ORC)     ORC-9, MSH-7
RDE^O11    pharmacy encoded order (ORC)     ORC-9, MSH-7
RDS^O13    dispense (ORC, RXD)              RXD-3, ORC-9, MSH-7
ORU^R01    result available (OBR)           OBR-22, OBR-7, MSH-7
ADT^A08    patient information updated      EVN-6, EVN-2, MSH-7
SIU^S12    new appointment booked (SCH)     MSH-7
=========  ===============================  ==========================================

Which event each message means comes from the sender's table (:class:`Hl7MessageRule`,
ORC-1 order control, HL7 table 0119, and ORC-5 order status, table 0038). The patient is
found from the PID-3 repetitions (CX) the sender's identifier rules select.

Errors are :class:`Hl7MessageError`: ``AR`` for a message we will not process (no MSH,
an HL7 batch, unsupported version, message type or sender), ``AE`` for one we cannot map;
each carries an HL7 table 0357 error code and the position, for the ACK's ERR segment.
207 (application internal error) is never used for the sender's message: an unknown
sender is 103 (:func:`sender_not_accepted`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Literal, NoReturn
from zoneinfo import ZoneInfo

import hl7apy
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_field

from mappers.errors import MappingError
from mappers.events import ClinicalEvent, PatientRef, future_time_problem, split_event_ref
from mappers.profiles.events import Hl7MessageRule, PartnerProfile, expand_system

AckCode = Literal["AA", "AE", "AR"]

#: HL7 table 0357 (message error condition codes) used in ERR.
ERROR_TEXT = {
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

#: The version an ACK is built with when the inbound one is unknown or unsupported.
FALLBACK_VERSION = "2.5.1"
_DEFAULT_ENCODING = {"COMPONENT": "^", "REPETITION": "~", "ESCAPE": "\\", "SUBCOMPONENT": "&"}

#: occurred-at fields per message type, first present wins (then MSH-7).
_TIME_FIELDS: dict[str, tuple[tuple[str, int], ...]] = {
    "ORM^O01": (("ORC", 9),),
    "RDE^O11": (("ORC", 9),),
    "RDS^O13": (("RXD", 3), ("ORC", 9)),
    "ORU^R01": (("OBR", 22), ("OBR", 7)),
    "ADT^A08": (("EVN", 6), ("EVN", 2)),
    "SIU^S12": (),
}
#: the sender's business reference per message type, first present wins.
_REFERENCE_FIELDS: dict[str, tuple[tuple[str, int], ...]] = {
    "ORM^O01": (("ORC", 2), ("ORC", 3)),
    "RDE^O11": (("ORC", 2), ("ORC", 3)),
    "RDS^O13": (("ORC", 3), ("ORC", 2)),
    "ORU^R01": (("OBR", 3), ("OBR", 2)),
    "ADT^A08": (),
    "SIU^S12": (("SCH", 2), ("SCH", 1)),
}
_ORDER_MESSAGES = frozenset({"ORM^O01", "RDE^O11", "RDS^O13"})
_REQUIRED_SEGMENTS: dict[str, tuple[str, ...]] = {
    "ORM^O01": ("PID", "ORC"),
    "RDE^O11": ("PID", "ORC"),
    "RDS^O13": ("PID", "ORC"),
    "ORU^R01": ("PID", "OBR"),
    "ADT^A08": ("PID",),
    "SIU^S12": ("PID",),
}
_DTM = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?(?:([+-])(\d{2})(\d{2}))?$"
)


class Hl7MessageError(MappingError):
    """A message answered with ``AR`` (will not process) or ``AE`` (cannot map).

    Attributes:
        ack_code: ``AR`` or ``AE`` (MSA-1, HL7 table 0008).
        hl7_code: HL7 table 0357 error condition code (ERR-3).
        segment, field_position: where (ERR-2), e.g. ``PID`` and ``3``.
        envelope: for a message refused by :func:`parse_er7` whose MSH could be split
            (unsupported version, MSH-9 incomplete...), what it holds, so the ACK can
            still echo MSH-10 in MSA-2 and address the sender; else None.
        batch_control_id: for a refused HL7 batch, its BHS-11 (FHS-11 without a BHS), or
            None (see :func:`refused_control_id`).
    """

    def __init__(
        self,
        ack_code: AckCode,
        hl7_code: int,
        message: str,
        *,
        segment: str | None = None,
        field_position: int | None = None,
        envelope: Hl7Message | None = None,
        batch_control_id: str | None = None,
    ) -> None:
        location = f"{segment}-{field_position}" if segment and field_position else segment or ""
        super().__init__(f"hl7_{hl7_code}", message, location)
        self.ack_code: AckCode = ack_code
        self.hl7_code = hl7_code
        self.segment = segment
        self.field_position = field_position
        self.envelope = envelope
        self.batch_control_id = batch_control_id


def decode_er7(raw: bytes) -> str:
    """Message bytes -> text: UTF-8, or ISO 8859-1 (MSH-18 ``8859/1``) when not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def normalize_er7(text: str) -> str:
    """Segment separators to ``\\r`` (``\\r\\n`` and ``\\n`` are common on the wire, and
    hl7apy loses data on both); leading blanks, BOM, empty segments and MLLP block
    characters around the message (a framed message posted over HTTP) removed."""
    text = text.lstrip("\ufeff \t\r\n\x0b").rstrip("\x1c \t\r\n")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    return "\r".join(s for s in text.split("\r") if s.strip())


@dataclass(frozen=True)
class Hl7Message:
    """An ER7 message split into segments and fields, with MSH read.

    ``segments`` holds, per segment, its fields with index ``n`` = ``SEG-n`` (for MSH too:
    index 1 is the field separator, 2 the encoding characters).
    """

    text: str
    field_separator: str
    encoding: dict[str, str]
    version: str
    segments: tuple[tuple[str, ...], ...]
    sending_application: str
    sending_facility: str
    message_code: str
    trigger_event: str
    control_id: str
    processing_id: str
    _cache: dict[tuple[str, int], Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def message_type(self) -> str:
        """``ORM^O01``: MSH-9.1 and MSH-9.2."""
        return f"{self.message_code}^{self.trigger_event}"

    def segment(self, name: str) -> tuple[str, ...] | None:
        """The first segment with this id, or None."""
        for seg in self.segments:
            if seg[0] == name:
                return seg
        return None

    def raw_field(self, segment: str, position: int) -> str:
        """The ER7 text of ``SEG-n`` in the first such segment ('' when absent)."""
        seg = self.segment(segment)
        if seg is None or position >= len(seg):
            return ""
        return seg[position]

    def repetitions(self, segment: str, position: int) -> list[Any]:
        """``SEG-n`` parsed by hl7apy, one element per repetition (empty ones skipped).

        Raises:
            Hl7MessageError: AE 102 when hl7apy cannot parse the field.
        """
        raw = self.raw_field(segment, position)
        if not raw:
            return []
        return [
            _parse(self, segment, position, rep)
            for rep in raw.split(self.encoding["REPETITION"])
            if rep
        ]

    def first(self, segment: str, position: int) -> Any | None:
        """The first repetition of ``SEG-n`` parsed by hl7apy, or None."""
        reps = self.repetitions(segment, position)
        return reps[0] if reps else None

    def text_of(self, segment: str, position: int, component: int = 1) -> str:
        """The text of component ``component`` (1-based) of ``SEG-n``'s first repetition."""
        element = self.first(segment, position)
        if element is None:
            return ""
        return _component_text(element, component, self)


def _parse(message: Hl7Message, segment: str, position: int, text: str) -> Any:
    try:
        return parse_field(
            text,
            name=f"{segment}_{position}",
            version=message.version,
            encoding_chars={
                **message.encoding,
                "FIELD": message.field_separator,
                "GROUP": "\r",
                "SEGMENT": "\r",
            },
        )
    except (HL7apyException, ValueError, KeyError) as exc:
        raise Hl7MessageError(
            "AE",
            102,
            f"{segment}-{position} cannot be parsed",
            segment=segment,
            field_position=position,
        ) from exc


def _index(name: str | None) -> int | None:
    """``CX_4`` -> 4, ``MSH_9_1`` -> 1; a base type child (``ID``, ``ST``, ``DTM``) -> None."""
    if name is None:
        return None
    tail = name.rsplit("_", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None


def _component_value(component: Any) -> str:
    """A component's text: itself when it is a base type (hl7apy keeps the ER7 text, so a
    DTM keeps its offset; a text type's value is read as received, because hl7apy's ER7 of
    it escapes the escape character of ``\\Xhh\\``), else its first subcomponent."""
    subs = [c for c in component.children if _index(c.name) is not None]
    if not subs:
        raw = getattr(component.children[0].value, "value", None) if component.children else None
        return raw if isinstance(raw, str) else str(component.value or "")
    first = next((c for c in subs if _index(c.name) == 1), None)
    if first is None:
        return ""
    value = first.value
    return str(getattr(value, "value", value) or "")


def _component_text(element: Any, component: int, message: Hl7Message) -> str:
    """Component ``component`` (1-based) of a parsed field, unescaped ('' when absent)."""
    for child in getattr(element, "children", None) or []:
        # a component past the end of its datatype (PID-3 is CK, 4 components, in v2.1)
        # has no name, so no known position: skipped
        if child.name is not None and (_index(child.name) or 1) == component:
            return _unescape(_component_value(child), message)
    return ""


_ESCAPE_KEYS = {"F": "FIELD", "S": "COMPONENT", "T": "SUBCOMPONENT", "R": "REPETITION"}


def _unescape(text: str, message: Hl7Message) -> str:
    """The escape sequences of HL7 v2.5.1 section 2.7.4 and 2.7.5 in an identifier or code:
    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (the separators the message's MSH-1/MSH-2 declare,
    written with its own escape character) and ``\\Xhh..\\`` (hexadecimal bytes, read as
    UTF-8 or else ISO 8859-1). Other sequences (formatting, character sets) are kept."""
    escape = message.encoding["ESCAPE"]
    if escape not in text:
        return text
    chars = {**message.encoding, "FIELD": message.field_separator}

    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if code == "E":
            return escape
        if code[0] == "X":
            try:
                return decode_er7(bytes.fromhex(code[1:]))
            except ValueError:
                return match.group(0)
        return chars[_ESCAPE_KEYS[code]]

    quoted = re.escape(escape)
    return re.sub(f"{quoted}([FSTRE]|X[0-9A-Fa-f]+){quoted}", replace, text)


_BATCH_REFUSED = "an HL7 batch (FHS/BHS) is not accepted: send each message on its own"
_BATCH_HEADERS = ("FHS", "BHS")
_ENCODING_KEYS = ("COMPONENT", "REPETITION", "ESCAPE", "SUBCOMPONENT")


def parse_er7(text: str) -> Hl7Message:
    """Split an ER7 message and read MSH (HL7 v2.x chapter 2, MSH segment).

    Args:
        text: the message as received (any line ending).

    Returns:
        The :class:`Hl7Message`.

    Raises:
        Hl7MessageError: AR 100 when it does not start with MSH, the encoding characters
            are unusable, it is an HL7 batch (FHS/BHS) or it holds a second MSH (several
            messages at once); AR 101 when MSH-9 or MSH-10 is empty; AR 203 when MSH-12 is
            not a version hl7apy supports (2.1 to 2.8.2). Once an MSH could be split, the
            error's ``envelope`` holds it (for MSA-2 and the ACK's addresses); a refused
            batch's envelope is its first message's MSH (else its BHS/FHS header), and its
            ``batch_control_id`` is BHS-11 (FHS-11 without a BHS).
    """
    text = normalize_er7(text)
    if text[:3] in _BATCH_HEADERS:
        raise _batch_refusal(text, None)
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7MessageError(
            "AR", 100, "the message does not start with an MSH segment", segment="MSH"
        )
    envelope = _read_msh(text)

    def refuse(hl7_code: int, text: str, position: int | None) -> NoReturn:
        raise Hl7MessageError(
            "AR", hl7_code, text, segment="MSH", field_position=position, envelope=envelope
        )

    inner = {seg[0] for seg in envelope.segments[1:]}
    if inner & set(_BATCH_HEADERS):
        raise _batch_refusal(text, envelope)
    if "MSH" in inner:
        refuse(
            100,
            "more than one message (a second MSH segment): send one message per request "
            "or MLLP frame",
            None,
        )
    if envelope.version not in hl7apy.SUPPORTED_LIBRARIES:
        refuse(203, "MSH-12 names an unsupported HL7 version (2.1 to 2.8.2 are read)", 12)
    if not envelope.message_code or not envelope.trigger_event:
        refuse(101, "MSH-9 message type is incomplete", 9)
    if not envelope.control_id:
        refuse(101, "MSH-10 message control id is missing", 10)
    return envelope


def _usable_encoding(sep: str, chars: str) -> dict[str, str] | None:
    """MSH-2 (or BHS-2/FHS-2) as hl7apy's encoding dict, or None when unusable."""
    if len(chars) < 4 or len({sep, *chars[:4]}) != 5 or any(c.isalnum() for c in chars[:4]):
        return None
    return dict(zip(_ENCODING_KEYS, chars[:4], strict=True))


def _read_msh(text: str) -> Hl7Message:
    """Split ``text`` (starting with MSH) into segments and read its MSH fields.

    Raises:
        Hl7MessageError: AR 100 when MSH-1/MSH-2 are not usable separators.
    """
    sep = text[3]
    encoding = _usable_encoding(sep, text[4:].split(sep, 1)[0])
    if encoding is None:
        raise Hl7MessageError(
            "AR", 100, "MSH-1/MSH-2 separators are not usable", segment="MSH", field_position=2
        )
    segments: list[tuple[str, ...]] = []
    for raw in text.split("\r"):
        parts = raw.split(sep)
        if parts[0] == "MSH":
            parts = ["MSH", sep, *parts[1:]]
        segments.append(tuple(parts))
    msh = segments[0]

    def msh_field(n: int) -> str:
        return msh[n] if n < len(msh) else ""

    def first_component(value: str) -> str:
        return value.split(encoding["REPETITION"], 1)[0].split(encoding["COMPONENT"], 1)[0]

    message_type = msh_field(9).split(encoding["COMPONENT"])
    return Hl7Message(
        text=text,
        field_separator=sep,
        encoding=encoding,
        version=first_component(msh_field(12)).strip(),
        segments=tuple(segments),
        sending_application=first_component(msh_field(3)),
        sending_facility=first_component(msh_field(4)),
        message_code=message_type[0].strip() if message_type else "",
        trigger_event=message_type[1].strip() if len(message_type) > 1 else "",
        control_id=msh_field(10).strip(),
        processing_id=first_component(msh_field(11)),
    )


def _batch_refusal(text: str, envelope: Hl7Message | None) -> Hl7MessageError:
    """The AR 100 for an HL7 batch (chapter 2, batch protocol: FHS/BHS ... BTS/FTS).

    Its envelope is ``envelope``, else the first message's MSH, else one read from the batch
    header (BHS, else FHS: fields 3 to 6 are the sending and receiving application and
    facility, as in MSH), so the ACK reaches the sender; its ``batch_control_id`` is BHS-11
    (FHS-11 without a BHS), the id the sender gave the batch.
    """
    lines = text.split("\r")
    headers = {line[:3]: line for line in lines if line[:3] in _BATCH_HEADERS and len(line) > 3}
    header = headers.get("BHS") or headers.get("FHS")
    fields: list[str] = []
    if header is not None:
        fields = [header[:3], header[3], *header[4:].split(header[3])]
    if envelope is None:
        starts = [i for i, line in enumerate(lines) if line.startswith("MSH") and len(line) > 8]
        if starts:
            end = next(
                (
                    j
                    for j in range(starts[0] + 1, len(lines))
                    if lines[j][:3] in ("MSH", "BTS", "FTS", *_BATCH_HEADERS)
                ),
                len(lines),
            )
            try:
                envelope = _read_msh("\r".join(lines[starts[0] : end]))
            except Hl7MessageError:
                envelope = None
    if envelope is None and header is not None:
        envelope = _header_envelope(header, fields)
    batch_id = fields[11].strip() if len(fields) > 11 else ""
    return Hl7MessageError(
        "AR",
        100,
        _BATCH_REFUSED,
        segment=text[:3] if text[:3] in _BATCH_HEADERS else "MSH",
        envelope=envelope,
        batch_control_id=batch_id or None,
    )


def _header_envelope(header: str, fields: list[str]) -> Hl7Message | None:
    """An envelope for the ACK of a batch without a readable MSH, from its BHS/FHS: the
    sender's and receiver's application and facility; no version, type or control id."""
    encoding = _usable_encoding(fields[1], fields[2] if len(fields) > 2 else "")
    if encoding is None:
        return None
    msh = ("MSH", *fields[1:7])

    def first_component(n: int) -> str:
        value = fields[n] if n < len(fields) else ""
        return value.split(encoding["REPETITION"], 1)[0].split(encoding["COMPONENT"], 1)[0]

    return Hl7Message(
        text=header,
        field_separator=fields[1],
        encoding=encoding,
        version="",
        segments=(msh,),
        sending_application=first_component(3),
        sending_facility=first_component(4),
        message_code="",
        trigger_event="",
        control_id="",
        processing_id="",
    )


def parse_hl7_datetime(raw: str, default_tz: str = "UTC") -> datetime:
    """HL7 DTM/TS (``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``) -> aware datetime.

    Spec: HL7 v2.5 section 2.A.22 (DTM). A value without an offset is local time in
    ``default_tz`` (an IANA name, the sender's zone); missing parts are the start of the
    period (``20240501`` is midnight).

    Raises:
        MappingError: ``invalid_datetime`` when it does not parse or is not a real time.
    """
    match = _DTM.fullmatch(raw.strip())
    if match is None:
        raise MappingError("invalid_datetime", "not an HL7 date/time (YYYYMMDDHHMMSS+ZZZZ)")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    tz: timezone | ZoneInfo
    if sign:
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        tz = timezone(-offset if sign == "-" else offset)
    else:
        tz = ZoneInfo(default_tz)
    try:
        value = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")[:6]),
            tzinfo=tz,
        )
    except ValueError as exc:
        raise MappingError("invalid_datetime", "not a real date/time") from exc
    return value


def _rule_for(message: Hl7Message, rules: list[Hl7MessageRule]) -> Hl7MessageRule | None:
    order_control = message.text_of("ORC", 1) if message.message_type in _ORDER_MESSAGES else ""
    order_status = message.text_of("ORC", 5) if message.message_type in _ORDER_MESSAGES else ""
    for rule in rules:
        if rule.message != message.message_type:
            continue
        if rule.orc_1 and order_control not in rule.orc_1:
            continue
        if rule.orc_5 and order_status not in rule.orc_5:
            continue
        return rule
    return None


def pid3_to_patient_refs(
    message: Hl7Message, partner: PartnerProfile, *, identifier_base: str
) -> tuple[PatientRef, ...]:
    """PID-3 repetitions (CX) -> the patient refs the sender's identifier rules select.

    A repetition matches a rule when its CX-4.1 (assigning authority namespace) and CX-5
    (identifier type, HL7 table 0203) equal the rule's ``authority``/``type`` (empty ones
    match anything). Refs come in rule order, then repetition order; CX-1 is the value.
    """
    assert partner.hl7 is not None
    reps = []
    for cx in message.repetitions("PID", 3):
        value = _component_text(cx, 1, message).strip()
        if not value:
            continue
        authority = _hd_namespace(cx, message)
        id_type = _component_text(cx, 5, message).strip()
        reps.append((value, authority, id_type))
    refs: list[PatientRef] = []
    for rule in partner.hl7.patient_identifiers:
        for value, authority, id_type in reps:
            if rule.authority is not None and rule.authority != authority:
                continue
            if rule.type is not None and rule.type != id_type:
                continue
            if rule.system is not None:
                ref = PatientRef(
                    "identifier", value, system=expand_system(rule.system, identifier_base)
                )
            else:
                ref = PatientRef("remote_id", value, target=rule.remote_id_of)
            if ref not in refs:
                refs.append(ref)
    return tuple(refs)


def _hd_namespace(cx: Any, message: Hl7Message) -> str:
    """CX-4.1: the namespace id of the assigning authority (HD)."""
    return _component_text(cx, 4, message).strip()


def hl7v2_to_clinical_event(
    message: Hl7Message,
    partner: PartnerProfile,
    *,
    identifier_base: str,
    received_at: datetime | None = None,
) -> ClinicalEvent | None:
    """Map a parsed message from ``partner`` to a clinical event.

    Args:
        message: from :func:`parse_er7`.
        partner: the sender (its ``hl7`` block: identifier rules, message table, zone).
        identifier_base: ``GATEWAY_IDENTIFIER_BASE`` for ``{base}`` in identifier systems.
        received_at: when the message arrived; the event's time may be at most the
            partner's ``max_future`` after it (None: not checked).

    Returns:
        The event (``event_id`` = MSH-10, sender = the partner's name), or None when the
        sender's table says to ignore this message.

    Raises:
        Hl7MessageError: AR 200 for a message type the sender's table does not list; AE 100
            when a required segment (PID, ORC, OBR) is missing; AE 103 when ORC-1/ORC-5
            match no row (unless ``unmatched: ignore``); AE 101 when PID-3 has no
            identifier of a configured kind; AE 102 for an unparseable field or time, or
            a time more than ``max_future`` after ``received_at`` (a time without an
            offset read in the wrong ``hl7.timezone``, usually).
    """
    spec = partner.hl7
    assert spec is not None
    mtype = message.message_type
    if mtype not in spec.message_types():
        raise Hl7MessageError(
            "AR",
            200,
            f"message type {mtype} is not accepted from this sender",
            segment="MSH",
            field_position=9,
        )
    for name in _REQUIRED_SEGMENTS[mtype]:
        if message.segment(name) is None:
            raise Hl7MessageError("AE", 100, f"required segment {name} is missing", segment=name)
    if mtype in _ORDER_MESSAGES and not message.text_of("ORC", 1):
        raise Hl7MessageError(
            "AE", 101, "ORC-1 order control is missing", segment="ORC", field_position=1
        )
    rule = _rule_for(message, spec.messages)
    if rule is None:
        if spec.unmatched == "ignore":
            return None
        raise Hl7MessageError(
            "AE",
            103,
            f"no mapping for {mtype} with this ORC-1/ORC-5",
            segment="ORC" if mtype in _ORDER_MESSAGES else "MSH",
            field_position=1 if mtype in _ORDER_MESSAGES else 9,
        )
    if rule.ignore or rule.event is None:
        return None
    refs = pid3_to_patient_refs(message, partner, identifier_base=identifier_base)
    if not refs:
        raise Hl7MessageError(
            "AE",
            101,
            "PID-3 has no identifier of a kind configured for this sender",
            segment="PID",
            field_position=3,
        )
    event_type, detail = split_event_ref(rule.event)
    occurred_at, (segment, position) = _occurred_at(message, spec.timezone)
    if received_at is not None:
        ahead = future_time_problem(
            occurred_at,
            received_at=received_at,
            max_future=partner.max_future,
            location=f"{segment}-{position}",
        )
        if ahead is not None:
            raise Hl7MessageError(
                "AE",
                102,
                f"{segment}-{position}: {ahead.message}",
                segment=segment,
                field_position=position,
            )
    return ClinicalEvent(
        source=partner.source,
        sender=partner.name,
        event_id=message.control_id,
        type=event_type,
        detail=detail,
        occurred_at=occurred_at,
        patient=refs,
        reference=_reference(message),
    )


def _occurred_at(message: Hl7Message, zone: str) -> tuple[datetime, tuple[str, int]]:
    for segment, position in (*_TIME_FIELDS[message.message_type], ("MSH", 7)):
        text = message.text_of(segment, position).strip()
        if not text:
            continue
        try:
            return parse_hl7_datetime(text, zone), (segment, position)
        except MappingError as exc:
            raise Hl7MessageError(
                "AE",
                102,
                f"{segment}-{position} is not an HL7 date/time",
                segment=segment,
                field_position=position,
            ) from exc
    raise Hl7MessageError(
        "AE", 101, "MSH-7 date/time of message is missing", segment="MSH", field_position=7
    )


def _reference(message: Hl7Message) -> str | None:
    for segment, position in _REFERENCE_FIELDS[message.message_type]:
        text = message.text_of(segment, position).strip()
        if text:
            return f"{segment}-{position}:{text}"
    return None


# --------------------------------------------------------------------------- ACK

#: Why a sender is refused (:func:`sender_not_accepted`).
SenderCheck = Literal["facility", "application", "peer", "credential", "credential_application"]

_SENDER_REFUSALS: dict[SenderCheck, tuple[int, str]] = {
    "facility": (4, "MSH-4 sending facility is not a sender configured at this gateway"),
    "application": (3, "MSH-3 sending application is not configured for this facility"),
    "peer": (4, "MSH-4 sending facility is not configured to send from this network address"),
    "credential": (4, "MSH-4 sending facility is not a sender this credential may send as"),
    "credential_application": (
        3,
        "MSH-3 sending application belongs to a sender this credential may not send as",
    ),
}


def sender_not_accepted(check: SenderCheck) -> Hl7MessageError:
    """The AR for a sender the gateway does not accept: an unknown MSH-4 sending facility,
    an MSH-3 sending application the facility's profile does not list, an MLLP peer
    outside the facility's networks, or a credential (API client bound to partners, MLLP
    client certificate) that may not send as the facility (MSH-4) or whose MSH-3 is
    another partner's.

    The code is 103 "Table value not found" (HL7 table 0357) at MSH-4 or MSH-3: both fields
    take their values from user-defined tables (0362 Facility, 0361 Application), which at
    this gateway are the partner profiles, and the value is not in them. Table 0357 has no
    code for an unknown or unauthorised sender; 207 "Application internal error" would tell
    the sender's interface team that the gateway failed, which it did not. The reason goes
    in ERR-8 (v2.5 on) and MSA-3 (before v2.7) by :func:`build_ack`.

    Args:
        check: which check failed.

    Returns:
        The :class:`Hl7MessageError` (AR 103) to answer and record.
    """
    position, text = _SENDER_REFUSALS[check]
    return Hl7MessageError("AR", 103, text, segment="MSH", field_position=position)


def refused_control_id(error: Hl7MessageError, partner: PartnerProfile | None) -> str:
    """MSA-2 of the AR answering ``error``: the control id the sender can match it with.

    For a refused HL7 batch, the sender's profile (``hl7.batch_refusal_msa_2``) chooses
    between MSH-10 of the batch's first message (the default) and BHS-11, the batch control
    id; either falls back to the other when empty. Otherwise MSH-10, when MSH could be read.

    Args:
        error: the refusal, from :func:`parse_er7`.
        partner: the sender's profile (by the envelope's MSH-4), or None.

    Returns:
        The id for MSA-2 ('' when the message carried none).
    """
    first = error.envelope.control_id if error.envelope is not None else ""
    batch = error.batch_control_id or ""
    spec = partner.hl7 if partner is not None else None
    if spec is not None and spec.batch_refusal_msa_2 == "BHS-11":
        return batch or first
    return first or batch


def _clean(text: str, message: Hl7Message | None) -> str:
    """Our own text for MSA-3 / ERR-8, with any separator character replaced."""
    specials = set("|^~\\&") | (
        set(message.encoding.values()) | {message.field_separator} if message else set()
    )
    return "".join(" " if c in specials or c in "\r\n" else c for c in text)[:200]


def _msh_9_has_structure(version: str) -> bool:
    """MSH-9.3 (message structure) exists from v2.3.1 on."""
    return _version_tuple(version) >= (2, 3, 1)


_TIME_SLOT = "ZZACKTIMEZZ"
_CONTROL_SLOT = "ZZACKCONTROLZZ"
_ECHO_SLOT = "ZZACKECHOZZ"


@lru_cache(maxsize=256)
def _accept_skeleton(key: tuple[str, ...]) -> str:
    """The AA ACK of one sender/version with slots for MSH-7, MSH-10 and MSA-2, built by
    hl7apy once (building an ACK with hl7apy costs about 2 ms; filling three slots in a
    cached one costs microseconds)."""
    version, sep, component, repetition, escape, sub, app3, fac4, app5, fac6, trigger, proc = key
    fields = ["MSH", sep, f"{component}{repetition}{escape}{sub}", app3, fac4, app5, fac6]
    fields += ["20000101000000", "", "ACK", "X", proc, version]
    message = Hl7Message(
        text=sep.join(fields[:1] + fields[2:]),
        field_separator=sep,
        encoding={
            "COMPONENT": component,
            "REPETITION": repetition,
            "ESCAPE": escape,
            "SUBCOMPONENT": sub,
        },
        version=version,
        segments=(tuple(fields),),
        sending_application="",
        sending_facility="",
        message_code="ACK",
        trigger_event=trigger,
        control_id=_ECHO_SLOT,
        processing_id=proc,
    )
    return _build_ack(
        message,
        "AA",
        control_id=_CONTROL_SLOT,
        time_text=_TIME_SLOT,
        error=None,
        application="FHIR-GATEWAY",
        facility="FHIR-GATEWAY",
    )


def build_ack(
    message: Hl7Message | None,
    code: AckCode,
    *,
    control_id: str,
    now: datetime,
    error: Hl7MessageError | None = None,
    application: str = "FHIR-GATEWAY",
    facility: str = "FHIR-GATEWAY",
    acknowledged_id: str | None = None,
) -> str:
    """The ACK for ``message`` (HL7 v2 chapter 2, original acknowledgment mode), in ER7.

    MSH-3/4 and MSH-5/6 swap the inbound sender and receiver (ours when the inbound MSH
    could not be read); MSH-9 is ``ACK^<MSH-9.2>^ACK`` (no structure before v2.3.1); MSH-10
    is ``control_id``; MSH-11/12 echo the inbound. MSA-1 is ``code`` (HL7 table 0008:
    AA accept, AE error, AR reject) and MSA-2 the inbound MSH-10. With ``error``, MSA-3
    carries its text and an ERR segment its HL7 table 0357 code and position (ERR-2, ERR-3,
    ERR-4 severity ``E``, ERR-8 text from v2.5 on; ERR-1 before). Built with hl7apy.

    Args:
        message: the inbound message, or None when its MSH could not be read.
        code: MSA-1.
        control_id: MSH-10 of the ACK (unique per ACK).
        now: MSH-7.
        error: why, for AE/AR.
        application, facility: our MSH-3/4 when the inbound has no MSH-5/6.
        acknowledged_id: MSA-2 when it is not the inbound MSH-10 (a refused batch:
            :func:`refused_control_id`).

    Returns:
        The ACK segments joined by ``\\r`` (no MLLP framing).
    """
    time_text = now.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")
    if message is not None and error is None and code == "AA" and acknowledged_id is None:
        seg = message.segments[0]
        enc = message.encoding

        def field(n: int) -> str:
            return seg[n] if len(seg) > n else ""

        key = (
            message.version,
            message.field_separator,
            enc["COMPONENT"],
            enc["REPETITION"],
            enc["ESCAPE"],
            enc["SUBCOMPONENT"],
            field(3),
            field(4),
            field(5),
            field(6),
            message.trigger_event,
            message.processing_id or "P",
        )
        return (
            _accept_skeleton(key)
            .replace(_TIME_SLOT, time_text)
            .replace(_CONTROL_SLOT, _clean(control_id, message)[:20])
            .replace(_ECHO_SLOT, _clean(message.control_id, message))
        )
    return _build_ack(
        message,
        code,
        control_id=control_id,
        time_text=time_text,
        error=error,
        application=application,
        facility=facility,
        acknowledged_id=acknowledged_id,
    )


def _build_ack(
    message: Hl7Message | None,
    code: AckCode,
    *,
    control_id: str,
    time_text: str,
    error: Hl7MessageError | None,
    application: str,
    facility: str,
    acknowledged_id: str | None = None,
) -> str:
    version = message.version if message else FALLBACK_VERSION
    if version not in hl7apy.SUPPORTED_LIBRARIES:
        version = FALLBACK_VERSION  # an unsupported MSH-12 is echoed below, as received
    component = message.encoding["COMPONENT"] if message else "^"
    subcomponent = message.encoding["SUBCOMPONENT"] if message else "&"
    encoding = (
        {**message.encoding, "FIELD": message.field_separator, "GROUP": "\r", "SEGMENT": "\r"}
        if message
        else None
    )
    ack = Message("ACK", version=version, encoding_chars=encoding)
    msh = ack.msh
    if message is not None:
        seg = message.segments[0]
        receiving_app = seg[5] if len(seg) > 5 else ""
        receiving_facility = seg[6] if len(seg) > 6 else ""
        msh.msh_3 = receiving_app or application
        msh.msh_4 = receiving_facility or facility
        if len(seg) > 3 and seg[3]:
            msh.msh_5 = seg[3]
        if len(seg) > 4 and seg[4]:
            msh.msh_6 = seg[4]
        trigger = message.trigger_event
        processing = message.processing_id or "P"
    else:
        msh.msh_3 = application
        msh.msh_4 = facility
        trigger = ""
        processing = "P"
    msh.msh_7 = time_text
    if _msh_9_has_structure(version):
        msh.msh_9 = component.join(("ACK", trigger, "ACK"))
    else:
        msh.msh_9 = component.join(("ACK", trigger)) if trigger else "ACK"
    msh.msh_10 = _clean(control_id, message)[:20]
    msh.msh_11 = processing
    if (
        message is not None
        and message.version != version
        and re.fullmatch(r"\d+(\.\d+)+", message.version)
    ):
        msh.msh_12 = message.version
    msa = ack.msa
    msa.msa_1 = code
    if acknowledged_id is None:
        acknowledged_id = message.control_id if message else ""
    msa.msa_2 = _clean(acknowledged_id, message)
    if error is None:
        return str(ack.to_er7())
    text = _clean(str(error), message)
    if _version_tuple(version) < (2, 7):
        msa.msa_3 = text  # withdrawn from v2.7 on (ERR-8 carries the text)
    label = ERROR_TEXT.get(error.hl7_code, "Error")
    position = [error.segment or "", "1" if error.segment else "", str(error.field_position or "")]
    # ERR is written by position: hl7apy's v2.8+ ERR has no ERR-1 at all (withdrawn) and
    # its ER7 would shift every field one place left (ERR-3 severity instead of the code)
    if _version_tuple(version) >= (2, 5):
        location = component.join(position).rstrip(component)
        code_text = component.join((str(error.hl7_code), label, "HL70357"))
        err = ["ERR", "", location, code_text, "E", "", "", "", text]
    else:
        # ERR-1 (ELD): segment ^ sequence ^ field position ^ code (CE, as subcomponents)
        code_text = subcomponent.join((str(error.hl7_code), label, "HL70357"))
        err = ["ERR", component.join([*position, code_text])]
    separator = message.field_separator if message else "|"
    return f"{ack.to_er7()}\r{separator.join(err)}"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())
