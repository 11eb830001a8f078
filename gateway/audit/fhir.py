"""Audit entries as FHIR R4 AuditEvents (IHE BALP), and their search.

Each entry renders as one AuditEvent after the BALP profiles
(https://profiles.ihe.net/ITI/BALP/, Basic Read / Query / Create / Update, and their
Patient variants):

* ``type`` ``audit-event-type#rest`` and ``subtype`` the FHIR restful-interaction
  (read, search-type, create, update, delete), or for the gateway's own actions (ingest,
  deliver, replay...) ``<identifier base>/audit-action#<action>``;
* ``action`` C/R/U/D/E, ``outcome`` 0/4/8/12, ``recorded`` the time (UTC);
* ``agent``: the client (DICOM 110153 Source Role ID, requestor, ``network.address`` the
  peer's IP address, ``who.identifier`` the API client's name in
  ``<identifier base>/api-client``; a CLI user or the system otherwise) and the gateway
  (DICOM 110152 Destination Role ID);
* ``source``: the gateway (security-source-type 4, application server);
* ``entity``: the Patient (audit-entity-type 1, object-role 1) when known, the resource
  (audit-entity-type 2, object-role 4 domain resource) and for searches the query
  (object-role 24, ``query`` base64 and ``description`` the query string);
* the hash chain in an extension (``<identifier base>/audit-chain``: seq, prevHash,
  hash), so an exported AuditEvent can be checked against the chain.

Search (:func:`search`): ``patient`` (``Patient/id`` or ``id``), ``agent`` (client name,
``cli:<user>``, ``worker``), ``date`` (FHIR date prefixes ``eq ge gt le lt``, repeatable),
``action`` (C R U D E, comma for or), ``_count`` (default 50, at most 500), newest first.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit.service import RESTFUL
from gateway.db.models import AuditEntry

DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST_SUBTYPE = {
    "read": "read",
    "search": "search-type",
    "create": "create",
    "update": "update",
    "delete": "delete",
}
OUTCOME_TEXT = {"0": "Success", "4": "Minor failure", "8": "Serious failure", "12": "Major failure"}
ACTIONS = ("C", "R", "U", "D", "E")
DATE_PREFIXES = ("eq", "ge", "gt", "le", "lt")


class AuditSearchError(ValueError):
    """A search parameter of ``GET /fhir/AuditEvent`` is not valid (``problems`` names
    each: ``(parameter, message)``)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


def to_audit_event(row: AuditEntry, *, identifier_base: str, observer: str) -> dict[str, Any]:
    """One audit entry as a FHIR R4 AuditEvent (BALP); see the module docstring.

    Args:
        identifier_base: the gateway's identifier base (``GATEWAY_IDENTIFIER_BASE``).
        observer: the gateway's name as ``source.observer`` (its public base URL).
    """
    if row.action in RESTFUL:
        subtype = {
            "system": "http://hl7.org/fhir/restful-interaction",
            "code": REST_SUBTYPE[row.action],
        }
    else:
        subtype = {"system": f"{identifier_base}/audit-action", "code": row.action}
    requestor: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": {
            "identifier": {"system": f"{identifier_base}/api-client", "value": row.actor},
            "display": row.actor,
        },
        "requestor": True,
    }
    if row.agent_kind != "client":
        requestor["who"]["identifier"]["system"] = f"{identifier_base}/{row.agent_kind}"
    if row.source_address:
        requestor["network"] = {"address": row.source_address, "type": "2"}
    entities: list[dict[str, Any]] = []
    if row.patient_id:
        entities.append(
            {
                "what": {"reference": f"Patient/{row.patient_id}"},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                },
            }
        )
    if row.entity_id != "*" and not (
        row.entity_type == "Patient" and row.entity_id == row.patient_id
    ):
        what: dict[str, Any] = (
            {"reference": f"{row.entity_type}/{row.entity_id}"}
            if row.entity_type[:1].isupper() and "_" not in row.entity_type
            else {
                "identifier": {
                    "system": f"{identifier_base}/{row.entity_type}",
                    "value": row.entity_id,
                }
            }
        )
        entities.append(
            {
                "what": what,
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "4",
                },
            }
        )
    if row.query is not None:
        entities.append(
            {
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "24",
                },
                "description": row.query,
                "query": base64.b64encode(row.query.encode()).decode(),
            }
        )
    if row.detail:
        entities.append(
            {
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "4",
                },
                "detail": [
                    {"type": str(k), "valueString": str(v)} for k, v in sorted(row.detail.items())
                ],
            }
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row.id),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [subtype],
        "action": row.code,
        "recorded": row.at.astimezone(UTC).isoformat(timespec="microseconds"),
        "outcome": row.outcome,
        "agent": [
            requestor,
            {
                "type": {
                    "coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]
                },
                "who": {"display": observer},
                "requestor": False,
                "network": {"address": observer, "type": "5"},
            },
        ],
        "source": {
            "observer": {"display": observer},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
    }
    if row.outcome != "0":
        event["outcomeDesc"] = OUTCOME_TEXT.get(row.outcome, row.outcome)
    if entities:
        event["entity"] = entities
    if row.seq is not None:
        event["extension"] = [
            {
                "url": f"{identifier_base}/audit-chain",
                "extension": [
                    {"url": "seq", "valueString": str(row.seq)}
                    if row.seq > 2**31 - 1
                    else {"url": "seq", "valueInteger": row.seq},
                    {"url": "prevHash", "valueString": row.prev_hash},
                    {"url": "hash", "valueString": row.hash},
                ],
            }
        ]
    return event


@dataclass(frozen=True)
class AuditQuery:
    """A parsed ``GET /fhir/AuditEvent`` search."""

    patient: str | None = None
    agent: str | None = None
    actions: tuple[str, ...] = ()
    dates: tuple[tuple[str, datetime, datetime], ...] = ()  # (prefix, start, end of the value)
    count: int = 50
    offset: int = 0


def _parse_date(value: str) -> tuple[str, datetime, datetime]:
    prefix = value[:2] if value[:2] in DATE_PREFIXES else "eq"
    text = value[2:] if value[:2] in DATE_PREFIXES else value
    try:
        if len(text) == 4:
            start = datetime(int(text), 1, 1, tzinfo=UTC)
            end = datetime(int(text) + 1, 1, 1, tzinfo=UTC)
        elif len(text) == 7:
            year, month = int(text[:4]), int(text[5:7])
            start = datetime(year, month, 1, tzinfo=UTC)
            end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        elif len(text) == 10:
            start = datetime.fromisoformat(text).replace(tzinfo=UTC)
            end = start + timedelta(days=1)
        else:
            start = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if start.tzinfo is None:
                raise ValueError("a date-time needs its offset")
            end = start + timedelta(microseconds=1)
    except ValueError as exc:
        raise ValueError("not a FHIR date or dateTime") from exc
    return prefix, start.astimezone(UTC), end.astimezone(UTC)


def parse_query(
    *,
    patient: str | None,
    agent: str | None,
    dates: Sequence[str],
    action: str | None,
    count: int | None,
    offset: int | None,
) -> AuditQuery:
    """Parse the search parameters (see the module docstring).

    Raises:
        AuditSearchError: a value is not valid (every problem listed).
    """
    problems: list[tuple[str, str]] = []
    if patient is not None:
        patient = patient.removeprefix("Patient/")
        if not patient or len(patient) > 64 or "/" in patient:
            problems.append(("patient", "must be Patient/<id> or <id>"))
    parsed_dates = []
    for value in dates:
        try:
            parsed_dates.append(_parse_date(value))
        except ValueError:
            problems.append(
                (
                    "date",
                    "must be a FHIR date or dateTime with an optional prefix eq, ge, gt, le, lt",
                )
            )
    actions: tuple[str, ...] = ()
    if action is not None:
        actions = tuple(a.strip() for a in action.split(","))
        if not actions or any(a not in ACTIONS for a in actions):
            problems.append(("action", "must be C, R, U, D or E (comma-separated for any of them)"))
    if count is not None and not 0 <= count <= 500:
        problems.append(("_count", "must be between 0 and 500"))
    if offset is not None and not 0 <= offset <= 1_000_000:
        problems.append(("_offset", "must be between 0 and 1000000"))
    if problems:
        raise AuditSearchError(problems)
    return AuditQuery(
        patient=patient,
        agent=agent,
        actions=actions,
        dates=tuple(parsed_dates),
        count=50 if count is None else count,
        offset=offset or 0,
    )


def _filtered(query: AuditQuery) -> Select[Any]:
    stmt = select(AuditEntry)
    if query.patient is not None:
        stmt = stmt.where(AuditEntry.patient_id == query.patient)
    if query.agent is not None:
        stmt = stmt.where(AuditEntry.actor == query.agent)
    if query.actions:
        stmt = stmt.where(AuditEntry.code.in_(query.actions))
    for prefix, start, end in query.dates:
        if prefix == "eq":
            stmt = stmt.where(AuditEntry.at >= start, AuditEntry.at < end)
        elif prefix == "ge":
            stmt = stmt.where(AuditEntry.at >= start)
        elif prefix == "gt":
            stmt = stmt.where(AuditEntry.at >= end)
        elif prefix == "le":
            stmt = stmt.where(AuditEntry.at < end)
        else:  # lt
            stmt = stmt.where(AuditEntry.at < start)
    return stmt


async def search(session: AsyncSession, query: AuditQuery) -> tuple[list[AuditEntry], bool]:
    """The entries matching ``query``, newest first: ``(page, more after it)``."""
    rows = list(
        await session.scalars(
            _filtered(query)
            .order_by(AuditEntry.at.desc(), AuditEntry.id.desc())
            .offset(query.offset)
            .limit(query.count + 1)
        )
    )
    return rows[: query.count], len(rows) > query.count


async def export(
    session: AsyncSession, query: AuditQuery, *, batch: int = 1000
) -> AsyncIterator[AuditEntry]:
    """Every entry matching ``query`` (ignoring its paging), oldest first, in batches:
    an async iterator of :class:`AuditEntry`."""
    last_id = 0
    while True:
        rows = list(
            await session.scalars(
                _filtered(query).where(AuditEntry.id > last_id).order_by(AuditEntry.id).limit(batch)
            )
        )
        for row in rows:
            yield row
        if len(rows) < batch:
            return
        last_id = rows[-1].id
