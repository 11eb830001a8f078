"""Intake and checkout ingestion: validate, normalize, map, store with the outbox.

One inbound message is handled in one database transaction: the inbox row, the FHIR
resources (with history), the patient matching keys, the outbox rows for every enabled
EHR target, the case event and the audit entries are written together or not at all.
A payload that is rejected is kept for review in the exceptions queue by the caller
(:func:`record_rejection`), in its own transaction.

Mapping is profile-driven and pure (:mod:`mappers.pipeline`); this module adds what needs
the database: patient matching, ownership-based Patient merging (conflicts kept in
``patient_conflicts`` and named in the Provenance), retiring derived resources a
corrected submission no longer produces, the profile that produced each version
(``profile_mappings``, ``fhir_resources.profile_*``, ``Provenance.policy``), and one outbox
row per EHR target with the resource types that target receives.
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
from gateway.profiles import repository as profile_repo
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_case_webhook
from gateway.workflow.service import EventInput, apply_event
from mappers.checkout import CanonicalCheckout
from mappers.derived import DERIVED_KINDS, derived_system, retire_derived
from mappers.errors import MappingErrors, Problem
from mappers.fastvalidate import validate_resources_fast as validate_resources
from mappers.identifiers import IdentifierSystems
from mappers.intake import ParsedIntake, parse_intake_submission
from mappers.patient import ElementConflict, element_path, element_sources, merge_patient
from mappers.pipeline import (
    checkout_payload,
    map_parsed_intake,
    map_validated_checkout,
    parse_canonical_checkout,
    profile_tag,
)
from mappers.profiles import CheckoutProfile, ProfileSet
from mappers.provenance import provenance_for

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


#: Extension on Provenance naming a Patient element conflict (ids and codes, no values).
CONFLICT_EXTENSION = "patient-element-conflict"


@dataclass
class MappedMessage:
    """The resources mapped from one message, ready to store.

    ``profile`` is the profile recorded on every resource (the intake form version, or
    the checkout plan table); ``other_profiles`` are further profiles that took part (a
    processor mapping), named in the Provenance too. ``conflicts`` and ``sources`` come
    from the ownership merge of the Patient.
    """

    message: InboundMessage
    patient_id: str
    resources: list[dict[str, Any]]
    profile: ProfileRef | None
    keys: list[tuple[str, str]]
    event: EventInput | None
    actor: str
    kind: str
    other_profiles: list[str] = field(default_factory=list)
    conflicts: list[ElementConflict] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    attribution: dict[str, Any] | None = None
    action: str = "ingest"
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
    existed: dict[str, FhirResource | None] = {}
    for r in written:
        ref = f"{r['resourceType']}/{r['id']}"
        existed[ref] = (
            mapped.current[ref]
            if ref in mapped.current
            else await fhir_repo.get_resource(session, r["resourceType"], r["id"])
        )
    tag = (
        profile_tag(
            mapped.kind, mapped.profile.id, mapped.profile.version, mapped.profile.content_hash
        )
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
        profile=tag,
    )
    for other in mapped.other_profiles:
        provenance.setdefault("policy", []).append(f"urn:fhir-gateway:profile:{other}")
    conflict_rows = await profile_repo.add_conflicts(
        session, mapped.patient_id, mapped.conflicts, message_id=mapped.message.id
    )
    if conflict_rows:
        provenance["extension"] = [
            _conflict_extension(runtime, row.id, c)
            for row, c in zip(conflict_rows, mapped.conflicts, strict=True)
        ]
    try:
        validate_resources([*written, provenance])
    except MappingErrors as exc:
        raise UnprocessableError(
            "the mapped FHIR resources do not validate (check the profile)", exc.problems
        ) from exc

    stored_versions: list[str] = []
    bulk = BulkInserts()
    for resource in written:
        ref = f"{resource['resourceType']}/{resource['id']}"
        stored, changed = await fhir_repo.save_resource(
            session,
            resource,
            message_id=mapped.message.id,
            patient_id=mapped.patient_id,
            profile=mapped.profile,
            current=existed[ref],
            bulk=bulk,
        )
        if changed:
            stored_versions.append(f"{ref}/_history/{stored['meta']['versionId']}")
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
    versions: list[str] = []
    if changed_refs:
        provenance["target"] = [{"reference": r} for r in changed_refs]
        stored_prov, _ = await fhir_repo.save_resource(
            session,
            provenance,
            message_id=mapped.message.id,
            patient_id=mapped.patient_id,
            profile=mapped.profile,
            current=None,
            bulk=bulk,
        )
        versions.append(f"Provenance/{provenance_id}/_history/{stored_prov['meta']['versionId']}")
        bulk.add(
            AuditEntry,
            at=now,
            actor=mapped.actor,
            action="create",
            entity_type="Provenance",
            entity_id=provenance_id,
            detail={"message_id": mapped.message.id},
        )
        deliveries = enqueue_ehr_deliveries(
            session,
            runtime.profiles.current.enabled_targets(),
            message_id=mapped.message.id,
            patient_id=mapped.patient_id,
            changed_refs=changed_refs,
            provenance_ref=f"Provenance/{provenance_id}",
            received_at=mapped.message.received_at,
        )
    if mapped.profile is not None:
        profile_repo.record_mapping(
            session,
            message_id=mapped.message.id,
            action=mapped.action,
            profile_kind=mapped.kind,
            profile_id=mapped.profile.id,
            profile_version=mapped.profile.version,
            profile_hash=mapped.profile.content_hash,
            resource_versions=stored_versions + versions,
            attribution=mapped.attribution,
            actor=mapped.actor,
        )
    patient_ref = f"Patient/{mapped.patient_id}"
    new_patient = existed.get(patient_ref) is None
    if mapped.sources:
        await profile_repo.save_element_sources(
            session,
            mapped.patient_id,
            mapped.sources,
            message_id=mapped.message.id,
            new_patient=patient_ref in existed and new_patient,
            bulk=bulk,
        )
    await fhir_repo.add_patient_keys(
        session, mapped.patient_id, mapped.keys, checked=mapped.checked_keys, bulk=bulk
    )
    await bulk.flush(session)
    case_result = None
    if mapped.event is not None:
        workflow = runtime.profiles.current.workflow_or_raise
        case_result = await apply_event(
            session, workflow, mapped.event, notify=enqueue_case_webhook, new_patient=new_patient
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
        "conflicts": [
            {"id": row.id, "element": row.element, "outcome": row.outcome} for row in conflict_rows
        ],
        "case": {"id": case_result.case_id, "state": case_result.to_state}
        if case_result and case_result.case_id
        else None,
        "deliveries": [{"id": d.id, "target": d.target} for d in deliveries],
        "status_url": f"{settings.public_base_url}/v1/messages/{mapped.message.id}",
    }


def _conflict_extension(runtime: Runtime, record_id: int, c: ElementConflict) -> dict[str, Any]:
    """A Provenance extension naming one conflict: element, outcome, sources and the
    conflict record's id; never the values (they stay in ``patient_conflicts``)."""
    base = runtime.systems.base
    return {
        "url": f"{base}/{CONFLICT_EXTENSION}",
        "extension": [
            {"url": "element", "valueString": element_path(c.element)},
            {"url": "outcome", "valueCode": c.outcome.replace("_", "-")},
            {"url": "keptSource", "valueCode": c.kept_source},
            {"url": "lostSource", "valueCode": c.lost_source},
            {
                "url": "record",
                "valueIdentifier": {"system": f"{base}/patient-conflict", "value": str(record_id)},
            },
        ],
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
        parsed = parse_intake_submission(data, profiles.intake_profile, profiles.concept_maps)
    except MappingErrors as exc:
        raise UnprocessableError("the intake submission is not valid", exc.problems) from exc
    submission, profile = parsed.submission, parsed.profile

    systems = runtime.systems
    keys: list[tuple[str, str]] = []
    if submission.patient.external_id:
        keys.append(("identifier", f"{systems.external_patient}|{submission.patient.external_id}"))
    keys.append(("submission", submission.submission_id))
    if submission.patient.email:
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
    if existing is not None:
        session.add(message)  # already stored: its changes are an UPDATE at the flush

    # The QuestionnaireResponse of a submission is only ever written from its message.
    qr_row = (
        await fhir_repo.find_by_identifier(
            session, "QuestionnaireResponse", systems.intake_submission, submission.submission_id
        )
        if existing is not None
        else None
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
    body = await store_intake(
        session,
        runtime,
        parsed=parsed,
        match=match,
        message=message,
        keys=keys,
        qr_id=qr_row.id if qr_row else None,
        actor=actor,
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
    )
    body = {
        "submission_id": submission.submission_id,
        "status": "amended" if qr_row else "accepted",
        **body,
    }
    message.status = MessageStatus.PROCESSED
    message.processed_at = utcnow()
    message.response = body
    if existing is None:
        # A new inbox row is inserted last, whole (status and answer included), in one
        # statement instead of an INSERT and an UPDATE.
        await _insert_message(session, message)
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


def _known_patient_row(match: PatientMatch) -> dict[str, FhirResource | None]:
    """What is known of the stored Patient row: the row, None for a new patient, or
    nothing (look it up) when the caller matched without loading it."""
    if match.row is not None:
        return {f"Patient/{match.patient_id}": match.row}
    if match.existing is None:
        return {f"Patient/{match.patient_id}": None}
    return {}


async def store_intake(
    session: AsyncSession,
    runtime: Runtime,
    *,
    parsed: ParsedIntake,
    match: PatientMatch,
    message: InboundMessage,
    keys: list[tuple[str, str]],
    qr_id: str | None,
    actor: str,
    event: EventInput | None,
) -> dict[str, Any]:
    """Map a parsed submission for a matched patient and store it (see :func:`store_mapped`)."""
    _conflicts_to_exceptions(session, match, message, "intake")
    mapped = await prepare_intake(
        session,
        runtime,
        parsed=parsed,
        match=match,
        message=message,
        keys=keys,
        qr_id=qr_id,
        actor=actor,
        event=event,
    )
    return await store_mapped(session, runtime, mapped)


async def prepare_intake(
    session: AsyncSession,
    runtime: Runtime,
    *,
    parsed: ParsedIntake,
    match: PatientMatch,
    message: InboundMessage,
    keys: list[tuple[str, str]],
    qr_id: str | None,
    actor: str,
    event: EventInput | None,
    action: str = "ingest",
) -> MappedMessage:
    """Map a parsed submission for a matched patient, ready for :func:`store_mapped`
    (reads the database, writes nothing).

    A QuestionnaireResponse that exists (``qr_id``) is amended; derived resources the
    submission produced before and no longer does are retired (Observation
    ``entered-in-error``, Flag and Consent ``inactive``).
    """
    systems = runtime.systems
    profile = parsed.profile
    mapped = map_parsed_intake(
        parsed,
        systems=systems,
        patient_id=match.patient_id,
        response_id=qr_id or str(uuid.uuid4()),
        status="amended" if qr_id else "completed",
    )
    patient, conflicts, sources = await _merge_patient(
        session,
        runtime.profiles.current,
        match,
        mapped.patient,
        source="intake",
        owns=profile.patient.owns,
    )
    retired = []
    if qr_id is not None:
        new_ids = {r["id"] for r in mapped.derived}
        old = await profile_repo.resources_with_identifier_prefix(
            session,
            [derived_system(systems, t) for t in DERIVED_KINDS],
            f"{parsed.submission.submission_id}/",
        )
        retired = [
            retire_derived(row.resource)
            for row in old
            if row.id not in new_ids and row.patient_id == match.patient_id
        ]
    keys = [*keys, *fhir_repo.identifier_keys(patient)]
    if match.existing is None:  # a new canonical id cannot have a key yet
        match.checked[("identifier", f"{systems.patient}|{match.patient_id}")] = None
    current = _known_patient_row(match)
    if qr_id is None:  # a new submission: its response and derived resources are new too
        current[f"QuestionnaireResponse/{mapped.questionnaire_response['id']}"] = None
        current.update({f"{r['resourceType']}/{r['id']}": None for r in mapped.derived})
    return MappedMessage(
        message=message,
        patient_id=match.patient_id,
        resources=[patient, mapped.questionnaire_response, *mapped.derived, *retired],
        profile=_profile_ref(
            runtime, f"intake/{profile.id}/{profile.version}", profile.id, profile.version
        ),
        keys=keys,
        event=event,
        actor=actor,
        kind="intake",
        conflicts=conflicts,
        sources=sources,
        attribution=parsed.submission.attribution.model_dump(exclude_none=True)
        if parsed.submission.attribution
        else None,
        action=action,
        current=current,
        checked_keys=match.checked,
    )


async def _merge_patient(
    session: AsyncSession,
    profiles: ProfileSet,
    match: PatientMatch,
    incoming: dict[str, Any],
    *,
    source: Any,
    owns: Any,
) -> tuple[dict[str, Any], list[ElementConflict], dict[str, str]]:
    """The Patient to store: ``incoming`` merged into the matched one by ownership."""
    if not match.existing:
        return incoming, [], element_sources(incoming, source)
    known = await profile_repo.element_sources(session, match.patient_id)
    result = merge_patient(match.existing, incoming, source=source, owns=set(owns), sources=known)
    return result.patient, result.conflicts, result.sources


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
                        f"matched on {match.matched_on}; "
                        f"{', '.join(match.conflicts)} point at another patient",
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
    try:
        checkout, _, plan_profile = parse_canonical_checkout(data, profiles)
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

    body = await store_checkout(
        session, runtime, checkout=checkout, plan_profile=plan_profile, message=message, actor=actor
    )
    body = {"checkout_id": checkout.checkout_id, "status": "accepted", **body}
    message.status = MessageStatus.PROCESSED
    message.processed_at = utcnow()
    message.response = body
    return Outcome(202, body, message.id)


def checkout_keys(runtime: Runtime, checkout: CanonicalCheckout) -> list[tuple[str, str]]:
    """The patient matching keys of a checkout, in priority order."""
    systems = runtime.systems
    keys: list[tuple[str, str]] = []
    if checkout.patient_external_id:
        keys.append(("identifier", f"{systems.external_patient}|{checkout.patient_external_id}"))
    if checkout.intake_submission_id:
        keys.append(("submission", checkout.intake_submission_id))
    if checkout.customer.email:
        keys.append(("email", checkout.customer.email))
    return keys


async def store_checkout(
    session: AsyncSession,
    runtime: Runtime,
    *,
    checkout: CanonicalCheckout,
    plan_profile: CheckoutProfile,
    message: InboundMessage,
    actor: str,
) -> dict[str, Any]:
    """Match the patient, map a validated checkout (Patient + MedicationRequest) and store it."""
    keys = checkout_keys(runtime, checkout)
    match = await match_patient(session, keys)
    _conflicts_to_exceptions(session, match, message, message.channel)
    mapped = await prepare_checkout(
        session,
        runtime,
        checkout=checkout,
        plan_profile=plan_profile,
        match=match,
        keys=keys,
        message=message,
        actor=actor,
    )
    return await store_mapped(session, runtime, mapped)


async def prepare_checkout(
    session: AsyncSession,
    runtime: Runtime,
    *,
    checkout: CanonicalCheckout,
    plan_profile: CheckoutProfile,
    match: PatientMatch,
    keys: list[tuple[str, str]],
    message: InboundMessage,
    actor: str,
    with_event: bool = True,
    action: str = "ingest",
) -> MappedMessage:
    """Map a validated checkout for a matched patient, ready for :func:`store_mapped`
    (reads the database, writes nothing)."""
    systems = runtime.systems
    profiles = runtime.profiles.current
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
    try:
        mapped = map_validated_checkout(
            checkout,
            plan_profile,
            systems=systems,
            patient_id=match.patient_id,
            request_id=mr_row.id if mr_row else str(uuid.uuid4()),
            questionnaire_response_id=qr_id,
        )
    except MappingErrors as exc:
        raise UnprocessableError("the checkout is not valid", exc.problems) from exc
    owns = {e for p in profiles.checkout.values() for e in p.patient.owns}
    patient, conflicts, sources = await _merge_patient(
        session, profiles, match, mapped.patient, source="checkout", owns=owns
    )
    keys = [*keys, *fhir_repo.identifier_keys(patient)]
    if match.existing is None:
        match.checked[("identifier", f"{systems.patient}|{match.patient_id}")] = None
    others = []
    processor = profiles.processor(checkout.processor)
    if processor is not None:
        source = profiles.source_of(f"checkout/{processor[0].id}")
        if source is not None and processor[0].id != plan_profile.id:
            others.append(
                profile_tag("checkout", processor[0].id, processor[0].version, source.content_hash)
            )
    return MappedMessage(
        message=message,
        patient_id=match.patient_id,
        resources=[patient, mapped.medication_request],
        profile=_profile_ref(
            runtime, f"checkout/{plan_profile.id}", plan_profile.id, plan_profile.version
        ),
        keys=keys,
        event=EventInput(
            source="checkout",
            event_id=checkout.checkout_id,
            type="payment_completed",
            detail=None,
            occurred_at=checkout.completed_at,
            patient_id=match.patient_id,
            program=mapped.plan.program,
            message_id=message.id,
        )
        if with_event
        else None,
        actor=actor,
        kind="checkout",
        other_profiles=others,
        conflicts=conflicts,
        sources=sources,
        attribution=checkout.attribution.model_dump(exclude_none=True)
        if checkout.attribution
        else None,
        current={
            **_known_patient_row(match),
            f"MedicationRequest/{mapped.medication_request['id']}": mr_row,
        },
        checked_keys=match.checked,
        action=action,
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
    # The inbox row is inserted last, whole (see submit_intake), on every way out.
    message = inbox.new_message(
        channel="stripe", sender="stripe", external_id=event_id, body=raw, content_type=content_type
    )
    if event_type not in STRIPE_CHECKOUT_EVENTS:
        message.status = MessageStatus.IGNORED
        message.processed_at = utcnow()
        message.response = {
            "received": True,
            "message_id": message.id,
            "event_type": event_type,
            "status": "ignored",
        }
        await _insert_message(session, message)
        log.info("stripe.ignored", message_id=message.id, event_type=event_type)
        return Outcome(200, message.response, message.id), None
    try:
        try:
            data = checkout_payload(event, runtime.profiles.current, kind="stripe")
        except MappingErrors as exc:
            raise UnprocessableError("the checkout is not valid", exc.problems) from exc
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
        await _insert_message(session, message)
        log.info("stripe.unmappable", message_id=message.id, problems=len(exc.problems))
        return Outcome(200, message.response, message.id), exc.problems
    body = {"received": True, "event_type": event_type, **outcome.body}
    message.response = body
    await _insert_message(session, message)
    return Outcome(200, body, message.id), None


async def _insert_message(session: AsyncSession, message: InboundMessage) -> None:
    """Insert a new inbox row with its status and answer in one statement (nothing
    references it by foreign key, so it can go last); flushed here, inside the caller's
    retry, so a concurrent twin's unique-key conflict is raised where it is handled."""
    session.add(message)
    await session.flush()
