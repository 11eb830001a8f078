"""HL7 v2 messages in, ACKs out: one code path for ``POST /v1/hl7v2`` and MLLP.

For each message (HL7 v2 chapter 2, original acknowledgment mode):

1. read MSH (``mappers.hl7v2.parse_er7``); unreadable: ``AR``;
2. verify the sender: MSH-4 sending facility (and MSH-3 application, and for MLLP the
   peer's network, when the partner's profile lists them) must belong to a partner
   profile, and one the credential (:class:`Hl7Credential`: the API client bound with
   ``--partner``, the MLLP client certificate a partner's ``hl7.certificates`` names) may
   send as; an MSH-3 another partner lists is refused too: otherwise ``AR`` 103
   (``mappers.hl7v2.sender_not_accepted``), kept for review;
3. deduplicate on MSH-10 per sending facility: a retransmission (the same text, line
   endings aside) gets the same answer again; a different message reusing a control id
   gets ``AR`` (205);
4. map it to a clinical event with the partner's table; ``AE`` when it cannot be
   mapped, or when its time is more than the partner's ``max_future`` ahead of now (AE
   102, kept as ``failed`` in the inbox and in the exceptions queue), ``AA`` otherwise;
5. store it (the caller commits) and only then answer. The event is applied after the
   ACK is sent.

A message refused with ``AR`` is kept whole in the exceptions queue (``hl7_rejected``), so
ops can retry it once the profile is fixed. Nothing is logged but ids and codes.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import InboundMessage, MessageStatus
from gateway.db.types import utcnow
from gateway.events.service import Prepared, lease_for_this_process
from gateway.http import store_if_new
from gateway.inbox import repository as inbox
from gateway.logging import get_logger
from gateway.runtime import Runtime
from mappers.errors import Problem
from mappers.hl7v2 import (
    AckCode,
    Hl7Message,
    Hl7MessageError,
    build_ack,
    decode_er7,
    hl7v2_to_clinical_event,
    normalize_er7,
    parse_er7,
    refused_control_id,
    sender_not_accepted,
)
from mappers.profiles import PartnerProfile, ProfileSet

log = get_logger(__name__)

CHANNEL = "hl7v2"
CONTENT_TYPE = "application/hl7-v2"


@dataclass(frozen=True)
class Hl7Credential:
    """Who speaks on a connection or request, and for which partners.

    Attributes:
        principal: recorded with each stored message and its events (``client:<name>``,
            ``cert:<CN>:sha256:<hex>``, ``mllp-peer:<address>``).
        partners: the partner profiles (names) it may send as; None: any (an API client
            without ``--partner``, plaintext MLLP, where MSH-4 and ``peers`` decide).
        certificate: for MLLP over TLS, the client certificate's SHA-256 (lowercase hex of
            the DER bytes) and subject CN: the partners are those whose
            ``hl7.certificates`` name it, read from the profiles current at each message
            (a reload takes effect on open connections).
    """

    principal: str
    partners: frozenset[str] | None = None
    certificate: tuple[str, str | None] | None = None

    @property
    def agent_name(self) -> str:
        """The principal in at most 128 characters (the audit agent's name): a
        certificate with a long CN is named by its fingerprint alone."""
        if len(self.principal) <= 128 or self.certificate is None:
            return self.principal[:128]
        return f"cert:sha256:{self.certificate[0]}"

    def allowed_partners(self, profiles: ProfileSet) -> frozenset[str] | None:
        """The partner names this credential may send as now (None: any)."""
        if self.certificate is None:
            return self.partners
        sha256, common_name = self.certificate
        return frozenset(
            name
            for name, p in profiles.partners.items()
            if p.hl7 is not None
            and p.hl7.accepts_certificate(sha256=sha256, common_name=common_name)
        )


def _credential_refusal(
    profiles: ProfileSet, partner: PartnerProfile, application: str, allowed: frozenset[str] | None
) -> Hl7MessageError | None:
    """MSH-4's partner must be one the credential may send as, and MSH-3 must not be an
    application another partner lists (a sender naming another's application speaks for
    it)."""
    if allowed is None:
        return None
    if partner.name not in allowed:
        return sender_not_accepted("credential")
    for other in profiles.partners.values():
        if (
            other.name not in allowed
            and other.hl7 is not None
            and application
            and application in other.hl7.applications
        ):
            return sender_not_accepted("credential_application")
    return None


@dataclass(frozen=True)
class Hl7Reply:
    """The answer to one message: the ACK (ER7, ``\\r``-separated), its MSA-1 code, and
    the stored message with its mapped event to apply after the ACK (None: nothing to
    apply)."""

    ack: str
    code: AckCode
    message: InboundMessage | None = None
    prepared: Prepared | None = None
    duplicate: bool = False

    @property
    def message_id(self) -> str | None:
        """The inbox id of the message to apply, if any."""
        return self.message.id if self.message is not None else None


def _ack(
    parsed: Hl7Message | None,
    code: AckCode,
    error: Hl7MessageError | None = None,
    acknowledged_id: str | None = None,
) -> str:
    return build_ack(
        parsed,
        code,
        control_id=f"A{uuid.uuid4().hex[:19]}",
        now=utcnow(),
        error=error,
        acknowledged_id=acknowledged_id,
    )


def _error_dict(error: Hl7MessageError) -> dict[str, Any]:
    return {
        "ack_code": error.ack_code,
        "hl7_code": error.hl7_code,
        "message": str(error),
        "segment": error.segment,
        "field": error.field_position,
    }


def _error_from(data: dict[str, Any]) -> Hl7MessageError:
    return Hl7MessageError(
        data["ack_code"],
        int(data["hl7_code"]),
        str(data["message"]),
        segment=data.get("segment"),
        field_position=data.get("field"),
    )


def _peer_allowed(partner: PartnerProfile, peer: str | None) -> bool:
    assert partner.hl7 is not None
    if not partner.hl7.peers:
        return True
    if peer is None:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in partner.hl7.peers)


def _same_text(existing: InboundMessage, parsed: Hl7Message) -> bool:
    """A retransmission whose bytes differ only in line endings, blank or trailing segment
    separators or MLLP block characters (resent from a file, or by another tool) is the
    same message."""
    return normalize_er7(decode_er7(existing.body)) == parsed.text


def record_hl7_rejection(
    session: AsyncSession,
    *,
    raw: bytes,
    error: Hl7MessageError,
    sender: str | None,
    transport: str,
    principal: str | None = None,
) -> None:
    """Keep a message refused with AR (or a broken MLLP frame) for review and retry, with
    the ``principal`` that sent it (the reviewer sees which credential it was)."""
    session.add(
        inbox.new_exception(
            kind="hl7_rejected",
            channel=CHANNEL,
            sender=sender,
            principal=principal,
            problems=[Problem(error.location or "MSH", f"hl7_{error.hl7_code}", str(error))],
            payload=raw,
            content_type=CONTENT_TYPE,
        )
    )
    log.info(
        "hl7.rejected",
        transport=transport,
        sender=sender,
        hl7_code=error.hl7_code,
        location=error.location,
    )


async def receive_hl7(
    session: AsyncSession,
    runtime: Runtime,
    *,
    raw: bytes,
    transport: str,
    peer: str | None = None,
    lease: bool = True,
    credential: Hl7Credential | None = None,
) -> Hl7Reply:
    """Verify, deduplicate, map and store one ER7 message; build its ACK.

    Flushes; the caller commits before sending the ACK.

    Args:
        session: the caller's session.
        runtime: the wired runtime.
        raw: the message bytes (no MLLP framing).
        transport: ``http`` or ``mllp`` (logs, peer check).
        peer: the MLLP peer's IP address (checked against the partner's ``peers``).
        lease: this process applies the message right after the ACK (else the worker's
            sweep does, at once).
        credential: who sent it (recorded, and the partners it may send as); None: an
            anonymous sender that may send as any partner (tests, tools).

    Returns:
        The :class:`Hl7Reply`. MSA-2 echoes MSH-10; AE/AR carry an ERR segment.
    """
    profiles = runtime.profiles.current
    try:
        parsed = parse_er7(decode_er7(raw))
    except Hl7MessageError as exc:
        sender = exc.envelope.sending_facility or None if exc.envelope else None
        record_hl7_rejection(
            session,
            raw=raw,
            error=exc,
            sender=sender,
            transport=transport,
            principal=credential.principal if credential else None,
        )
        await session.flush()
        # a refused batch: MSA-2 as the sender's profile expects (first MSH-10 or BHS-11)
        known = profiles.hl7_sender(sender) if sender else None
        return Hl7Reply(_ack(exc.envelope, "AR", exc, refused_control_id(exc, known)), "AR")
    facility = parsed.sending_facility
    partner = profiles.hl7_sender(facility) if facility else None
    refusal: Hl7MessageError | None = None
    if partner is None or partner.hl7 is None:
        refusal = sender_not_accepted("facility")
    elif partner.hl7.applications and parsed.sending_application not in partner.hl7.applications:
        refusal = sender_not_accepted("application")
    elif transport == "mllp" and not _peer_allowed(partner, peer):
        refusal = sender_not_accepted("peer")
    elif credential is not None:
        refusal = _credential_refusal(
            profiles, partner, parsed.sending_application, credential.allowed_partners(profiles)
        )
    if refusal is not None or partner is None:
        assert refusal is not None
        log.info(
            "hl7.sender_refused",
            transport=transport,
            sender=facility or None,
            principal=credential.principal if credential else None,
        )
        record_hl7_rejection(
            session,
            raw=raw,
            error=refusal,
            sender=facility or None,
            transport=transport,
            principal=credential.principal if credential else None,
        )
        await session.flush()
        return Hl7Reply(_ack(parsed, "AR", refusal), "AR")

    error: Hl7MessageError | None = None
    event = None
    try:
        event = hl7v2_to_clinical_event(
            parsed, partner, identifier_base=runtime.systems.base, received_at=utcnow()
        )
    except Hl7MessageError as exc:
        if exc.ack_code == "AR":
            record_hl7_rejection(
                session,
                raw=raw,
                error=exc,
                sender=facility,
                transport=transport,
                principal=credential.principal if credential else None,
            )
            await session.flush()
            return Hl7Reply(_ack(parsed, "AR", exc), "AR")
        error = exc
    message = inbox.new_message(
        channel=CHANNEL,
        sender=facility,
        external_id=parsed.control_id,
        body=raw,
        content_type=CONTENT_TYPE,
        principal=credential.principal if credential is not None else None,
    )
    if error is not None:
        message.status = MessageStatus.FAILED
        message.response = {
            "message_id": message.id,
            "ack_code": "AE",
            "status": "failed",
            "error": _error_dict(error),
        }
    else:
        message.response = {
            "message_id": message.id,
            "ack_code": "AA",
            "status": "received" if event else "ignored",
            "message_type": parsed.message_type,
        }
        if event is None:
            message.status = MessageStatus.IGNORED
        elif lease:
            lease = lease_for_this_process(runtime, message)
    if message.status != MessageStatus.RECEIVED:
        message.processed_at = utcnow()
    existing = await store_if_new(session, message, alone=error is None)
    if existing is not None:
        if existing.content_hash == message.content_hash or _same_text(existing, parsed):
            stored = existing.response or {}
            code: AckCode = stored.get("ack_code", "AA")
            stored_error = _error_from(stored["error"]) if stored.get("error") else None
            log.info("hl7.duplicate", message_id=existing.id, transport=transport, ack_code=code)
            return Hl7Reply(_ack(parsed, code, stored_error), code, duplicate=True)
        reuse = Hl7MessageError(
            "AR",
            205,
            "MSH-10 was already used by this facility for another message",
            segment="MSH",
            field_position=10,
        )
        record_hl7_rejection(
            session,
            raw=raw,
            error=reuse,
            sender=facility,
            transport=transport,
            principal=credential.principal if credential else None,
        )
        await session.flush()
        return Hl7Reply(_ack(parsed, "AR", reuse), "AR")
    if error is not None:
        session.add(
            inbox.new_exception(
                kind="unmappable_input",
                channel=CHANNEL,
                sender=facility,
                message_id=message.id,
                problems=[error.problem],
            )
        )
        await session.flush()
        log.info(
            "hl7.unmappable",
            message_id=message.id,
            transport=transport,
            message_type=parsed.message_type,
            hl7_code=error.hl7_code,
            location=error.location,
        )
        return Hl7Reply(_ack(parsed, "AE", error), "AE")
    log.info(
        "hl7.received",
        message_id=message.id,
        transport=transport,
        partner=partner.name,
        message_type=parsed.message_type,
        event_type=event.type if event else None,
    )
    if event is None or not lease:
        return Hl7Reply(_ack(parsed, "AA"), "AA")
    return Hl7Reply(_ack(parsed, "AA"), "AA", message=message, prepared=Prepared(events=[event]))
