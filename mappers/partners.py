"""Partner webhook JSON -> :class:`~mappers.events.ClinicalEvent`, driven by the partner's
profile (:class:`~mappers.profiles.events.WebhookSpec`).

Field paths are JMESPath expressions (https://jmespath.org/specification.html), compiled
once per expression. The partner's status is mapped through its table, looked up with
``<type>:<status>``, then ``<status>``, then ``<type>``; a key in ``ignore`` means "nothing
to do"; any other key is an error kept in the exceptions queue. Problems name the profile
field (``fields.occurred_at``), never the value.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import jmespath
from jmespath.parser import ParsedResult

from mappers.errors import MappingError, ProblemCollector
from mappers.events import ClinicalEvent, PatientRef, split_event_ref
from mappers.normalize import parse_datetime
from mappers.profiles.events import PartnerProfile, WebhookFields, expand_system

_MAX_TEXT = 256


@lru_cache(maxsize=512)
def _compiled(expression: str) -> ParsedResult:
    return jmespath.compile(expression)


def _text(data: Any, expression: str | None) -> str | None:
    """The scalar at ``expression`` as text (None when absent, null or empty)."""
    if expression is None:
        return None
    value = _compiled(expression).search(data)
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip()
    return text[:_MAX_TEXT] if text else None


def partner_event_id(data: dict[str, Any], partner: PartnerProfile) -> str:
    """The partner's own id for the event (the dedupe key with the partner's name).

    Raises:
        MappingError: ``missing_event_id`` at ``fields.event_id``.
    """
    assert partner.webhook is not None
    event_id = _text(data, partner.webhook.fields.event_id)
    if not event_id:
        raise MappingError(
            "missing_event_id", "the event id is missing (fields.event_id)", "fields.event_id"
        )
    return event_id


def partner_occurred_at(data: dict[str, Any], fields: WebhookFields) -> datetime:
    """The event time at ``fields.occurred_at`` (ISO 8601 with offset, or Unix time).

    Raises:
        MappingError: ``missing_datetime`` / ``invalid_datetime`` at ``fields.occurred_at``.
    """
    raw = _compiled(fields.occurred_at).search(data)
    if raw is None or raw == "":
        raise MappingError("missing_datetime", "the event time is missing", "fields.occurred_at")
    if fields.time_format == "iso8601":
        if not isinstance(raw, str):
            raise MappingError(
                "invalid_datetime", "expected an ISO 8601 string", "fields.occurred_at"
            )
        try:
            return parse_datetime(raw)
        except MappingError as exc:
            raise exc.at("fields.occurred_at") from exc
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise MappingError("invalid_datetime", "expected a Unix time", "fields.occurred_at")
    try:
        seconds = float(raw)
    except ValueError as exc:
        raise MappingError(
            "invalid_datetime", "expected a Unix time", "fields.occurred_at"
        ) from exc
    if fields.time_format == "unix_ms":
        seconds /= 1000
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise MappingError(
            "invalid_datetime", "Unix time out of range", "fields.occurred_at"
        ) from exc


def status_key(data: dict[str, Any], partner: PartnerProfile) -> tuple[str | None, str | None]:
    """``(key found in the status table or ignore list, what was looked up)``.

    Lookup order: ``<type>:<status>``, ``<status>``, ``<type>``.
    """
    assert partner.webhook is not None
    spec = partner.webhook
    event_type = _text(data, spec.fields.type)
    status = _text(data, spec.fields.status)
    candidates = []
    if event_type and status:
        candidates.append(f"{event_type}:{status}")
    if status:
        candidates.append(status)
    if event_type:
        candidates.append(event_type)
    for key in candidates:
        if key in spec.statuses or key in spec.ignore:
            return key, candidates[0]
    return None, candidates[0] if candidates else None


def partner_to_clinical_event(
    data: dict[str, Any], partner: PartnerProfile, *, identifier_base: str
) -> ClinicalEvent | None:
    """Map one verified partner webhook body.

    Args:
        data: the JSON body (an object).
        partner: the partner profile (``webhook`` block).
        identifier_base: ``GATEWAY_IDENTIFIER_BASE`` for ``{base}`` in identifier systems.

    Returns:
        The event (source = the partner's role, sender = its name), or None when the
        status is in the partner's ``ignore`` list.

    Raises:
        MappingErrors: every problem: no event id, an unknown status (``unmapped_status``),
            no or a bad time, no patient identifier at any of the paths.
    """
    assert partner.webhook is not None
    spec = partner.webhook
    problems = ProblemCollector()
    event_id = problems.run("fields.event_id", partner_event_id, data, partner)
    key, looked_up = status_key(data, partner)
    if key is None:
        problems.add(
            "fields.status",
            "unmapped_status",
            "the partner's type/status is not in its status table"
            if looked_up
            else "the partner's type/status is missing",
        )
    occurred_at = problems.run("fields.occurred_at", partner_occurred_at, data, spec.fields)
    refs: list[PatientRef] = []
    for p in spec.fields.patient:
        value = _text(data, p.path)
        if value is None:
            continue
        if p.system is not None:
            refs.append(
                PatientRef("identifier", value, system=expand_system(p.system, identifier_base))
            )
        else:
            refs.append(PatientRef("remote_id", value, target=p.remote_id_of))
    if not refs:
        problems.add("fields.patient", "missing_patient", "no patient identifier at any path")
    problems.raise_if_any()
    assert key is not None and event_id is not None and occurred_at is not None
    if key in spec.ignore and key not in spec.statuses:
        return None
    event_type, detail = split_event_ref(spec.statuses[key])
    return ClinicalEvent(
        source=partner.source,
        sender=partner.name,
        event_id=event_id,
        type=event_type,
        detail=detail,
        occurred_at=occurred_at,
        patient=tuple(refs),
        case_id=_text(data, spec.fields.case_id),
        reference=_text(data, spec.fields.reference),
    )
