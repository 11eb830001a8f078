"""Storing a mapped intake or checkout: one storage for every ingest channel.

One inbound message is handled in one database transaction (the request's; this module
flushes, the request dependency commits): the inbox row, the FHIR resources (with
history), the patient's keys, element sources and conflicts, one outbox row per EHR
target with the resource types that target receives, the case event, the profile that
produced each version (``profile_mappings``, ``fhir_resources.profile_*``,
``Provenance.policy``) and the audit entries are written together or not at all.

The inbox row is claimed first (:func:`claim_message`: ``INSERT ... ON CONFLICT DO
NOTHING``): the same message sent twice at once is settled by the unique dedupe key, the
second copy answering with the first one's stored answer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.clients.actor import current_actor
from gateway.db.bulk import BulkInserts
from gateway.db.models import (
    AuditEntry,
    Case,
    FhirResource,
    InboundMessage,
    MessageStatus,
    ReviewStatus,
)
from gateway.db.types import utcnow
from gateway.delivery.outbox import enqueue_ehr_deliveries, enqueue_ehr_updates
from gateway.errors import UnprocessableError
from gateway.fhir import repository as fhir_repo
from gateway.fhir.repository import ProfileRef
from gateway.http import Outcome, store_if_new
from gateway.inbox import repository as inbox
from gateway.ingest.patient_merge import merge_patients
from gateway.logging import get_logger
from gateway.patients import repository as patients_repo
from gateway.patients.matching import PatientMatch
from gateway.patients.merge import MergedPatient, save_patient_facts
from gateway.patients.review import detect_duplicates
from gateway.runtime import Runtime
from gateway.subscribers.service import enqueue_case_webhook, record_case_webhook_suppressed
from gateway.workflow.service import EventInput, apply_event
from mappers.errors import MappingErrors, Problem
from mappers.identifiers import IdentifierSystems
from mappers.patient import ElementConflict, element_path
from mappers.pipeline import profile_tag
from mappers.profiles import ProfileSet
from mappers.provenance import mark_migrated, provenance_for
from mappers.validation import validate_resources

log = get_logger(__name__)

#: Extension on Provenance naming a Patient element conflict (ids and codes, no values).
CONFLICT_EXTENSION = "patient-element-conflict"


@dataclass
class ImportTally:
    """What an import's records did besides their own rows, counted as they are stored
    (the import service takes back the count of a record it refuses)."""

    suppressed_webhooks: int = 0


@dataclass(frozen=True)
class Migration:
    """A record that comes from a bulk import (issue 16), not from live traffic.

    Attributes:
        job_id: the import job; the inbox row's principal is ``import:<job_id>``.
        source: the system the record was migrated from (named in its Provenance).
        notify: fire live side effects: ops webhooks for the case changes are sent.
            When False (the default) they are recorded ``suppressed``, never sent.
        tally: counts of this process's records of the job (not compared).
    """

    job_id: str
    source: str
    notify: bool = False
    tally: ImportTally = field(default_factory=ImportTally, compare=False)

    async def suppress_webhooks(
        self,
        session: AsyncSession,
        case: Case,
        webhook_type: str,
        *,
        from_state: str | None,
        event: dict[str, Any] | None,
    ) -> int:
        """A :class:`~gateway.workflow.service.ChangeSink`: the webhooks of a historical
        case change recorded ``suppressed`` (never sent), and counted in :attr:`tally`."""
        added = await record_case_webhook_suppressed(
            session, case, webhook_type, from_state=from_state, event=event
        )
        self.tally.suppressed_webhooks += added
        return added


@dataclass(frozen=True)
class IngestContext:
    """What one ingest request works with, read once when it starts: the profile set in
    use (a reload during the request does not change it), the identifier systems and the
    settings the answer needs."""

    profiles: ProfileSet
    systems: IdentifierSystems
    organization: str
    public_base_url: str
    migration: Migration | None = None

    def principal(self, default: str) -> str:
        """The inbox principal of a message: ``import:<job id>`` for an imported record,
        else ``default`` (who authenticated it)."""
        return f"import:{self.migration.job_id}" if self.migration else default

    @classmethod
    def of(cls, runtime: Runtime) -> IngestContext:
        """The runtime's current profiles and settings, as one snapshot."""
        return cls(
            profiles=runtime.profiles.current,
            systems=runtime.systems,
            organization=runtime.settings.organization_name,
            public_base_url=runtime.settings.public_base_url,
        )

    def profile_ref(self, key: str, profile_id: str, version: str) -> ProfileRef | None:
        """The stored-resource form of the profile at ``key`` (None when not loaded from a
        file, e.g. a preview draft)."""
        source = self.profiles.source_of(key)
        return ProfileRef(profile_id, version, source.content_hash) if source else None


# --------------------------------------------------------------------------- the inbox row


async def claim_message(session: AsyncSession, message: InboundMessage) -> InboundMessage | None:
    """Store ``message``'s inbox row unless its dedupe key is taken.

    Returns:
        None when stored (``message`` stays outside the session: :func:`finish_message`
        writes its outcome); the stored message otherwise (a copy of one already
        received, or being received: on PostgreSQL the insert waited for it).
    """
    return await store_if_new(session, message)


async def lock_message(session: AsyncSession, message: InboundMessage) -> InboundMessage:
    """``message`` as stored now, locked ``FOR UPDATE`` on PostgreSQL until the caller
    commits (a correction of it: two corrections at once apply one after the other)."""
    stmt = (
        select(InboundMessage)
        .where(InboundMessage.id == message.id)
        .execution_options(populate_existing=True)
    )
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return (await session.scalars(stmt)).one()


def revise_message(existing: InboundMessage, *, raw: bytes, content_type: str) -> InboundMessage:
    """A correction replaces the content of the stored row (its earlier versions stay in
    the resources' history) and counts a new revision."""
    existing.body = raw
    existing.content_hash = inbox.content_hash(raw)
    existing.content_type = content_type
    existing.revision += 1
    existing.received_at = utcnow()
    existing.status = MessageStatus.RECEIVED
    return existing


async def finish_message(
    session: AsyncSession,
    message: InboundMessage,
    *,
    status: MessageStatus,
    response: dict[str, Any],
) -> None:
    """Record a message's outcome and answer (the answer a copy of it gets)."""
    now = utcnow()
    message.status, message.processed_at, message.response = status, now, response
    if message in session:  # a stored row being corrected: flushed with the session
        return
    await session.execute(
        update(InboundMessage)
        .where(InboundMessage.id == message.id)
        .values(status=status, processed_at=now, response=response)
        .execution_options(synchronize_session=False)
    )


def replayed(existing: InboundMessage, status_code: int = 202) -> Outcome:
    """The answer to a copy of a stored message: the stored answer, ``replayed``."""
    return Outcome(status_code, {**(existing.response or {}), "replayed": True}, existing.id)


# --------------------------------------------------------------------------- storing


@dataclass
class MappedMessage:
    """The resources mapped from one message for its patient, ready to store.

    ``profile`` is the profile recorded on every resource (the intake form version, or
    the checkout plan table); ``other_profiles`` are further profiles that took part (a
    processor mapping), named in the Provenance too. ``merged`` is the Patient as it will
    be stored (the first of ``resources``), with the conflicts and element sources of the
    ownership merge. ``current`` holds the stored rows of other resources the mapping
    looked up already (None: known to be new). ``notes`` (values accepted with a change,
    such as a time dropped from a birth date) are named in the Provenance and answered as
    ``warnings``. ``occurred_at`` is the original time of a migrated record that has no
    case ``event`` (a FHIR Bulk Data import); the event's time otherwise.
    """

    message: InboundMessage
    match: PatientMatch
    merged: MergedPatient
    resources: list[dict[str, Any]]
    profile: ProfileRef | None
    kind: str
    event: EventInput | None
    actor: str
    other_profiles: list[str] = field(default_factory=list)
    attribution: dict[str, Any] | None = None
    action: str = "ingest"
    current: dict[str, FhirResource | None] = field(default_factory=dict)
    notes: list[Problem] = field(default_factory=list)
    occurred_at: datetime | None = None

    @property
    def patient_id(self) -> str:
        """The patient's id."""
        assert self.match.patient_id is not None  # an ingest match always has one
        return self.match.patient_id


async def _stored_rows(
    session: AsyncSession, mapped: MappedMessage
) -> dict[str, FhirResource | None]:
    """The stored row of every resource about to be written (None: new)."""
    known = dict(mapped.current)
    known[f"Patient/{mapped.patient_id}"] = None if mapped.match.new else mapped.match.row
    if not mapped.match.new and mapped.match.row is None:
        del known[f"Patient/{mapped.patient_id}"]  # matched without a row: look it up
    out: dict[str, FhirResource | None] = {}
    for r in mapped.resources:
        ref = f"{r['resourceType']}/{r['id']}"
        out[ref] = (
            known[ref]
            if ref in known
            else await fhir_repo.get_resource(session, r["resourceType"], r["id"])
        )
    return out


async def store_mapped(
    session: AsyncSession, ctx: IngestContext, mapped: MappedMessage
) -> dict[str, Any]:
    """Validate and store a mapped message with its Provenance, outbox rows, case event
    and audit entries. Flushes; the request dependency commits.

    Returns:
        The answer body: the patient, the resources written, the conflicts, the case,
        the deliveries and the status URL.

    Raises:
        UnprocessableError: the mapping produced FHIR that does not validate (a profile
            problem): every problem listed, nothing stored.
    """
    now = utcnow()
    written = mapped.resources
    provenance_id = str(uuid.uuid4())
    existed = await _stored_rows(session, mapped)
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
        systems=ctx.systems,
        author=f"Patient/{mapped.patient_id}",
        organization=ctx.organization,
        activity="UPDATE" if any(existed.values()) else "CREATE",
        profile=tag,
        notes=mapped.notes,
    )
    if ctx.migration is not None:
        provenance = mark_migrated(
            provenance,
            source=ctx.migration.source,
            occurred_at=mapped.event.occurred_at if mapped.event else mapped.occurred_at,
            systems=ctx.systems,
        )
    for other in mapped.other_profiles:
        provenance.setdefault("policy", []).append(f"urn:fhir-gateway:profile:{other}")
    conflicts = mapped.merged.conflicts
    conflict_rows = await patients_repo.add_conflicts(
        session, mapped.patient_id, conflicts, message_id=mapped.message.id
    )
    if conflict_rows:
        provenance["extension"] = [
            *provenance.get("extension", []),
            *(
                _conflict_extension(ctx.systems, row.id, c)
                for row, c in zip(conflict_rows, conflicts, strict=True)
            ),
        ]
    try:
        validate_resources([*written, provenance])
    except MappingErrors as exc:
        raise UnprocessableError(
            "the mapped FHIR resources do not validate (check the profile)", exc.problems
        ) from exc

    bulk = BulkInserts()
    changed_refs, versions = await _save_resources(session, mapped, written, existed, bulk, now)
    deliveries = []
    if changed_refs:
        provenance["target"] = [{"reference": r} for r in changed_refs]
        new: dict[str, FhirResource | None] = {f"Provenance/{provenance_id}": None}
        versions += (await _save_resources(session, mapped, [provenance], new, bulk, now))[1]
        deliveries = _enqueue(session, ctx, mapped, changed_refs, provenance_id)
    if mapped.profile is not None:
        fhir_repo.record_mapping(
            session,
            message_id=mapped.message.id,
            action=mapped.action,
            profile_kind=mapped.kind,
            profile=mapped.profile,
            resource_versions=versions,
            attribution=mapped.attribution,
            actor=mapped.actor,
            bulk=bulk,
        )
    await save_patient_facts(
        session, mapped.match, mapped.merged, message_id=mapped.message.id, bulk=bulk
    )
    case_result = None
    # A historical case runs no SLA timer: it would flag it overdue (and send
    # case.overdue) days after the import. The next live event of the case starts
    # its timers again.
    historical = ctx.migration is not None and not ctx.migration.notify
    if mapped.event is not None:
        case_result = await apply_event(
            session,
            ctx.profiles.workflow_or_raise,
            mapped.event,
            notify=enqueue_case_webhook
            if ctx.migration is None or ctx.migration.notify
            else ctx.migration.suppress_webhooks,
            new_patient=existed.get(f"Patient/{mapped.patient_id}") is None,
            bulk=bulk,
            timers=not historical,
        )
    # every row queued above (resources, audit entries, element sources, a new case and
    # its history, the profile mapping) in one round trip
    await bulk.flush(session)
    if (
        historical
        and case_result is not None
        and case_result.case_id
        and case_result.from_state is not None  # a case opened now started none
    ):
        await session.execute(
            update(Case)
            .where(Case.id == case_result.case_id)
            .values(sla_due_at=None, sla_timer=None)
            .execution_options(synchronize_session="fetch")
        )
    if mapped.match.new:
        deliveries += await _review_duplicates(session, ctx, mapped, written)
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
        "status_url": f"{ctx.public_base_url}/v1/messages/{mapped.message.id}",
        **({"warnings": [n.as_dict() for n in mapped.notes]} if mapped.notes else {}),
    }


async def _save_resources(
    session: AsyncSession,
    mapped: MappedMessage,
    resources: list[dict[str, Any]],
    existed: dict[str, FhirResource | None],
    bulk: BulkInserts,
    now: datetime,
) -> tuple[list[str], list[str]]:
    """Store each of ``resources`` that changed, with an audit entry; ``(changed refs, the
    versions written)``."""
    changed_refs: list[str] = []
    versions: list[str] = []
    who = current_actor()
    if who.name != mapped.actor:  # a signed webhook (Stripe) or a re-map: its own agent
        who = replace(who, name=mapped.actor, client_id=None)
    for resource in resources:
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
            versions.append(f"{ref}/_history/{stored['meta']['versionId']}")
            changed_refs.append(ref)
            action = "update" if existed[ref] else "create"
            bulk.add(
                AuditEntry,
                **audit.entry_values(
                    action=action,
                    entity_type=resource["resourceType"],
                    entity_id=resource["id"],
                    patient_id=mapped.patient_id,
                    detail={"message_id": mapped.message.id},
                    actor=who,
                    at=now,
                ),
            )
    return changed_refs, versions


def _enqueue(
    session: AsyncSession,
    ctx: IngestContext,
    mapped: MappedMessage,
    changed_refs: list[str],
    provenance_id: str,
) -> list[Any]:
    """One outbox row per enabled target with the changed resources it receives (none
    when none of them changed): what each target gets is decided there, once
    (:func:`gateway.delivery.outbox.enqueue_ehr_deliveries`)."""
    return list(
        enqueue_ehr_deliveries(
            session,
            ctx.profiles.enabled_targets(),
            message_id=mapped.message.id,
            patient_id=mapped.patient_id,
            changed_refs=changed_refs,
            provenance_ref=f"Provenance/{provenance_id}",
            received_at=mapped.message.received_at,
        )
    )


async def _review_duplicates(
    session: AsyncSession,
    ctx: IngestContext,
    mapped: MappedMessage,
    written: list[dict[str, Any]],
) -> list[Any]:
    """A new patient's probable duplicates (:func:`gateway.patients.review.
    detect_duplicates`): queued for review, or, at the link threshold, merged into the
    stored patient at once with the changes sent to the EHRs."""
    patient = next(
        (
            r
            for r in written
            if r.get("resourceType") == "Patient" and r.get("id") == mapped.patient_id
        ),
        None,
    )
    if patient is None:
        return []
    found = await detect_duplicates(session, patient)
    linked = [r for r in found if r.status == ReviewStatus.LINKED]
    if not linked:
        return []
    merged = await merge_patients(
        session, survivor_id=linked[0].candidate_id, merged_id=mapped.patient_id
    )
    linked[0].decided_by = "system"
    linked[0].decided_at = utcnow()
    return enqueue_ehr_updates(
        session,
        ctx.profiles.enabled_targets(),
        patient_id=merged.survivor_id,
        refs=merged.changed_refs,
    )


def _conflict_extension(
    systems: IdentifierSystems, record_id: int, c: ElementConflict
) -> dict[str, Any]:
    """A Provenance extension naming one conflict: element, outcome, sources and the
    conflict record's id; never the values (they stay in ``patient_conflicts``)."""
    base = systems.base
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
