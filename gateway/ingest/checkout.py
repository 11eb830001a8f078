"""Completed checkouts (``POST /v1/checkouts``, and Stripe events once converted): map to
Patient + MedicationRequest (a draft proposal) and store them (:mod:`.storage`).

Idempotent on ``checkout_id`` per processor. An unpaid checkout (``payment_status =
unpaid``, a bank debit still clearing) is recorded and answered ``awaiting_payment``; the
resources come with the payment.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import InboundMessage, MessageStatus
from gateway.errors import UnprocessableError
from gateway.fhir import repository as fhir_repo
from gateway.http import Outcome, decode_json_object
from gateway.inbox import repository as inbox
from gateway.ingest.storage import (
    IngestContext,
    MappedMessage,
    claim_message,
    finish_message,
    replayed,
    store_mapped,
)
from gateway.logging import get_logger
from gateway.patients.matching import PatientMatch, match_or_register, record_conflicts
from gateway.patients.merge import merge_into_match
from gateway.workflow.service import EventInput
from mappers.checkout import CanonicalCheckout, payment_outcome
from mappers.errors import MappingErrors
from mappers.events import PatientRef
from mappers.identifiers import IdentifierSystems
from mappers.pipeline import map_validated_checkout, parse_canonical_checkout, profile_tag
from mappers.profiles import CheckoutProfile

log = get_logger(__name__)


def parse_checkout(
    data: dict[str, Any], ctx: IngestContext
) -> tuple[CanonicalCheckout, CheckoutProfile]:
    """A canonical checkout and its plan's profile.

    Raises:
        UnprocessableError: every problem (contract, unknown plan...).
    """
    try:
        checkout, _, plan_profile = parse_canonical_checkout(data, ctx.profiles)
    except MappingErrors as exc:
        raise UnprocessableError("the checkout is not valid", exc.problems) from exc
    return checkout, plan_profile


async def submit_checkout(
    session: AsyncSession,
    ctx: IngestContext,
    *,
    raw: bytes,
    content_type: str,
    actor: str,
) -> Outcome:
    """Handle one canonical checkout (its inbox key: ``processor`` + ``checkout_id``).

    Returns:
        202 with the answer (the stored answer, ``replayed``, for a copy).

    Raises:
        BadRequestError, UnprocessableError: every problem; nothing stored.
    """
    checkout, plan_profile = parse_checkout(decode_json_object(raw), ctx)
    message = inbox.new_message(
        channel="checkout",
        sender=checkout.processor,
        external_id=checkout.checkout_id,
        body=raw,
        content_type=content_type,
        principal=ctx.principal(f"client:{actor}"),
    )
    existing = await claim_message(session, message)
    if existing is not None:
        return replayed(existing)
    status, body = await handle_checkout(
        session, ctx, checkout=checkout, plan_profile=plan_profile, message=message, actor=actor
    )
    await finish_message(session, message, status=status, response=body)
    return Outcome(202, body, message.id)


async def handle_checkout(
    session: AsyncSession,
    ctx: IngestContext,
    *,
    checkout: CanonicalCheckout,
    plan_profile: CheckoutProfile,
    message: InboundMessage,
    actor: str,
) -> tuple[MessageStatus, dict[str, Any]]:
    """Store a validated checkout for its claimed inbox row (flushes).

    Returns:
        The message's status and answer: ``ignored`` and ``awaiting_payment`` when
        unpaid (a bank debit still clearing: the resources come with the payment), else
        ``processed`` with the stored resources and ``payment: paid | deferred``
        (deferred: nothing charged now, Stripe setup mode or a trial; see
        :func:`mappers.checkout.payment_outcome`).

    Raises:
        UnprocessableError: the checkout does not map or its FHIR does not validate.
    """
    payment = payment_outcome(checkout)
    if payment == "awaiting_payment":
        log.info("ingest.checkout_unpaid", message_id=message.id)
        return MessageStatus.IGNORED, {
            "message_id": message.id,
            "checkout_id": checkout.checkout_id,
            "status": "awaiting_payment",
        }
    match = await match_or_register(
        session, checkout_refs(ctx.systems, checkout), id_system=ctx.systems.patient
    )
    record_conflicts(session, match, channel=message.channel, sender=None, message_id=message.id)
    mapped = await prepare_checkout(
        session,
        ctx,
        checkout=checkout,
        plan_profile=plan_profile,
        match=match,
        message=message,
        actor=actor,
    )
    body = await store_mapped(session, ctx, mapped)
    return MessageStatus.PROCESSED, {
        "checkout_id": checkout.checkout_id,
        "status": "accepted",
        "payment": payment,
        **body,
    }


def checkout_refs(systems: IdentifierSystems, checkout: CanonicalCheckout) -> list[PatientRef]:
    """How a checkout finds its patient, in priority order: the intake app's patient id
    (``patient_external_id``), the intake submission it follows, the buyer's email."""
    refs = []
    if checkout.patient_external_id:
        refs.append(
            PatientRef("identifier", checkout.patient_external_id, system=systems.external_patient)
        )
    if checkout.intake_submission_id:
        refs.append(PatientRef("submission", checkout.intake_submission_id))
    if checkout.customer.email:
        refs.append(PatientRef("email", checkout.customer.email))
    return refs


async def prepare_checkout(
    session: AsyncSession,
    ctx: IngestContext,
    *,
    checkout: CanonicalCheckout,
    plan_profile: CheckoutProfile,
    match: PatientMatch,
    message: InboundMessage,
    actor: str,
    with_event: bool = True,
    action: str = "ingest",
) -> MappedMessage:
    """Map a validated checkout for its patient, ready for
    :func:`~gateway.ingest.storage.store_mapped` (reads the database, writes nothing).

    Raises:
        UnprocessableError: the checkout does not map with ``ctx``'s profiles.
    """
    assert match.patient_id is not None
    systems = ctx.systems
    profiles = ctx.profiles
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
    )  # a deferred checkout of a no_medication_request plan maps no MedicationRequest
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
    merged = await merge_into_match(session, match, mapped.patient, source="checkout", owns=owns)
    others = []
    processor = profiles.processor(checkout.processor)
    if processor is not None:
        source = profiles.source_of(f"checkout/{processor[0].id}")
        if source is not None and processor[0].id != plan_profile.id:
            others.append(
                profile_tag("checkout", processor[0].id, processor[0].version, source.content_hash)
            )
    attribution = checkout.attribution
    return MappedMessage(
        message=message,
        match=match,
        merged=merged,
        resources=[merged.patient, *mapped.resources[1:]],
        profile=ctx.profile_ref(
            f"checkout/{plan_profile.id}", plan_profile.id, plan_profile.version
        ),
        kind="checkout",
        event=EventInput(
            source="checkout",
            event_id=checkout.checkout_id,
            type=mapped.event_type,
            detail=None,
            occurred_at=checkout.completed_at,
            patient_id=match.patient_id,
            program=mapped.plan.program,
            message_id=message.id,
            principal=message.principal,
        )
        if with_event
        else None,
        actor=actor,
        other_profiles=others,
        attribution=attribution.model_dump(exclude_none=True) if attribution else None,
        action=action,
        current={f"MedicationRequest/{r['id']}": mr_row for r in mapped.resources[1:]},
    )
