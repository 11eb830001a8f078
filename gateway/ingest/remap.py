"""Re-mapping a stored intake or checkout with the current profiles
(``fhir-gateway profiles remap``).

The message is mapped again for the patient it was stored for, and compared path by path
with what is stored now for each re-mapped resource (what a resend would send). With
``apply``, changed resources are stored as new versions with a Provenance (activity
UPDATE, the current profile's id, version and hash) and delivered through the outbox, the
same way as on receipt (:func:`~gateway.ingest.storage.store_mapped`); the case workflow
is not touched (the message was applied to it already).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import InboundMessage
from gateway.errors import NotFoundError, UnprocessableError
from gateway.fhir import repository as fhir_repo
from gateway.inbox import repository as inbox
from gateway.ingest.checkout import prepare_checkout
from gateway.ingest.intake import prepare_intake
from gateway.ingest.storage import IngestContext, MappedMessage, store_mapped
from gateway.logging import get_logger
from gateway.patients.matching import known_patient
from mappers.errors import MappingErrors, Problem
from mappers.fhirdiff import resources_diff
from mappers.intake import parse_intake_submission
from mappers.pipeline import checkout_payload, parse_canonical_checkout

log = get_logger(__name__)


@dataclass
class RemapResult:
    """A re-map of one stored message: the diff, and what was stored when applied."""

    message_id: str
    channel: str
    profile: str | None
    diff: list[str]
    resources: list[dict[str, Any]]
    applied: bool = False
    stored: dict[str, Any] | None = None


async def remap_message(
    session: AsyncSession, ctx: IngestContext, message_id: str, *, apply: bool, actor: str
) -> RemapResult:
    """Re-map stored message ``message_id`` with ``ctx``'s profiles (flushes; the caller
    commits).

    Args:
        session: a session on the gateway database.
        ctx: the profiles and settings to map with.
        message_id: the inbox id.
        apply: store the changed resources and deliver them.
        actor: who asked, for the audit trail.

    Raises:
        NotFoundError: no such message.
        UnprocessableError: the message cannot be re-mapped (not an intake or checkout,
            never mapped, or invalid under the current profiles: every problem listed).
    """
    message = await inbox.get_message(session, message_id)
    if message is None:
        raise NotFoundError(f"message {message_id} is not known")
    try:
        data = json.loads(message.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnprocessableError(
            "the stored message is not JSON", [Problem("", "invalid_json", "not JSON")]
        ) from exc
    mapped = await _prepare_remap(session, ctx, message, data, actor)
    stored_now = [
        row.resource
        for r in mapped.resources
        if (row := await fhir_repo.get_resource(session, r["resourceType"], r["id"])) is not None
    ]
    diff = resources_diff(stored_now, mapped.resources)
    tag = (
        f"{mapped.kind}/{mapped.profile.id}/{mapped.profile.version}"
        if mapped.profile is not None
        else None
    )
    result = RemapResult(message.id, message.channel, tag, diff, mapped.resources)
    if apply and diff:
        result.stored = await store_mapped(session, ctx, mapped)
        result.applied = True
        log.info("profiles.remapped", message_id=message.id, changes=len(diff))
    return result


def _keep_status_of_an_unchanged_response(
    resources: list[dict[str, Any]], stored: dict[str, Any]
) -> None:
    """A re-mapped QuestionnaireResponse that the current profile does not change keeps
    its stored ``status``: only answers that changed make it ``amended``
    (https://hl7.org/fhir/R4/valueset-questionnaire-answers-status.html). Without this,
    every re-map showed (and ``--apply`` re-sent) a ``completed`` -> ``amended`` change,
    even with an unchanged profile."""
    for resource in resources:
        if resource["resourceType"] != "QuestionnaireResponse" or resource["id"] != stored.get(
            "id"
        ):
            continue
        if not resources_diff([stored], [{**resource, "status": stored.get("status")}]):
            resource["status"] = stored.get("status")


async def _prepare_remap(
    session: AsyncSession, ctx: IngestContext, message: InboundMessage, data: Any, actor: str
) -> MappedMessage:
    profiles, systems = ctx.profiles, ctx.systems
    try:
        if message.channel == "intake":
            parsed = parse_intake_submission(data, profiles.intake_profile, profiles.concept_maps)
            qr = await fhir_repo.find_by_identifier(
                session,
                "QuestionnaireResponse",
                systems.intake_submission,
                parsed.submission.submission_id,
            )
            if qr is None or qr.patient_id is None:
                raise _never_mapped()
            mapped = await prepare_intake(
                session,
                ctx,
                parsed=parsed,
                match=await known_patient(session, qr.patient_id),
                message=message,
                qr_id=qr.id,
                actor=actor,
                event=None,
                action="remap",
            )
            _keep_status_of_an_unchanged_response(mapped.resources, qr.resource)
            return mapped
        if message.channel in ("stripe", "checkout"):
            canonical = checkout_payload(
                data, profiles, kind="stripe" if message.channel == "stripe" else "checkout"
            )
            checkout, _, plan_profile = parse_canonical_checkout(canonical, profiles)
            mr = await fhir_repo.find_by_identifier(
                session, "MedicationRequest", systems.checkout, checkout.checkout_id
            )
            if mr is None or mr.patient_id is None:
                raise _never_mapped()
            return await prepare_checkout(
                session,
                ctx,
                checkout=checkout,
                plan_profile=plan_profile,
                match=await known_patient(session, mr.patient_id),
                message=message,
                actor=actor,
                with_event=False,
                action="remap",
            )
    except MappingErrors as exc:
        raise UnprocessableError(
            "the message does not map with the current profiles", exc.problems
        ) from exc
    raise UnprocessableError(
        "only intake and checkout messages can be re-mapped",
        [Problem("channel", "not_remappable", f"channel {message.channel!r} has no mapping")],
    )


def _never_mapped() -> UnprocessableError:
    return UnprocessableError(
        "the message never produced resources",
        [Problem("", "never_mapped", "nothing was stored for this message")],
    )
