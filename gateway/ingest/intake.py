"""Intake submissions (``POST /v1/intake-submissions``): validate, normalize, map to Patient
+ QuestionnaireResponse + derived resources, and store them (:mod:`.storage`).

Idempotent on ``submission_id``: the same body again gets the stored answer. The same
``submission_id`` with a different body is a correction: the QuestionnaireResponse is
amended and delivered again; derived resources the submission no longer produces are
retired.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import FhirResource, InboundMessage, MessageStatus
from gateway.errors import ConflictError, UnprocessableError
from gateway.fhir import repository as fhir_repo
from gateway.http import Outcome, decode_json_object
from gateway.inbox import repository as inbox
from gateway.ingest.storage import (
    IngestContext,
    MappedMessage,
    claim_message,
    finish_message,
    lock_message,
    replayed,
    revise_message,
    store_mapped,
)
from gateway.patients.matching import PatientMatch, match_or_register, record_conflicts
from gateway.patients.merge import merge_into_match
from gateway.workflow.service import EventInput
from mappers.derived import DERIVED_KINDS, derived_system, retire_derived
from mappers.errors import MappingErrors, Problem
from mappers.events import PatientRef
from mappers.identifiers import IdentifierSystems
from mappers.intake import IntakeSubmission, ParsedIntake, parse_intake_submission
from mappers.pipeline import map_parsed_intake

CHANNEL = "intake"


def intake_refs(systems: IdentifierSystems, submission: IntakeSubmission) -> list[PatientRef]:
    """How a submission finds its patient, in priority order: the intake app's patient id,
    the submission id, the email."""
    refs = []
    if submission.patient.external_id:
        refs.append(
            PatientRef(
                "identifier", submission.patient.external_id, system=systems.external_patient
            )
        )
    refs.append(PatientRef("submission", submission.submission_id))
    if submission.patient.email:
        refs.append(PatientRef("email", submission.patient.email))
    return refs


def _same_submission(existing: InboundMessage, raw: bytes) -> bool:
    return existing.content_hash == inbox.content_hash(raw) and bool(existing.response)


async def submit_intake(
    session: AsyncSession, ctx: IngestContext, *, raw: bytes, content_type: str, actor: str
) -> Outcome:
    """Handle one intake submission. Flushes; the request commits.

    Args:
        session: the request's session.
        ctx: the request's profiles and settings.
        raw: the body as received (kept whole in the inbox).
        content_type: its declared content type.
        actor: the API client, for the audit trail.

    Returns:
        202 with the stored answer: the patient, the resources written, the conflicts,
        the case, the deliveries, the status URL (``replayed`` for a copy).

    Raises:
        BadRequestError, UnprocessableError: with every problem; nothing is stored.
        ConflictError: a correction that names another patient.
    """
    data = decode_json_object(raw)
    sid = data.get("submission_id")
    message: InboundMessage | None = None
    existing = None
    if isinstance(sid, str):  # claimed before parsing: a copy gets its answer as stored
        message = inbox.new_message(
            channel=CHANNEL,
            sender="",
            external_id=sid,
            body=raw,
            content_type=content_type,
            principal=ctx.principal(f"client:{actor}"),
        )
        existing = await claim_message(session, message)
        if existing is not None and _same_submission(existing, raw):
            return replayed(existing)
    try:
        parsed = parse_intake_submission(
            data, ctx.profiles.intake_profile, ctx.profiles.concept_maps
        )
    except MappingErrors as exc:
        raise UnprocessableError("the intake submission is not valid", exc.problems) from exc
    submission, profile = parsed.submission, parsed.profile
    if existing is not None:
        existing = await lock_message(session, existing)
        if _same_submission(existing, raw):  # the same correction, stored meanwhile
            return replayed(existing)
        message = revise_message(existing, raw=raw, content_type=content_type)
    assert message is not None  # a valid submission has a string submission_id

    match = await match_or_register(
        session, intake_refs(ctx.systems, submission), id_system=ctx.systems.patient
    )
    # The QuestionnaireResponse of a submission is only ever written from its message.
    qr_row = (
        await fhir_repo.find_by_identifier(
            session,
            "QuestionnaireResponse",
            ctx.systems.intake_submission,
            submission.submission_id,
        )
        if existing is not None
        else None
    )
    if qr_row is not None and (
        qr_row.patient_id != match.patient_id
        or _names_another_patient(match.existing, submission.patient.external_id, ctx.systems)
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
    record_conflicts(session, match, channel=CHANNEL, sender=None, message_id=message.id)
    assert match.patient_id is not None
    mapped = await prepare_intake(
        session,
        ctx,
        parsed=parsed,
        match=match,
        message=message,
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
            principal=message.principal,
        ),
    )
    body = await store_mapped(session, ctx, mapped)
    body = {
        "submission_id": submission.submission_id,
        "status": "amended" if qr_row else "accepted",
        **body,
    }
    await finish_message(session, message, status=MessageStatus.PROCESSED, response=body)
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


async def prepare_intake(
    session: AsyncSession,
    ctx: IngestContext,
    *,
    parsed: ParsedIntake,
    match: PatientMatch,
    message: InboundMessage,
    qr_id: str | None,
    actor: str,
    event: EventInput | None,
    action: str = "ingest",
) -> MappedMessage:
    """Map a parsed submission for its patient, ready for
    :func:`~gateway.ingest.storage.store_mapped` (reads the database, writes nothing).

    A QuestionnaireResponse that exists (``qr_id``) is amended; derived resources the
    submission produced before and no longer does are retired (Observation
    ``entered-in-error``, Flag and Consent ``inactive``).

    Raises:
        MappingErrors: the submission does not map with ``ctx``'s profiles.
    """
    assert match.patient_id is not None
    systems = ctx.systems
    profile = parsed.profile
    mapped = map_parsed_intake(
        parsed,
        systems=systems,
        patient_id=match.patient_id,
        response_id=qr_id or str(uuid.uuid4()),
        status="amended" if qr_id else "completed",
    )
    merged = await merge_into_match(
        session, match, mapped.patient, source="intake", owns=profile.patient.owns
    )
    retired = []
    current: dict[str, FhirResource | None] = {}
    if qr_id is None:  # a new submission: its response and derived resources are new too
        current[f"QuestionnaireResponse/{mapped.questionnaire_response['id']}"] = None
        current.update({f"{r['resourceType']}/{r['id']}": None for r in mapped.derived})
    else:
        new_ids = {r["id"] for r in mapped.derived}
        old = await fhir_repo.resources_with_identifier_prefix(
            session,
            [derived_system(systems, t) for t in DERIVED_KINDS],
            f"{parsed.submission.submission_id}/",
        )
        retired = [
            retire_derived(row.resource)
            for row in old
            if row.id not in new_ids and row.patient_id == match.patient_id
        ]
    attribution = parsed.submission.attribution
    return MappedMessage(
        message=message,
        match=match,
        merged=merged,
        resources=[merged.patient, mapped.questionnaire_response, *mapped.derived, *retired],
        profile=ctx.profile_ref(
            f"intake/{profile.id}/{profile.version}", profile.id, profile.version
        ),
        kind="intake",
        event=event,
        actor=actor,
        attribution=attribution.model_dump(exclude_none=True) if attribution else None,
        action=action,
        current=current,
        notes=parsed.notes,
    )
