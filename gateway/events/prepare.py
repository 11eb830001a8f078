"""Reading a stored inbox message back into clinical events (no database work).

With the current profiles and the pure mappers of ``mappers/``; the focus resources of an
id-only FHIR Subscription notification are read from the EHR with the EHR clients the
caller injects (the worker's), holding no database connection while it waits.
"""

from __future__ import annotations

import json

from gateway.db.models import InboundMessage
from gateway.db.types import utcnow
from gateway.ehr.errors import EhrRejectedError
from gateway.ehr.factory import EhrClients
from gateway.events.service import Prepared
from mappers.errors import MappingError, MappingErrors, Problem
from mappers.events import (
    DEFAULT_MAX_FUTURE,
    ClinicalEvent,
    canonical_to_clinical_event,
    future_time_problem,
    parse_canonical_event,
)
from mappers.hl7v2 import decode_er7, hl7v2_to_clinical_event, parse_er7
from mappers.notifications import focus_to_clinical_event, parse_notification, reference_key
from mappers.partners import partner_to_clinical_event
from mappers.profiles import ProfileSet


class FetchDeferredError(Exception):
    """An id-only notification needs an EHR read and this process has no EHR clients."""


async def prepare(
    message: InboundMessage,
    *,
    profiles: ProfileSet,
    identifier_base: str,
    clients: EhrClients | None,
) -> Prepared:
    """Map a stored message to clinical events with ``profiles`` (pure mappers), reading
    the focus resources of an id-only notification from the EHR with ``clients``. Holds
    no database connection.

    Raises:
        FetchDeferredError: an id-only resource must be read and ``clients`` is None.
        EhrUnavailableError, EhrConfigError: the EHR could not be read (retry later).
    """
    base = identifier_base
    out = Prepared()
    try:
        if message.channel == "events":
            out.events.append(
                canonical_to_clinical_event(parse_canonical_event(json.loads(message.body)))
            )
        elif message.channel == "partner":
            partner = profiles.partners.get(message.sender)
            if partner is None or partner.webhook is None:
                raise MappingError("unknown_partner", "the partner profile is gone", "partner")
            event = partner_to_clinical_event(
                json.loads(message.body), partner, identifier_base=base
            )
            _add(out, event)
        elif message.channel == "hl7v2":
            parsed = parse_er7(decode_er7(message.body))
            partner = profiles.hl7_sender(parsed.sending_facility)
            if partner is None:
                raise MappingError(
                    "unknown_sender", "no partner profile has this facility", "MSH-4"
                )
            _add(out, hl7v2_to_clinical_event(parsed, partner, identifier_base=base))
        elif message.channel == "fhir-notification":
            await _prepare_notification(message, out, profiles, clients)
        else:
            raise MappingError("unknown_channel", "not an event channel", "channel")
    except MappingErrors as exc:
        out.problems += exc.problems
    except MappingError as exc:
        out.problems.append(exc.problem)
    _refuse_future_events(out, message, profiles)
    return out


def _refuse_future_events(out: Prepared, message: InboundMessage, profiles: ProfileSet) -> None:
    """Move the events whose time is more than the sender's ``max_future`` after the
    message's receipt to the problems (``future_timestamp``): applied, one would make the
    case's correct later events count as late (a time read in the wrong zone)."""
    max_future = DEFAULT_MAX_FUTURE
    if message.channel in ("partner", "hl7v2"):
        partner = (
            profiles.partners.get(message.sender or "")
            if message.channel == "partner"
            else profiles.hl7_sender(message.sender or "")
        )
        if partner is not None:
            max_future = partner.max_future
    elif message.channel == "fhir-notification":
        target = profiles.ehr.get(message.sender or "")
        if target is not None and target.events is not None:
            max_future = target.events.max_future
    received_at = message.received_at or utcnow()  # not flushed yet: it arrives now
    kept: list[ClinicalEvent] = []
    for event in out.events:
        problem = future_time_problem(
            event.occurred_at, received_at=received_at, max_future=max_future
        )
        if problem is None:
            kept.append(event)
        else:
            out.problems.append(problem)
    out.events = kept


def _add(out: Prepared, event: ClinicalEvent | None) -> None:
    if event is None:
        out.ignored += 1
    else:
        out.events.append(event)


async def _prepare_notification(
    message: InboundMessage, out: Prepared, profiles: ProfileSet, clients: EhrClients | None
) -> None:
    target = profiles.ehr.get(message.sender)
    if target is None or target.events is None:
        raise MappingError("unknown_target", "the EHR target or its events block is gone", "target")
    notification = parse_notification(json.loads(message.body))
    # the types the target's events table maps: the only ones its topics may name
    types = {rule.resource for rule in target.events.resources}
    for i, event in enumerate(notification.events):
        where = f"notification-event[{i}]"
        key = reference_key(event.focus or "")
        if key is None and event.focus:
            out.problems.append(
                Problem(
                    where,
                    "invalid_focus",
                    "the focus is not a reference Type/id with a FHIR id",
                )
            )
            continue
        if key is not None and key.split("/", 1)[0] not in types:
            out.problems.append(
                Problem(
                    where,
                    "focus_type_not_allowed",
                    f"the focus type is not one this EHR's events table maps "
                    f"({', '.join(sorted(types))}); it is not read",
                )
            )
            continue
        if key is None:
            out.problems.append(
                Problem(
                    where,
                    "missing_focus",
                    "the event has no focus reference (payload 'empty'?): the gateway cannot "
                    "tell what changed; set the Subscription's payload content to id-only or "
                    "full-resource",
                )
            )
            continue
        resource = notification.resources.get(key)
        if resource is None:
            if clients is None:
                raise FetchDeferredError(key)
            rtype, rid = key.split("/", 1)
            try:
                resource = await clients.client_for(target).read(rtype, rid)
            except EhrRejectedError as exc:
                out.problems.append(
                    Problem(
                        where,
                        "focus_unreadable",
                        f"the EHR refused to return {rtype} ({exc.status_code})",
                    )
                )
                continue
            if resource.get("resourceType") != rtype:
                out.problems.append(
                    Problem(where, "focus_mismatch", f"the EHR did not return a {rtype}")
                )
                continue
        try:
            _add(
                out,
                focus_to_clinical_event(
                    resource,
                    target.events,
                    target=target.name,
                    subscription=notification.subscription,
                    event=event,
                    received_at=message.received_at,
                ),
            )
        except MappingError as exc:
            out.problems.append(Problem(f"{where}.{exc.location}", exc.code, str(exc)))
