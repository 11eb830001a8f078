"""Queries on the local FHIR store (``fhir_resources``, ``fhir_resource_versions``) and on
the profile that produced each version (``profile_mappings``)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, cast

from sqlalchemy import ColumnElement, Executable, Table, and_, bindparam, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.bulk import BulkInserts
from gateway.db.identity_models import PatientFeatures
from gateway.db.models import FhirResource, FhirResourceVersion, ProfileMapping
from gateway.db.types import utcnow
from mappers.bundle import business_identifier
from mappers.normalize import to_fhir_instant


@dataclass(frozen=True)
class ProfileRef:
    """The mapping profile that produced a resource: id, version and content hash."""

    id: str
    version: str
    content_hash: str


async def get_resource(
    session: AsyncSession, resource_type: str, resource_id: str
) -> FhirResource | None:
    """The stored resource, or None."""
    return await session.get(FhirResource, (resource_type, resource_id))


def resource_keys(refs: Sequence[str]) -> ColumnElement[bool]:
    """The ``fhir_resources`` rows of ``refs`` (``Type/id``, at least one) as a WHERE
    clause: an OR of primary-key lookups, not a row-value IN, because SQLite scans the
    whole table for ``(a, b) IN (VALUES ...)`` but searches the primary key for each OR
    term."""
    keys = (ref.split("/", 1) for ref in refs)
    return or_(*(and_(FhirResource.resource_type == t, FhirResource.id == i) for t, i in keys))


async def get_resources(session: AsyncSession, refs: Sequence[str]) -> list[dict[str, Any]]:
    """The current versions of ``refs`` (``Type/id``), in the order given; missing ones
    are skipped."""
    if not refs:
        return []
    rows = await session.scalars(select(FhirResource).where(resource_keys(refs)))
    by_ref = {f"{r.resource_type}/{r.id}": r.resource for r in rows}
    return [by_ref[ref] for ref in refs if ref in by_ref]


async def find_by_identifier(
    session: AsyncSession, resource_type: str, system: str, value: str
) -> FhirResource | None:
    """The resource of ``resource_type`` whose business identifier is ``system|value``."""
    return await session.scalar(
        select(FhirResource).where(
            FhirResource.resource_type == resource_type,
            FhirResource.identifier_system == system,
            FhirResource.identifier_value == value,
        )
    )


class _Lookup:
    """Marker: the caller did not say whether the resource exists."""


LOOKUP = _Lookup()


async def save_resource(
    session: AsyncSession,
    resource: dict[str, Any],
    *,
    message_id: str | None,
    patient_id: str | None,
    profile: ProfileRef | None = None,
    current: FhirResource | _Lookup | None = LOOKUP,
    bulk: BulkInserts | None = None,
) -> tuple[dict[str, Any], bool]:
    """Insert ``resource`` or, when it exists, store it as a new version.

    Sets ``meta.versionId`` and ``meta.lastUpdated`` on the stored copy (the input dict
    is not modified; nested elements are shared with it, not copied). On update, the
    superseded version moves to ``fhir_resource_versions`` (the history).

    Args:
        current: the stored row of this resource, or None when the caller knows it is
            new; omitted, it is looked up.
        bulk: queue new rows here (the caller inserts them in bulk) instead of adding
            ORM objects to the session.

    Returns:
        ``(stored resource, changed)``: ``changed`` is False when the content equals the
        current version (nothing written).
    """
    now = utcnow()
    rtype, rid = resource["resourceType"], resource["id"]
    row = await session.get(FhirResource, (rtype, rid)) if isinstance(current, _Lookup) else current
    stored = dict(resource)
    meta = stored["meta"] = dict(resource.get("meta") or {})
    if row is not None:
        if _content(row.resource) == _content(stored):
            return row.resource, False
        version = row.version_id + 1
    else:
        version = 1
    meta["versionId"] = str(version)
    meta["lastUpdated"] = to_fhir_instant(now)
    ident = business_identifier(stored)
    profile_values = (
        {
            "profile_id": profile.id,
            "profile_version": profile.version,
            "profile_hash": profile.content_hash,
        }
        if profile is not None
        else {}
    )
    if row is None:
        values = {
            "resource_type": rtype,
            "id": rid,
            "version_id": version,
            "resource": stored,
            "identifier_system": ident[0] if ident else None,
            "identifier_value": ident[1] if ident else None,
            "patient_id": patient_id,
            "inbound_message_id": message_id,
            "created_at": now,
            "updated_at": now,
            **profile_values,
        }
        if bulk is not None:
            bulk.add(FhirResource, **values)
        else:
            session.add(FhirResource(**values))
        if rtype == "Patient":
            await _save_review_features(session, stored, now=now, new=True, bulk=bulk)
        return stored, True
    # History keeps the superseded versions; the current one lives in fhir_resources.
    superseded = {
        "resource_type": rtype,
        "id": rid,
        "version_id": row.version_id,
        "resource": row.resource,
        "inbound_message_id": row.inbound_message_id,
        "recorded_at": row.updated_at,
    }
    if bulk is not None:
        bulk.add(FhirResourceVersion, **superseded)
    else:
        session.add(FhirResourceVersion(**superseded))
    row.version_id = version
    row.resource = stored
    row.inbound_message_id = message_id
    row.updated_at = now
    for key, value in profile_values.items():
        setattr(row, key, value)
    if rtype == "Patient":
        await _save_review_features(session, stored, now=now, new=False, bulk=bulk)
    return stored, True


def _delete_features() -> Executable:
    table = cast(Table, PatientFeatures.__table__)
    return delete(table).where(table.c.patient_id == bindparam("_patient_id"))


async def _save_review_features(
    session: AsyncSession,
    patient: dict[str, Any],
    *,
    now: datetime,
    new: bool,
    bulk: BulkInserts | None,
) -> None:
    """Keep the Patient's ``patient_review_features`` row (what duplicate review compares)
    equal to the version just stored: inserted with a new Patient, replaced with a new
    version, deleted when the Patient no longer has a name and a birth date. With
    ``bulk`` the statement is queued there (sent with the Patient's own row)."""
    values = PatientFeatures.row_of(patient, now=now)
    if new:
        if values is None:
            return
        if bulk is not None:
            bulk.add(PatientFeatures, **values)
        else:
            session.add(PatientFeatures(**values))
        return
    dialect = session.get_bind().dialect.name
    build: Callable[[], Executable]
    key: tuple[str, ...]
    if values is None:
        key, build = ("review_features_delete",), _delete_features
        params = {"_patient_id": patient["id"]}
    else:
        key, params = ("review_features_upsert", dialect), values
        build = partial(PatientFeatures.upsert, dialect)
    if bulk is not None:
        bulk.add_statement(key, build, [params])
    else:
        await session.execute(build(), params)


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = dict(out.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    out["meta"] = meta
    return out


# --------------------------------------------------------------------------- profiles


def record_mapping(
    session: AsyncSession,
    *,
    message_id: str,
    action: str,
    profile_kind: str,
    profile: ProfileRef,
    resource_versions: list[str],
    attribution: dict[str, Any] | None,
    actor: str,
    bulk: BulkInserts | None = None,
) -> None:
    """Add the profile-mapping row of one ingest or re-map: which profile (id, version,
    content hash) produced which resource versions (``Type/id/_history/n``); to the
    session, or queued in ``bulk``."""
    values: dict[str, Any] = dict(
        inbound_message_id=message_id,
        action=action,
        profile_kind=profile_kind,
        profile_id=profile.id,
        profile_version=profile.version,
        profile_hash=profile.content_hash,
        resource_versions=resource_versions,
        attribution=attribution,
        actor=actor,
        created_at=utcnow(),
    )
    if bulk is None:
        session.add(ProfileMapping(**values))
    else:
        bulk.add(ProfileMapping, **values)


async def resources_with_identifier_prefix(
    session: AsyncSession, systems: Iterable[str], prefix: str
) -> list[FhirResource]:
    """Stored resources whose business identifier is ``<system>|<prefix>...``."""
    rows = await session.scalars(
        select(FhirResource).where(
            FhirResource.identifier_system.in_(list(systems)),
            FhirResource.identifier_value.startswith(prefix, autoescape=True),
        )
    )
    return list(rows)


# --------------------------------------------------------------------------- search


@dataclass(frozen=True, slots=True)
class StoredResource:
    """A current resource as a search reads it (its columns, not an ORM object: a search
    reads many rows, and an ORM instance costs about as much as decoding its JSON)."""

    resource_type: str
    id: str
    resource: dict[str, Any]
    patient_id: str | None
    updated_at: datetime
    version_id: int


_STORED_COLUMNS = (
    FhirResource.resource_type,
    FhirResource.id,
    FhirResource.resource,
    FhirResource.patient_id,
    FhirResource.updated_at,
    FhirResource.version_id,
)


async def resources_of_type(
    session: AsyncSession,
    resource_type: str,
    *,
    patient_ids: Collection[str] | None = None,
    ids: Collection[str] | None = None,
) -> list[StoredResource]:
    """The current resources of ``resource_type``, oldest update first (then id),
    narrowed to those of ``patient_ids`` (the ``patient_id`` column: the Patient a
    resource belongs to, or the Patient itself) and to ``ids`` when given. The search's
    candidates: the other criteria are evaluated on the resources (:mod:`mappers.search`)."""
    stmt = select(*_STORED_COLUMNS).where(FhirResource.resource_type == resource_type)
    if patient_ids is not None:
        stmt = stmt.where(FhirResource.patient_id.in_(sorted(patient_ids)))
    if ids is not None:
        stmt = stmt.where(FhirResource.id.in_(sorted(ids)))
    stmt = stmt.order_by(FhirResource.updated_at, FhirResource.id)
    return [StoredResource(*row) for row in await session.execute(stmt)]


async def patient_compartment(
    session: AsyncSession, patient_id: str, *, since: datetime | None = None
) -> list[StoredResource]:
    """The Patient and every stored resource that belongs to it (``patient_id``), the
    Patient first, then by type and id; ``since``: only those updated at or after it."""
    stmt = select(*_STORED_COLUMNS).where(FhirResource.patient_id == patient_id)
    if since is not None:
        stmt = stmt.where(FhirResource.updated_at >= since)
    stmt = stmt.order_by(FhirResource.resource_type, FhirResource.id)
    rows = [StoredResource(*row) for row in await session.execute(stmt)]
    rows.sort(key=lambda r: (r.resource_type != "Patient" or r.id != patient_id,))
    return rows


async def history(
    session: AsyncSession, resource_type: str, resource_id: str
) -> list[tuple[int, dict[str, Any], datetime]]:
    """Every version of a resource, newest first: ``(version id, resource, recorded
    at)``; empty when it is unknown."""
    current = await session.get(FhirResource, (resource_type, resource_id))
    if current is None:
        return []
    older = await session.scalars(
        select(FhirResourceVersion)
        .where(
            FhirResourceVersion.resource_type == resource_type,
            FhirResourceVersion.id == resource_id,
        )
        .order_by(FhirResourceVersion.version_id.desc())
    )
    return [(current.version_id, current.resource, current.updated_at)] + [
        (v.version_id, v.resource, v.recorded_at) for v in older
    ]


async def get_version(
    session: AsyncSession, resource_type: str, resource_id: str, version_id: int
) -> tuple[FhirResource, dict[str, Any], datetime] | None:
    """``(current row, the resource as of version_id, when that version was recorded)``,
    or None when the resource or that version is unknown."""
    current = await session.get(FhirResource, (resource_type, resource_id))
    if current is None:
        return None
    if current.version_id == version_id:
        return current, current.resource, current.updated_at
    old = await session.get(FhirResourceVersion, (resource_type, resource_id, version_id))
    if old is None:
        return None
    return current, old.resource, old.recorded_at
