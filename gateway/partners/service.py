"""Partner webhooks (provider networks, pharmacies): verified, stored, acknowledged.

The signature is checked first (:mod:`gateway.partners.signatures`); then the body is
stored in the inbox under the partner's own event id (a retried webhook is recognised and
answered with the stored answer) and mapped with the partner's profile. A verified
webhook that does not map (unknown status, no patient identifier, bad time) is still
acknowledged (202, ``status: failed``): the partner cannot fix it by retrying, and it is
kept in the exceptions queue with the reason for a person to look at.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import MessageStatus
from gateway.db.types import utcnow
from gateway.errors import (
    NotFoundError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnprocessableError,
)
from gateway.events.service import Prepared, Received, lease_for_this_process
from gateway.http import decode_json_object, store_if_new
from gateway.inbox import repository as inbox
from gateway.logging import get_logger
from gateway.partners.signatures import SignatureError, usable_secret, verify_signature
from gateway.runtime import Runtime
from gateway.secrets import SecretStore
from mappers.errors import MappingError, MappingErrors, Problem
from mappers.events import future_time_problem
from mappers.partners import partner_event_id, partner_to_clinical_event
from mappers.profiles import PartnerProfile

log = get_logger(__name__)

CHANNEL = "partner"


def webhook_partner(runtime: Runtime, name: str) -> PartnerProfile:
    """The partner ``name`` if it sends webhooks.

    Raises:
        NotFoundError: no such partner profile, or it has no ``webhook`` block.
    """
    partner = runtime.profiles.current.partners.get(name)
    if partner is None or partner.webhook is None:
        raise NotFoundError("no partner with webhooks by this name")
    return partner


def verify_partner(
    partner: PartnerProfile, *, body: bytes, headers: Mapping[str, str], secrets: SecretStore
) -> None:
    """Verify the webhook's signature with the partner's secret.

    Args:
        partner: the partner's profile (with a ``webhook`` block).
        body: the raw request body (signatures cover the exact bytes).
        headers: the request headers.
        secrets: where ``webhook.signature.secret_env`` is looked up (environment, then
            the secret env file).

    Raises:
        ServiceUnavailableError: the secret's variable is unset or unusable.
        UnauthorizedError: missing, wrong or stale signature (401).
    """
    assert partner.webhook is not None
    spec = partner.webhook.signature
    secret = secrets.get(spec.secret_env) or ""
    if not usable_secret(spec, secret):
        raise ServiceUnavailableError(
            f"webhooks from this partner are not configured ({spec.secret_env} is unset "
            "or not a usable secret)"
        )
    try:
        verify_signature(spec, secret=secret, body=body, headers=headers)
    except SignatureError as exc:
        log.info("partners.bad_signature", partner=partner.name, reason=exc.reason)
        raise UnauthorizedError(
            "the webhook signature does not verify",
            [Problem("signature", f"{exc.reason}_signature", str(exc))],
            header=spec.header or "webhook-signature",
        ) from exc


async def receive_partner_webhook(
    session: AsyncSession,
    runtime: Runtime,
    *,
    partner: PartnerProfile,
    raw: bytes,
    content_type: str,
) -> Received:
    """Store and map one verified webhook (flushes; the request commits).

    Returns:
        202 with ``status``: ``received`` (applied right after), ``ignored`` (a status the
        profile ignores), ``failed`` (kept in the exceptions queue, with the problems), or
        the stored answer with ``duplicate: true``.

    Raises:
        BadRequestError, UnprocessableError: not a JSON object, or no event id (nothing to
            deduplicate on): the partner must fix it.
    """
    data = decode_json_object(raw)
    try:
        event_id = partner_event_id(data, partner)
    except MappingError as exc:
        raise UnprocessableError("the webhook has no event id", [exc.problem]) from exc
    message = inbox.new_message(
        channel=CHANNEL,
        sender=partner.name,
        external_id=event_id,
        body=raw,
        content_type=content_type,
        principal=f"signature:{partner.name}",
    )
    body: dict[str, object] = {
        "message_id": message.id,
        "event_id": event_id,
        "status_url": f"{runtime.settings.public_base_url}/v1/messages/{message.id}",
    }
    problems: list[Problem] = []
    event = None
    try:
        event = partner_to_clinical_event(data, partner, identifier_base=runtime.systems.base)
    except MappingErrors as exc:
        problems = exc.problems
    if event is not None:
        ahead = future_time_problem(
            event.occurred_at, received_at=utcnow(), max_future=partner.max_future
        )
        if ahead is not None:  # a time read in the wrong zone: kept, never applied
            problems = [ahead]
    if problems:
        message.status = MessageStatus.FAILED
        message.response = {**body, "status": "failed", "problems": [p.as_dict() for p in problems]}
    elif event is None:
        message.status = MessageStatus.IGNORED
        message.response = {**body, "status": "ignored"}
    else:
        message.response = {**body, "status": "received", "event_type": event.type}
    leased = event is not None and not problems and lease_for_this_process(runtime, message)
    if message.status != MessageStatus.RECEIVED:
        message.processed_at = utcnow()
    existing = await store_if_new(session, message)
    if existing is not None:
        return Received(202, {**(existing.response or {}), "duplicate": True}, existing.id)
    if problems:
        session.add(
            inbox.new_exception(
                kind="unmappable_input",
                channel=CHANNEL,
                sender=partner.name,
                message_id=message.id,
                problems=problems,
            )
        )
        await session.flush()
        log.info(
            "partners.unmappable",
            message_id=message.id,
            partner=partner.name,
            problems=len(problems),
        )
        return Received(202, message.response, message.id)
    log.info(
        "partners.received",
        message_id=message.id,
        partner=partner.name,
        event_type=event.type if event else None,
    )
    if event is None or not leased:
        return Received(202, message.response, message.id)
    return Received(
        202, message.response, message.id, message=message, prepared=Prepared(events=[event])
    )
