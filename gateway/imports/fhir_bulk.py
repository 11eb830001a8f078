"""Importing FHIR Bulk Data export lines (issue 16): one Patient, QuestionnaireResponse or
MedicationRequest per NDJSON line (https://hl7.org/fhir/uv/bulkdata/export.html,
"Bulk Data Output File Format"), through the live ingest storage
(:func:`gateway.ingest.storage.store_mapped`): the same validation, patient matching and
merge, duplicate review, migrated Provenance, outbox rows per EHR target and audit entries
as live traffic.

* Patient: normalized (:func:`mappers.bulk_fhir.normalize_patient`), matched by the old
  id (kept as the identifier :func:`mappers.bulk_fhir.legacy_system`), its identifiers
  and emails (:func:`gateway.patients.matching.match_or_register`), so a patient the
  gateway knows is not duplicated (an email shared with another Patient of the same
  export does not join them: their old ids say they are two); a new one goes through
  duplicate review on demographics like a live one. The import owns no Patient element: it fills what the
  stored Patient lacks, a disagreement is kept as a conflict.
* QuestionnaireResponse, MedicationRequest: the ``subject`` must be a Patient of the
  export imported already (else refused, ``unknown_patient``); references are rewritten
  (:func:`mappers.bulk_fhir.rewrite_references`); stored under a new id with the old id
  as an identifier. No case event: the old system's workflow state is not known.

Idempotent: the inbox row (channel ``fhir-import``, sender the resource type, external
id :func:`mappers.bulk_fhir.business_id`) answers a copy with its stored answer; a
different resource under the same business id is refused (``changed_since_import``).

Errors: :class:`~gateway.errors.UnprocessableError` (the line is not a resource the
import takes, does not validate, or names a Patient not imported) and
:class:`~gateway.errors.ConflictError`, each with every problem; the import service keeps
them as refusals.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import InboundMessage, MessageStatus
from gateway.errors import ConflictError, UnprocessableError
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
from gateway.patients.matching import (
    PatientMatch,
    find_patient,
    match_or_register,
    record_conflicts,
)
from gateway.patients.merge import MergedPatient, merge_into_match
from mappers import bulk_fhir
from mappers.errors import MappingErrors, Problem
from mappers.events import PatientRef
from mappers.validation import resource_problems

#: The inbox channel of imported FHIR resources.
CHANNEL = "fhir-import"

#: How many bytes of a file are read to tell its resource type.
_PEEK_BYTES = 1 << 16


def file_rank(path: Path) -> int:
    """Where a file goes in a job: 0 for a Bulk Data Patient file (its first record is a
    Patient, or, when that cannot be read, its name starts with ``Patient``), 1 for any
    other, so Patients are imported before the resources that refer to them."""
    first = b""
    try:
        with path.open("rb") as handle:
            for line in handle.read(_PEEK_BYTES).splitlines():
                if line.strip():
                    first = line.strip()
                    break
    except OSError:
        return 1
    try:
        data = json.loads(first)
    except ValueError:
        data = None
    if isinstance(data, dict) and "resourceType" in data:
        return 0 if data["resourceType"] == "Patient" else 1
    return 0 if path.name.lower().startswith("patient") else 1


def _refused(title: str, problems: list[Problem]) -> UnprocessableError:
    return UnprocessableError(title, problems)


async def import_resource(
    session: AsyncSession, ctx: IngestContext, *, raw: bytes, actor: str
) -> Outcome:
    """Import one exported resource (flushes; the import's batch commits).

    Args:
        session: the batch's session (the record runs in a savepoint).
        ctx: the job's context; ``ctx.migration`` names the source.
        raw: the NDJSON line.
        actor: who runs the import (``import:<job id>``).

    Returns:
        202 with the stored answer (``replayed`` for a resource imported before).

    Raises:
        UnprocessableError: not an imported type, invalid, or an unknown subject.
        ConflictError: another resource was imported under the same business id.
    """
    if ctx.migration is None:
        raise ValueError("a FHIR Bulk Data import needs a migration context")
    source = ctx.migration.source
    data = decode_json_object(raw)
    unsupported = bulk_fhir.unsupported_type_problem(data)
    if unsupported is not None:
        raise _refused("not a resource type this import takes", [unsupported])
    rtype = str(data["resourceType"])
    key = bulk_fhir.business_id(data, source)
    if key is None:
        raise _refused(
            "the resource has no id",
            [
                Problem(
                    f"{rtype}.id", "missing_id", "an exported resource needs an id or identifier"
                )
            ],
        )
    message = inbox.new_message(
        channel=CHANNEL,
        sender=rtype,
        external_id=key,
        body=raw,
        content_type="application/fhir+json",
        principal=ctx.principal(f"client:{actor}"),
    )
    existing = await claim_message(session, message)
    if existing is not None:
        if existing.content_hash == message.content_hash:
            return replayed(existing)
        raise ConflictError(
            "another resource was imported under this business id",
            [
                Problem(
                    rtype,
                    "changed_since_import",
                    "a resource with this identifier (or id) was imported with other "
                    "content; change it through the live channels",
                )
            ],
        )
    if rtype == "Patient":
        mapped = await _prepare_patient(session, ctx, data, message, actor)
    else:
        mapped = await _prepare_record(session, ctx, data, message, actor)
    body = {"resourceType": rtype, "status": "accepted", **await store_mapped(session, ctx, mapped)}
    await finish_message(session, message, status=MessageStatus.PROCESSED, response=body)
    return Outcome(202, body, message.id)


async def _prepare_patient(
    session: AsyncSession,
    ctx: IngestContext,
    data: dict[str, Any],
    message: InboundMessage,
    actor: str,
) -> MappedMessage:
    assert ctx.migration is not None
    source, systems = ctx.migration.source, ctx.systems
    new_id = str(uuid.uuid4())
    patient, problems = bulk_fhir.normalize_patient(
        data, patient_id=new_id, systems=systems, source=source
    )
    named = {p.location for p in problems}
    problems += [p for p in resource_problems(patient) if p.location not in named]
    if problems:
        raise _refused("the Patient is not valid FHIR R4", problems)
    refs = [
        PatientRef("identifier", value, system=system)
        for system, value in bulk_fhir.patient_identifiers(data, systems=systems, source=source)
    ]
    refs += [PatientRef("email", email) for email in bulk_fhir.patient_emails(patient)]
    match = await match_or_register(session, refs, id_system=systems.patient, new_id=new_id)
    if _another_exported_patient(match, bulk_fhir.legacy_system(systems, source, "Patient"), data):
        # Two Patients of the export share an email (a parent and a child): the old ids
        # say they are two people, so the email does not join them.
        refs = [r for r in refs if r.kind != "email"]
        match = await match_or_register(session, refs, id_system=systems.patient, new_id=new_id)
    assert match.patient_id is not None
    if match.patient_id != new_id:  # a patient the gateway knows
        patient, _ = bulk_fhir.normalize_patient(
            data, patient_id=match.patient_id, systems=systems, source=source
        )
    record_conflicts(session, match, channel=CHANNEL, sender=None, message_id=message.id)
    merged = await merge_into_match(session, match, patient, source="migration", owns=())
    return MappedMessage(
        message=message,
        match=match,
        merged=merged,
        resources=[merged.patient],
        profile=None,
        kind=CHANNEL,
        event=None,
        actor=actor,
        occurred_at=bulk_fhir.original_time(data),
    )


def _another_exported_patient(match: PatientMatch, legacy: str, data: dict[str, Any]) -> bool:
    """True when ``match`` was made on an email only and its Patient is another Patient
    of the same export (it carries another old id of this source)."""
    if match.matched_on is None or match.matched_on.kind != "email" or match.existing is None:
        return False
    old_ids = {
        i.get("value") for i in match.existing.get("identifier", []) if i.get("system") == legacy
    }
    return bool(old_ids) and data.get("id") not in old_ids


async def _prepare_record(
    session: AsyncSession,
    ctx: IngestContext,
    data: dict[str, Any],
    message: InboundMessage,
    actor: str,
) -> MappedMessage:
    """A QuestionnaireResponse or MedicationRequest for the gateway Patient of its
    subject."""
    assert ctx.migration is not None
    source, systems = ctx.migration.source, ctx.systems
    rtype = str(data["resourceType"])
    known: dict[str, str] = {}
    matches = {}
    patient_system = bulk_fhir.legacy_system(systems, source, "Patient")
    for old_id in sorted(bulk_fhir.referenced_patients(data)):
        found = await find_patient(
            session, [PatientRef("identifier", old_id, system=patient_system)], learn=False
        )
        if found.patient_id is not None:
            known[old_id], matches[old_id] = found.patient_id, found
    problems = bulk_fhir.subject_problems(data, known)
    new_id = str(uuid.uuid4())
    resource: dict[str, Any] = data
    try:
        resource = bulk_fhir.prepare_resource(
            data, new_id=new_id, known=known, systems=systems, source=source
        )
    except MappingErrors as exc:
        problems += exc.problems
    problems += resource_problems(resource)
    if problems:
        raise _refused(f"the {rtype} cannot be imported", problems)
    subject = bulk_fhir.parse_reference(data["subject"]["reference"])
    assert subject is not None  # subject_problems found none
    match = matches[subject[1]]
    assert match.patient_id is not None
    # The Patient is not written: an empty Patient leaves its keys and sources alone.
    merged = MergedPatient({"resourceType": "Patient", "id": match.patient_id}, [], {})
    return MappedMessage(
        message=message,
        match=match,
        merged=merged,
        resources=[resource],
        profile=None,
        kind=CHANNEL,
        event=None,
        actor=actor,
        current={f"{rtype}/{new_id}": None},
        occurred_at=bulk_fhir.original_time(data),
    )
