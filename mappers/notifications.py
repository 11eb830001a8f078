"""FHIR Subscription notifications (Subscriptions R5 Backport IG, R4) -> clinical events.

Spec: https://hl7.org/fhir/uv/subscriptions-backport/STU1.1/notifications.html and
``payloads.html``. Every notification is a ``Bundle`` of type ``history`` (R4) or
``subscription-notification`` (R4B, R5: https://hl7.org/fhir/R5/subscriptions.html) whose
first entry is the subscription status: an R4 ``Parameters`` (profile
``backport-subscription-status-r4``) or an R4B/R5 ``SubscriptionStatus``. Parameters are read
by name, never by position: ``subscription``, ``topic``, ``status``, ``type``
(``handshake | heartbeat | event-notification | query-status | query-event``),
``events-since-subscription-start`` and ``notification-event`` (parts ``event-number``,
``timestamp``, ``focus``).

Payloads: ``full-resource`` bundles carry the focus resources in later entries;
``id-only`` ones only their URLs, and the service fetches them. :func:`focus_to_clinical_event`
maps a focus resource with the EHR target's table (:class:`EhrEventsSpec`), and
:func:`track_event_numbers` finds missed events from the event numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from mappers.errors import MappingError, MappingErrors, Problem
from mappers.events import ClinicalEvent, PatientRef, split_event_ref
from mappers.intake import pydantic_problems
from mappers.normalize import parse_datetime
from mappers.profiles.events import EhrEventsSpec, FocusRule

NOTIFICATION_TYPES = frozenset(
    {"handshake", "heartbeat", "event-notification", "query-status", "query-event"}
)
#: ``history`` in R4 (Backport IG); ``subscription-notification`` in R4B and R5.
NOTIFICATION_BUNDLE_TYPES = frozenset({"history", "subscription-notification"})
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
#: What to tell an EHR whose Subscription sends something other than a notification Bundle.
CONFIGURE_BACKPORT = (
    "configure the Subscription per the Subscriptions R5 Backport IG "
    "(backport-subscription profile, payload id-only or full-resource)"
)
_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([^/]+))?/?$")
_SUBJECT = {
    "Task": "for",
    "MedicationRequest": "subject",
    "Encounter": "subject",
    "CommunicationRequest": "subject",
    "ServiceRequest": "subject",
}


@dataclass(frozen=True)
class NotificationEvent:
    """One ``notification-event``: its number, time and focus reference (as sent)."""

    number: int | None
    timestamp: datetime | None
    focus: str | None


@dataclass(frozen=True)
class Notification:
    """A parsed notification Bundle.

    Attributes:
        type: the notification type (``event-notification``...).
        subscription: ``Subscription/<id>`` (the server part of an absolute URL dropped).
        topic, status: as sent (``status``: requested | active | error | off).
        events_since: ``events-since-subscription-start``, or None.
        events: the notification events, in the order sent.
        resources: full resources in the bundle, by ``Type/id``.
        timestamp: ``Bundle.timestamp``.
    """

    type: str
    subscription: str
    topic: str | None
    status: str | None
    events_since: int | None
    events: tuple[NotificationEvent, ...]
    resources: dict[str, dict[str, Any]]
    timestamp: datetime | None

    @property
    def event_numbers(self) -> list[int]:
        """The event numbers in this notification."""
        return [e.number for e in self.events if e.number is not None]


def reference_key(reference: str) -> str | None:
    """``https://ehr/fhir/Task/12/_history/3`` or ``Task/12`` -> ``Task/12`` (None if neither).

    The id must be a FHIR id (https://hl7.org/fhir/R4/datatypes.html#id:
    ``[A-Za-z0-9.-]{1,64}``) and not only dots: ``Task/..`` would walk the EHR's base
    path when read (``GET [base]/Task/..``), so it is no reference (None)."""
    match = _REFERENCE.search(reference.strip())
    if match is None or not match.group(2).strip("."):
        return None
    return f"{match.group(1)}/{match.group(2)}"


def _value(element: Any) -> Any:
    """The ``value[x]`` of a Parameters parameter / part (whichever is present)."""
    for name, value in element:
        if name.startswith("value") and not name.endswith("__ext") and value is not None:
            return value
    return None


def _number(value: Any, where: str, problems: list[Problem]) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    if not text.isdigit():
        problems.append(Problem(where, "invalid_number", "expected a non-negative whole number"))
        return None
    return int(text)


def _reference_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return getattr(value, "reference", None)


def parse_notification(data: dict[str, Any]) -> Notification:
    """Read a notification Bundle (R4 ``Parameters`` status or R4B ``SubscriptionStatus``).

    The Bundle is validated with ``fhir.resources.R4B`` (structure only).

    Raises:
        MappingErrors: not a Bundle (``not_a_notification_bundle``: a classic R4
            rest-hook sends the bare resource), not a ``history`` or
            ``subscription-notification`` Bundle, no status in ``entry[0]``, an unknown
            notification ``type``, no ``subscription``, event numbers that are not numbers;
            locations are Bundle paths, never values.
    """
    rtype = data.get("resourceType")
    if rtype != "Bundle":
        named = (
            f"a {rtype}" if isinstance(rtype, str) and _TYPE_NAME.match(rtype) else "no resource"
        )
        raise MappingErrors(
            [
                Problem(
                    "resourceType",
                    "not_a_notification_bundle",
                    f"the body is {named}, not a notification Bundle (a classic R4 rest-hook "
                    f"payload?): {CONFIGURE_BACKPORT}",
                )
            ]
        )
    try:
        bundle = Bundle.model_validate(data)
    except ValidationError as exc:
        raise MappingErrors(pydantic_problems(exc)) from exc
    except (KeyError, ValueError, TypeError) as exc:
        # fhir.resources raises KeyError for a resourceType R4B does not know.
        raise MappingErrors(
            [Problem("entry", "unknown_resource_type", "an entry has an unknown resourceType")]
        ) from exc
    problems: list[Problem] = []
    if bundle.type not in NOTIFICATION_BUNDLE_TYPES:
        problems.append(
            Problem(
                "type",
                "not_history",
                "a notification is a history Bundle (R4 Backport IG) or a "
                "subscription-notification Bundle (R4B, R5)",
            )
        )
    entries = bundle.entry or []
    status = entries[0].resource if entries else None
    kind = type(status).__name__ if status is not None else None
    if kind not in ("Parameters", "SubscriptionStatus"):
        problems.append(
            Problem(
                "entry[0].resource",
                "missing_status",
                "entry[0] must be the subscription status (Parameters or SubscriptionStatus)",
            )
        )
        raise MappingErrors(problems)
    if kind == "Parameters":
        parsed = _from_parameters(status, problems)
    else:
        parsed = _from_subscription_status(status, problems)
    ntype, subscription, topic, sub_status, since, events = parsed
    if ntype not in NOTIFICATION_TYPES:
        problems.append(
            Problem("entry[0].resource.type", "unknown_type", "unknown notification type")
        )
    sub_key = reference_key(subscription or "")
    if not sub_key or not sub_key.startswith("Subscription/"):
        problems.append(
            Problem(
                "entry[0].resource.subscription",
                "missing_subscription",
                "the subscription reference is required (Subscription/<id>)",
            )
        )
    if problems:
        raise MappingErrors(problems)
    resources: dict[str, dict[str, Any]] = {}
    for entry in entries[1:]:
        if entry.resource is None:
            continue
        resource = entry.resource.model_dump(mode="json")
        key = f"{resource['resourceType']}/{resource.get('id')}" if resource.get("id") else None
        if key is None and entry.fullUrl:
            key = reference_key(str(entry.fullUrl))
        if key:
            resources[key] = resource
    return Notification(
        type=str(ntype),
        subscription=str(sub_key),
        topic=topic,
        status=sub_status,
        events_since=since,
        events=tuple(events),
        resources=resources,
        timestamp=bundle.timestamp,
    )


_Parsed = tuple[str | None, str | None, str | None, str | None, int | None, list[NotificationEvent]]


def _from_parameters(params: Any, problems: list[Problem]) -> _Parsed:
    values: dict[str, Any] = {}
    events: list[NotificationEvent] = []
    for i, p in enumerate(params.parameter or []):
        if p.name == "notification-event":
            parts = {part.name: _value(part) for part in p.part or []}
            events.append(
                NotificationEvent(
                    number=_number(
                        parts.get("event-number"),
                        f"entry[0].resource.parameter[{i}].event-number",
                        problems,
                    ),
                    timestamp=parts.get("timestamp"),
                    focus=_reference_text(parts.get("focus")),
                )
            )
        else:
            values.setdefault(p.name, _value(p))
    since = _number(
        values.get("events-since-subscription-start"),
        "entry[0].resource.events-since-subscription-start",
        problems,
    )
    return (
        values.get("type"),
        _reference_text(values.get("subscription")),
        values.get("topic"),
        values.get("status"),
        since,
        events,
    )


def _from_subscription_status(status: Any, problems: list[Problem]) -> _Parsed:
    events = [
        NotificationEvent(
            number=_number(
                e.eventNumber, f"entry[0].resource.notificationEvent[{i}].eventNumber", problems
            ),
            timestamp=e.timestamp,
            focus=_reference_text(e.focus),
        )
        for i, e in enumerate(status.notificationEvent or [])
    ]
    since = _number(
        status.eventsSinceSubscriptionStart,
        "entry[0].resource.eventsSinceSubscriptionStart",
        problems,
    )
    return (
        status.type,
        _reference_text(status.subscription),
        status.topic,
        status.status,
        since,
        events,
    )


# --------------------------------------------------------------------------- focus


def _codes(resource: dict[str, Any], rtype: str) -> set[str]:
    concepts: list[Any] = []
    if rtype in ("Task", "ServiceRequest"):
        concepts = [resource.get("code")]
    elif rtype == "CommunicationRequest":
        concepts = list(resource.get("category") or [])
    elif rtype == "Encounter":
        concepts = list(resource.get("type") or [])
    return {
        str(c.get("code"))
        for concept in concepts
        if isinstance(concept, dict)
        for c in concept.get("coding") or []
        if c.get("code")
    }


def _business_status(resource: dict[str, Any]) -> set[str]:
    concept = resource.get("businessStatus") or {}
    out = {str(c.get("code")) for c in concept.get("coding") or [] if c.get("code")}
    if concept.get("text"):
        out.add(str(concept["text"]))
    return out


def _matches(rule: FocusRule, resource: dict[str, Any], rtype: str) -> bool:
    if rule.resource != rtype:
        return False
    if rule.status and resource.get("status") not in rule.status:
        return False
    if rule.intent and resource.get("intent") not in rule.intent:
        return False
    if rule.code and not (_codes(resource, rtype) & set(rule.code)):
        return False
    return not (
        rule.business_status and not (_business_status(resource) & set(rule.business_status))
    )


def focus_rule(spec: EhrEventsSpec, resource: dict[str, Any]) -> FocusRule | None:
    """The first row of the target's table that ``resource`` matches, or None."""
    rtype = str(resource.get("resourceType"))
    return next((r for r in spec.resources if _matches(r, resource, rtype)), None)


def focus_to_clinical_event(
    resource: dict[str, Any],
    spec: EhrEventsSpec,
    *,
    target: str,
    subscription: str,
    event: NotificationEvent,
    received_at: datetime,
) -> ClinicalEvent | None:
    """Map one focus resource with the EHR target's table.

    Args:
        resource: the focus resource (R4 JSON), from the bundle or fetched.
        spec: the target's ``events`` block.
        target: the EHR target's name (the sender; ``remote_ids`` are per target).
        subscription: ``Subscription/<id>`` (event id when the resource has no version).
        event: the notification event (its timestamp is the occurrence time).
        received_at: the last resort for the occurrence time.

    Returns:
        The event (``event_id`` ``Type/id/_history/<versionId>`` when the resource has a
        version, else ``<subscription>#<event number>``; the patient from ``Task.for`` /
        ``subject``: its Patient id in this EHR, or its identifier), or None when the row
        says ``ignore`` or no row matches and the target ignores unmatched resources.

    Raises:
        MappingError: ``unmapped_focus`` (no row, ``unmatched: exception``),
            ``missing_patient`` (no Patient reference or identifier), ``invalid_datetime``.
    """
    rtype = str(resource.get("resourceType"))
    rule = focus_rule(spec, resource)
    if rule is None:
        if spec.unmatched == "ignore":
            return None
        raise MappingError(
            "unmapped_focus",
            f"no row of the target's events table matches this {rtype} "
            f"(status {resource.get('status')!r})",
            "focus",
        )
    if rule.ignore or rule.event is None:
        return None
    patient = _patient_refs(resource.get(_SUBJECT.get(rtype, "subject")), target)
    if not patient:
        raise MappingError(
            "missing_patient",
            f"the {rtype} names no Patient (reference or identifier)",
            _SUBJECT.get(rtype, "subject"),
        )
    meta = resource.get("meta") or {}
    version = meta.get("versionId")
    rid = resource.get("id")
    if version and rid:
        event_id = f"{rtype}/{rid}/_history/{version}"
    elif event.number is not None:
        event_id = f"{subscription}#{event.number}"
    else:
        raise MappingError(
            "missing_event_id", "neither a resource version nor an event number", "focus"
        )
    event_type, detail = split_event_ref(rule.event)
    return ClinicalEvent(
        source=spec.source,
        sender=target,
        event_id=event_id,
        type=event_type,
        detail=detail,
        occurred_at=_occurred_at(resource, event, received_at),
        patient=patient,
        reference=f"{rtype}/{rid}" if rid else None,
    )


def _patient_refs(reference: Any, target: str) -> tuple[PatientRef, ...]:
    if not isinstance(reference, dict):
        return ()
    refs: list[PatientRef] = []
    text = reference.get("reference")
    if isinstance(text, str):
        key = reference_key(text)
        if key and key.startswith("Patient/"):
            refs.append(PatientRef("remote_id", key.split("/", 1)[1], target=target))
    identifier = reference.get("identifier")
    if isinstance(identifier, dict) and identifier.get("system") and identifier.get("value"):
        refs.append(
            PatientRef("identifier", str(identifier["value"]), system=str(identifier["system"]))
        )
    return tuple(refs)


def _occurred_at(
    resource: dict[str, Any], event: NotificationEvent, received_at: datetime
) -> datetime:
    if event.timestamp is not None:
        return event.timestamp
    for value in ((resource.get("meta") or {}).get("lastUpdated"), resource.get("lastModified")):
        if isinstance(value, str) and "T" in value:
            try:
                return parse_datetime(value)
            except MappingError:
                continue
    return received_at


# --------------------------------------------------------------------------- gaps


@dataclass(frozen=True)
class Gap:
    """Events ``first``..``last`` (inclusive) not received; ``exception_id`` once recorded."""

    first: int
    last: int
    exception_id: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        """For storing: ``{"first", "last", "exception_id"}``."""
        return {"first": self.first, "last": self.last, "exception_id": self.exception_id}


@dataclass(frozen=True)
class GapUpdate:
    """The result of :func:`track_event_numbers`."""

    last_seen: int
    missing: list[Gap]
    new_gaps: list[Gap]
    resolved_exception_ids: list[int]


def _split(gap: Gap, received: list[int]) -> list[Gap]:
    """What is left of ``gap`` once ``received`` (sorted) arrived."""
    parts: list[Gap] = []
    current = gap.first
    for n in received:
        if n < gap.first or n > gap.last:
            continue
        if n > current:
            parts.append(Gap(current, n - 1, gap.exception_id))
        current = max(current, n + 1)
    if current <= gap.last:
        parts.append(Gap(current, gap.last, gap.exception_id))
    return parts


def track_event_numbers(
    *,
    last_seen: int,
    missing: Iterable[Gap],
    numbers: Iterable[int],
    events_since: int | None,
) -> GapUpdate:
    """Find missed events of one subscription (Backport IG, "Handling Errors": compare
    ``event-number`` and ``events-since-subscription-start`` with the last seen).

    Worked example: last seen 3, a notification with event 6 and events-since 6: events 4
    and 5 are a new gap (``Gap(4, 5)``) and 6 is the new last seen. If 4 and 5 arrive late,
    the gap empties and its exception id is returned as resolved.

    Args:
        last_seen: the highest event number seen so far (0 before the first).
        missing: the gaps still open.
        numbers: the event numbers just received (empty for a heartbeat).
        events_since: ``events-since-subscription-start`` as sent (a heartbeat's count
            reveals events that never arrived).

    Returns:
        The new last seen, the gaps still open (old ones minus what arrived, new ones
        without an exception id), the new gaps, and the exception ids whose gaps are filled.
    """
    received = sorted(set(numbers))
    before = list(missing)
    remaining = [part for gap in before for part in _split(gap, received)]
    new: list[Gap] = []
    previous = last_seen
    for n in received:
        if n <= previous:
            continue
        if n > previous + 1:
            new.append(Gap(previous + 1, n - 1))
        previous = n
    high = max(previous, events_since or 0)
    if high > previous:
        new.append(Gap(previous + 1, high))
    still_open = {g.exception_id for g in remaining}
    resolved = sorted({g.exception_id for g in before if g.exception_id is not None} - still_open)
    return GapUpdate(high, remaining + new, new, [r for r in resolved if r is not None])
