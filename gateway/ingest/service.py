"""Intake and checkout ingestion: validate, normalize, map, store with the outbox.

One inbound message is handled in one database transaction: the inbox row, the FHIR
resources (with history), the patient matching keys, the outbox rows for every enabled
EHR target, the case event and the audit entries are written together or not at all.
A payload that is rejected is kept for review in the exceptions queue by the caller
(:func:`record_rejection`), in its own transaction.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import BulkInserts
from gateway.db.models import AuditEntry, FhirResource, InboundMessage, MessageStatus
from gateway.db.types import utcnow
from gateway.delivery.outbox import enqueue_ehr_deliveries
from gateway.errors import BadRequestError, ConflictError, GatewayError, UnprocessableError
from gateway.fhir import repository as fhir_repo
from gateway.fhir.repository import ProfileRef
from gateway.inbox import repository as inbox
from gateway.logging import get_logger
from gateway.runtime import Runtime
from gateway.workflow.service import EventInput, apply_event
from mappers.checkout import (
    CanonicalCheckout,
    checkout_to_medication_request,
    checkout_to_patient,
    parse_checkout,
    stripe_session_to_checkout,
)
from mappers.errors import MappingErrors, Problem
from mappers.identifiers import IdentifierSystems
from mappers.intake import (
    intake_to_patient,
    intake_to_questionnaire_response,
    parse_intake_submission,
)
from mappers.patient import merge_patient
from mappers.profiles import Plan
from mappers.provenance import provenance_for
from mappers.validation import validate_resources

log = get_logger(__name__)

#: How Stripe checkout events are handled.
STRIPE_CHECKOUT_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)
PAID_STATUSES = frozenset({"paid", "no_payment_required"})


@dataclass
class Outcome:
    """The answer to an ingest request: HTTP status and JSON body."""

    status_code: int
    body: dict[str, Any]
    message_id: str | None = None
    created: list[str] = field(default_factory=list)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object.

    Raises:
        BadRequestError: not UTF-8 JSON (the problem names line and column), or nested
            too deeply to parse.
        UnprocessableError: valid JSON that is not an object.
    """
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise BadRequestError(
            "the body is not UTF-8",
            [Problem("", "invalid_encoding", "the body must be UTF-8 JSON")],
        ) from exc
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            "the body is not valid JSON",
            [Problem("", "invalid_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}")],
        ) from exc
    except RecursionError as exc:
        # json.loads recurses once per nesting level; a small body can exhaust the stack.
        raise BadRequestError(
            "the body is not valid JSON",
            [Problem("", "invalid_json", "arrays or objects are nested too deeply")],
        ) from exc
    if not isinstance(data, dict):
        raise UnprocessableError(
            "the body must be a JSON object", [Problem("", "type_error", "expected a JSON object")]
        )
    return data


async def record_rejection(
    runtime: Runtime,
    *,
    channel: str,
    sender: str | None,
    error: GatewayError,
    payload: bytes,
    content_type: str | None,
) -> int:
    """Keep a rejected payload for review, in its own transaction (the request's own
    transaction is rolled back, so nothing of the rejected message is half written).

    Returns:
        The exceptions-queue id.
    """
    problems = error.problems or [Problem("", error.slug, error.detail)]
    async with runtime.write_session() as session:
        record = inbox.new_exception(
            kind="rejected_input",
            channel=channel,
            sender=sender,
            problems=problems,
            payload=payload,
            content_type=content_type,
        )
        session.add(record)
        await session.commit()
    log.info(
        "ingest.rejected",
        channel=channel,
        exception_id=record.id,
        status_code=error.status,
        problems=len(problems),
    )
    return record.id


# --------------------------------------------------------------------------- patients


@dataclass(frozen=True)
class PatientMatch:
    """The canonical patient a message belongs to, and how it was found."""

    patient_id: str
    existing: dict[str, Any] | None
    matched_on: str | None
    conflicts: list[str]
    row: FhirResource | None = None
    checked: dict[tuple[str, str], str | None] = field(default_factory=dict)


async def match_patient(session: AsyncSession, keys: list[tuple[str, str]]) -> PatientMatch:
    """Find the canonical Patient for ``keys``, in priority order (first match wins).

    Keys are ``("identifier", "system|value")``, ``("submission", id)``,
    ``("email", normalized)``. When keys point at different patients, the first wins and
    the others are reported in ``conflicts`` (for the exceptions queue).
    """
    found = await fhir_repo.patients_for_keys(session, keys)
    checked: dict[tuple[str, str], str | None] = {k: found.get(k) for k in keys}
    chosen: tuple[str, str] | None = next((k for k in keys if k in found), None)
    if chosen is None:
        return PatientMatch(str(uuid.uuid4()), None, None, [], None, checked)
    patient_id = found[chosen]
    conflicts = [k[0] for k in keys if k in found and found[k] != patient_id]
    row = await fhir_repo.get_resource(session, "Patient", patient_id)
    return PatientMatch(
        patient_id, row.resource if row else None, chosen[0], conflicts, row, checked
    )


# --------------------------------------------------------------------------- storing


@dataclass
class MappedMessage:
    """The resources mapped from one message, ready to store."""

    message: InboundMessage
    patient_id: str
    resources: list[dict[str, Any]]
    profile: ProfileRef | None
    keys: list[tuple[str, str]]
    event: EventInput | None
    actor: str
    kind: str
    current: dict[str, FhirResource | None] = field(default_factory=dict)
    checked_keys: dict[tuple[str, str], str | None] = field(default_factory=dict)


async def store_mapped(
    session: AsyncSession, runtime: Runtime, mapped: MappedMessage
) -> dict[str, Any]:
    """Validate and store a mapped message with its Provenance, outbox rows, case event
    and audit entries. Flushes; the request dependency commits.

    Raises:
        UnprocessableError: the mapping produced FHIR that does not validate (a profile
            problem): every problem listed, nothing stored.
    """
    now = utcnow()
    settings = runtime.settings
    written = mapped.resources
    changed_refs: list[str] = []
    provenance_id = str(uuid.uuid4())
    existed = {}
    for r in written:
        ref = f"{r['resourceType']}/{r['id']}"
        existed[ref] = (
            mapped.current[ref]
            if ref in mapped.current
            else await fhir_repo.get_resource(session, r["resourceType"], r["id"])
        )
    profile_tag = (
        f"{mapped.kind}/{mapped.profile.id}/{mapped.profile.version}#sha256={mapped.profile.content_hash}"
        if mapped.profile
        else None
    )
    provenance = provenance_for(
        provenance_id=provenance_id,
        targets=[f"{r['resourceType']}/{r['id']}" for r in written],
        recorded=now,
        message_id=mapped.message.id,
        message_kind=mapped.message.channel,
        systems=runtime.systems,
        author=f"Patient/{mapped.patient_id}",
        organization=settings.organization_name,
        activity="UPDATE" if any(existed.values()) else "CREATE",
        profile=profile_tag,
    )
    try:
        validate_resources([*written, provenance])
    except MappingErrors as exc:
        raise UnprocessableError(
            "the mapped FHIR resources do not validate (check the profile)", exc.problems
        ) from exc

    bulk = BulkInserts()
    for resource in written:
        ref = f"{resource['resourceType']}/{resource['id']}"
        _, changed = await fhir_repo.save_resource(
            session,
            resource,
            message_id=mapped.message.id,
            patient_id=mapped.patient_id,
            profile=mapped.profile,
            current=existed[ref],
            bulk=bulk,
        )
        if changed:
            changed_refs.append(ref)
            bulk.add(
                AuditEntry,
                at=now,
                actor=mapped.actor,
                action="update" if existed[ref] else "create",
                entity_type=resource["resourceType"],
                entity_id=resource["id"],
                detail={"message_id": mapped.message.id},
            )
    deliveries = []
    if changed_refs:
        provenance["target"] = [{"reference": r} for r in changed_refs]
        await fhir_repo.save_resource(
            session,
            provenance,
            message_id=mapped.message.id,
            patient_id=mapped.patient_id,
            profile=mapped.profile,
            current=None,
            bulk=bulk,
        )
        bulk.add(
            AuditEntry,
            at=now,
            actor=mapped.actor,
            action="create",
            entity_type="Provenance",
            entity_id=provenance_id,
            detail={"message_id": mapped.message.id},
        )
        # The Patient always travels with its resources so references resolve.
        refs = (
            [f"Patient/{mapped.patient_id}"]
            + [r for r in changed_refs if not r.startswith("Patient/")]
            + [f"Provenance/{provenance_id}"]
        )
        deliveries = enqueue_ehr_deliveries(
            session,
            runtime.profiles.current.enabled_targets(),
            message_id=mapped.message.id,
            patient_id=mapped.patient_id,
            resource_refs=refs,
            received_at=mapped.message.received_at,
        )
    await fhir_repo.add_patient_keys(
        session, mapped.patient_id, mapped.keys, checked=mapped.checked_keys, bulk=bulk
    )
    await bulk.flush(session)
    case_result = None
    if mapped.event is not None:
        workflow = runtime.profiles.current.workflow_or_raise
        case_result = await apply_event(
            session,
            workflow,
            mapped.event,
            new_patient=existed.get(f"Patient/{mapped.patient_id}") is None,
        )
    await session.flush()
    log.info(
        "ingest.stored",
        message_id=mapped.message.id,
        channel=mapped.message.channel,
        resources=len(changed_refs),
        deliveries=len(deliveries),
        case_id=case_result.case_id if case_result else None,
    )
    return {
        "message_id": mapped.message.id,
        "patient": {"id": mapped.patient_id, "reference": f"Patient/{mapped.patient_id}"},
        "resources": [
            {"resourceType": r.split("/")[0], "id": r.split("/")[1], "reference": r}
            for r in [*changed_refs, *([f"Provenance/{provenance_id}"] if changed_refs else [])]
        ],
        "case": {"id": case_result.case_id, "state": case_result.to_state}
        if case_result and case_result.case_id
        else None,
        "deliveries": [{"id": d.id, "target": d.target} for d in deliveries],
        "status_url": f"{settings.public_base_url}/v1/messages/{mapped.message.id}",
    }


# --------------------------------------------------------------------------- intake


def _profile_ref(runtime: Runtime, key: str, pid: str, version: str) -> ProfileRef | None:
    source = runtime.profiles.current.source_of(key)
    return ProfileRef(pid, version, source.content_hash) if source else None


async def submit_intake(
    session: AsyncSession, runtime: Runtime, *, raw: bytes, content_type: str, actor: str
) -> Outcome:
    """Handle ``POST /v1/intake-submissions``.

    Same ``submission_id`` and same body again: the stored answer, nothing new. Same
    ``submission_id`` with a different body: a correction: the QuestionnaireResponse is
    updated (status ``amended``) and delivered again as an update.

    Raises:
        BadRequestError, UnprocessableError: with every problem; nothing is stored.
    """
    data = decode_json_object(raw)
    sid = data.get("submission_id")
    existing = None
    if isinstance(sid, str):
        existing = await inbox.get_message_by_key(session, inbox.dedupe_key("intake", "", sid))
        if (
            existing is not None
            and existing.content_hash == inbox.content_hash(raw)
            and existing.response
        ):
            return Outcome(202, {**existing.response, "replayed": True}, existing.id)
    profiles = runtime.profiles.current
    try:
        submission, profile, items = parse_intake_submission(data, profiles.intake_profile)
    except MappingErrors as exc:
        raise UnprocessableError("the intake submission is not valid", exc.problems) from exc

    systems = runtime.systems
    keys: list[tuple[str, str]] = []
    if submission.patient.external_id:
        keys.append(("identifier", f"{systems.external_patient}|{submission.patient.external_id}"))
    keys.append(("submission", submission.submission_id))
    keys.append(("email", submission.patient.email))
    match = await match_patient(session, keys)

    message = _message_for(
        existing,
        channel="intake",
        sender="",
        external_id=submission.submission_id,
        raw=raw,
        content_type=content_type,
    )
    session.add(message)

    patient = intake_to_patient(submission, patient_id=match.patient_id, systems=systems)
    if match.existing:
        patient = merge_patient(match.existing, patient, source="intake")
    # The QuestionnaireResponse of a submission is only ever written from its message.
    qr_row = (
        await fhir_repo.find_by_identifier(
            session, "QuestionnaireResponse", systems.intake_submission, submission.submission_id
        )
        if existing is not None
        else None
    )
    qr = intake_to_questionnaire_response(
        submission,
        profile,
        items,
        response_id=qr_row.id if qr_row else str(uuid.uuid4()),
        patient_id=match.patient_id,
        systems=systems,
        status="amended" if qr_row else "completed",
    )
    if qr_row is not None and (
        qr_row.patient_id != match.patient_id
        or _names_another_patient(match.existing, submission.patient.external_id, systems)
    ):
        raise ConflictError(
            "this submission_id already belongs to another patient",
            [
                Problem(
                    "submission_id",
                    "submission_patient_changed",
                    "a correction must keep the same patient",
                )
            ],
        )
    keys.extend(fhir_repo.identifier_keys(patient))
    if match.row is None:  # a new canonical id cannot have a key yet
        match.checked[("identifier", f"{systems.patient}|{match.patient_id}")] = None
    _conflicts_to_exceptions(session, match, message, "intake")
    body = await store_mapped(
        session,
        runtime,
        MappedMessage(
            message=message,
            patient_id=match.patient_id,
            resources=[patient, qr],
            profile=_profile_ref(
                runtime, f"intake/{profile.id}/{profile.version}", profile.id, profile.version
            ),
            keys=keys,
            event=EventInput(
                source="intake",
                event_id=submission.submission_id
                if existing is None
                else f"{submission.submission_id}#r{message.revision}",
                type="intake_submitted",
                detail=None,
                occurred_at=submission.submitted_at,
                patient_id=match.patient_id,
                program=profile.program,
                message_id=message.id,
            ),
            actor=actor,
            kind="intake",
            current={
                f"Patient/{match.patient_id}": match.row,
                f"QuestionnaireResponse/{qr['id']}": qr_row,
            },
            checked_keys=match.checked,
        ),
    )
    body = {
        "submission_id": submission.submission_id,
        "status": "amended" if qr_row else "accepted",
        **body,
    }
    message.status = MessageStatus.PROCESSED
    message.processed_at = utcnow()
    message.response = body
    return Outcome(202, body, message.id)


def _names_another_patient(
    stored: dict[str, Any] | None, external_id: str | None, systems: IdentifierSystems
) -> bool:
    """True when a correction names an intake-app patient id (``patient.external_id``)
    that the submission's stored Patient is not known by: another person, even one the
    gateway has never seen, so the correction must not be merged into this Patient."""
    if not external_id or stored is None:
        return False
    known = {
        i.get("value")
        for i in stored.get("identifier", [])
        if i.get("system") == systems.external_patient
    }
    return bool(known) and external_id not in known


def _message_for(
    existing: InboundMessage | None,
    *,
    channel: str,
    sender: str,
    external_id: str,
    raw: bytes,
    content_type: str,
) -> InboundMessage:
    """The inbox row for a message; a correction replaces the content of the existing row
    (its earlier versions stay in the resources' history) and counts a new revision."""
    if existing is None:
        return inbox.new_message(
            channel=channel,
            sender=sender,
            external_id=external_id,
            body=raw,
            content_type=content_type,
        )
    existing.body = raw
    existing.content_hash = inbox.content_hash(raw)
    existing.content_type = content_type
    existing.revision += 1
    existing.received_at = utcnow()
    existing.status = MessageStatus.RECEIVED
    return existing


def _conflicts_to_exceptions(
    session: AsyncSession, match: PatientMatch, message: InboundMessage, channel: str
) -> None:
    if match.conflicts:
        session.add(
            inbox.new_exception(
                kind="patient_match_conflict",
                channel=channel,
                message_id=message.id,
                problems=[
                    Problem(
                        "patient",
                        "patient_match_conflict",
                        f"matched on {match.matched_on}; {', '.join(match.conflicts)} point at another patient",
                    )
                ],
            )
        )


# --------------------------------------------------------------------------- checkout


async def submit_checkout(
    session: AsyncSession,
    runtime: Runtime,
    *,
    data: dict[str, Any],
    raw: bytes,
    content_type: str,
    channel: Literal["checkout", "stripe"],
    sender: str,
    external_id: str,
    actor: str,
    message: InboundMessage | None = None,
) -> Outcome:
    """Handle a completed checkout (canonical JSON, or converted from a Stripe event).

    Unpaid checkouts (``payment_status = unpaid``, e.g. a bank debit still clearing) are
    recorded and answered ``awaiting_payment``; the resources come with the payment.

    Raises:
        UnprocessableError: every problem (contract, unknown plan...); nothing stored.
    """
    profiles = runtime.profiles.current

    def find_plan(plan_id: str) -> Plan | None:
        found = profiles.plan(plan_id)
        return found[1] if found else None

    try:
        checkout, plan = parse_checkout(data, find_plan)
    except MappingErrors as exc:
        raise UnprocessableError("the checkout is not valid", exc.problems) from exc
    if message is None:
        existing = await inbox.get_message_by_key(
            session, inbox.dedupe_key(channel, sender, external_id)
        )
        if existing is not None and existing.response:
            return Outcome(202, {**existing.response, "replayed": True}, existing.id)
        message = inbox.new_message(
            channel=channel,
            sender=sender,
            external_id=external_id,
            body=raw,
            content_type=content_type,
        )
        session.add(message)
        await session.flush()
    if checkout.payment_status not in PAID_STATUSES:
        message.status = MessageStatus.IGNORED
        message.processed_at = utcnow()
        message.response = {
            "message_id": message.id,
            "checkout_id": checkout.checkout_id,
            "status": "awaiting_payment",
        }
        log.info("ingest.checkout_unpaid", message_id=message.id)
        return Outcome(202, message.response, message.id)

    body = await _store_checkout(session, runtime, checkout, plan, message, actor)
    body = {"checkout_id": checkout.checkout_id, "status": "accepted", **body}
    message.status = MessageStatus.PROCESSED
    message.processed_at = utcnow()
    message.response = body
    return Outcome(202, body, message.id)


async def _store_checkout(
    session: AsyncSession,
    runtime: Runtime,
    checkout: CanonicalCheckout,
    plan: Plan,
    message: InboundMessage,
    actor: str,
) -> dict[str, Any]:
    systems = runtime.systems
    keys: list[tuple[str, str]] = []
    if checkout.patient_external_id:
        keys.append(("identifier", f"{systems.external_patient}|{checkout.patient_external_id}"))
    if checkout.intake_submission_id:
        keys.append(("submission", checkout.intake_submission_id))
    if checkout.customer.email:
        keys.append(("email", checkout.customer.email))
    match = await match_patient(session, keys)
    patient = checkout_to_patient(checkout, patient_id=match.patient_id, systems=systems)
    if match.existing:
        patient = merge_patient(match.existing, patient, source="checkout")
    qr_id = None
    if checkout.intake_submission_id:
        qr_row = await fhir_repo.find_by_identifier(
            session,
            "QuestionnaireResponse",
            systems.intake_submission,
            checkout.intake_submission_id,
        )
        qr_id = qr_row.id if qr_row and qr_row.patient_id == match.patient_id else None
    mr_row = await fhir_repo.find_by_identifier(
        session, "MedicationRequest", systems.checkout, checkout.checkout_id
    )
    mr = checkout_to_medication_request(
        checkout,
        plan,
        request_id=mr_row.id if mr_row else str(uuid.uuid4()),
        patient_id=match.patient_id,
        systems=systems,
        questionnaire_response_id=qr_id,
    )
    keys.extend(fhir_repo.identifier_keys(patient))
    if match.row is None:
        match.checked[("identifier", f"{systems.patient}|{match.patient_id}")] = None
    _conflicts_to_exceptions(session, match, message, message.channel)
    found = runtime.profiles.current.plan(checkout.plan)
    profile = found[0] if found else None
    return await store_mapped(
        session,
        runtime,
        MappedMessage(
            message=message,
            patient_id=match.patient_id,
            resources=[patient, mr],
            profile=_profile_ref(runtime, f"checkout/{profile.id}", profile.id, profile.version)
            if profile
            else None,
            keys=keys,
            event=EventInput(
                source="checkout",
                event_id=checkout.checkout_id,
                type="payment_completed",
                detail=None,
                occurred_at=checkout.completed_at,
                patient_id=match.patient_id,
                program=plan.program,
                message_id=message.id,
            ),
            actor=actor,
            kind="checkout",
            current={
                f"Patient/{match.patient_id}": match.row,
                f"MedicationRequest/{mr['id']}": mr_row,
            },
            checked_keys=match.checked,
        ),
    )


async def receive_stripe_event(
    session: AsyncSession, runtime: Runtime, *, event: dict[str, Any], raw: bytes, content_type: str
) -> tuple[Outcome, list[Problem] | None]:
    """Handle a verified Stripe event (signature already checked).

    Always acknowledges a verified event (Stripe retries for days otherwise, and it cannot
    fix its payload): checkout events are mapped; other types are recorded as ``ignored``.
    A checkout event that does not map is stored as ``failed`` and its problems are
    returned for the exceptions queue.

    Returns:
        ``(outcome, problems)``; ``problems`` is None when the event was handled.
    """
    event_id = str(event.get("id") or "")
    event_type = str(event.get("type") or "")
    key = inbox.dedupe_key("stripe", "stripe", event_id)
    existing = await inbox.get_message_by_key(session, key)
    if existing is not None:
        return Outcome(200, {**(existing.response or {}), "replayed": True}, existing.id), None
    message = inbox.new_message(
        channel="stripe", sender="stripe", external_id=event_id, body=raw, content_type=content_type
    )
    session.add(message)
    await session.flush()
    if event_type not in STRIPE_CHECKOUT_EVENTS:
        message.status = MessageStatus.IGNORED
        message.processed_at = utcnow()
        message.response = {
            "received": True,
            "message_id": message.id,
            "event_type": event_type,
            "status": "ignored",
        }
        log.info("stripe.ignored", message_id=message.id, event_type=event_type)
        return Outcome(200, message.response, message.id), None
    data = stripe_session_to_checkout(event)
    try:
        outcome = await submit_checkout(
            session,
            runtime,
            data=data,
            raw=raw,
            content_type=content_type,
            channel="stripe",
            sender="stripe",
            external_id=event_id,
            actor="stripe",
            message=message,
        )
    except UnprocessableError as exc:
        message.status = MessageStatus.FAILED
        message.processed_at = utcnow()
        message.response = {
            "received": True,
            "message_id": message.id,
            "event_type": event_type,
            "status": "failed",
        }
        session.add(
            inbox.new_exception(
                kind="unmappable_input",
                channel="stripe",
                sender="stripe",
                message_id=message.id,
                problems=exc.problems,
                payload=raw,
                content_type=content_type,
            )
        )
        log.info("stripe.unmappable", message_id=message.id, problems=len(exc.problems))
        return Outcome(200, message.response, message.id), exc.problems
    body = {"received": True, "event_type": event_type, **outcome.body}
    message.response = body
    return Outcome(200, body, message.id), None
