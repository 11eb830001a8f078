"""Reconciliation (issue 16): what the gateway holds against what an EHR target holds,
by business identifier, after a backfill or a cutover.

For every resource the gateway stored that the target receives (``send`` minus
``overrides.skip``; Provenance is left out, it has no business identifier), updated
since ``since``, the EHR is searched by the identifier the target gets (after its
overrides), many at once (``identifier=s|v1,s|v2``, token search with OR,
https://hl7.org/fhir/R4/search.html#combining):

* ``missing``: the EHR has no resource with that identifier;
* ``different``: it has one whose elements we own differ; ``diff`` is the RFC 6902 patch
  from the EHR's resource to ours (:func:`mappers.ehrdiff.owned_diff`, the same
  comparison as shadow mode);
* ``ehr_only``: the EHR has a resource with one of our identifier systems that the
  gateway does not hold (paged search ``identifier=<system>|``).

The result is a summary (counts per kind and resource type) and one item per mismatch,
written as CSV or NDJSON. :func:`requeue` queues the mismatches for redelivery in one
step: a missing resource goes as a conditional create, a different one as an update of
the EHR's resource (its id is learnt from the search), each with its Patient, through the
outbox like any delivery.

Errors: an EHR that cannot be searched raises the EHR client's errors
(:mod:`gateway.ehr.errors`); nothing is half-recorded (the caller's transaction).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import Delivery, FhirResource, ImportStatus, ReconcileJob
from gateway.db.types import utcnow
from gateway.delivery import repository as delivery_repo
from gateway.delivery.outbox import deliverable_refs
from gateway.ehr.client import EhrClient
from gateway.ehr.errors import EhrUnavailableError
from gateway.fhir.repository import find_by_identifier
from gateway.logging import get_logger
from mappers.bundle import business_identifier, rest_calls
from mappers.ehr_overrides import received_types, target_transform
from mappers.ehrdiff import owned_diff
from mappers.normalize import to_fhir_instant
from mappers.profiles import ProfileSet
from mappers.profiles.ehr import EhrTargetProfile

log = get_logger(__name__)

#: Identifiers per search request (``identifier=a|1,a|2,...``).
SEARCH_BATCH = 40
#: Tries of one search before the reconciliation fails.
SEARCH_ATTEMPTS = 4
#: Resources read per page of the EHR-only search.
PAGE_SIZE = 200
#: Pages read per identifier system in the EHR-only search.
MAX_PAGES = 500

CSV_COLUMNS = ("kind", "resource_type", "resource", "identifier", "remote_id", "diff")


@dataclass
class Mismatch:
    """One difference between the gateway and the EHR (ids and the diff)."""

    kind: str  # missing | different | ehr_only
    resource_type: str
    identifier: str
    resource: str | None = None  # ours, Type/id
    remote_id: str | None = None
    diff: list[dict[str, Any]] | None = None
    patient_id: str | None = None
    message_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form (``patient_id`` and ``message_id`` kept for requeueing)."""
        return {
            "kind": self.kind,
            "resource_type": self.resource_type,
            "resource": self.resource,
            "identifier": self.identifier,
            "remote_id": self.remote_id,
            "diff": self.diff,
            "patient_id": self.patient_id,
            "message_id": self.message_id,
        }


@dataclass
class Report:
    """A reconciliation's outcome."""

    target: str
    since: datetime | None
    compared: int = 0
    matching: int = 0
    items: list[Mismatch] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts: compared, matching, and each kind of mismatch, in total and per type."""
        by_kind: dict[str, int] = {"missing": 0, "different": 0, "ehr_only": 0}
        by_type: dict[str, dict[str, int]] = {}
        for item in self.items:
            by_kind[item.kind] += 1
            per = by_type.setdefault(item.resource_type, {})
            per[item.kind] = per.get(item.kind, 0) + 1
        return {
            "target": self.target,
            "since": to_fhir_instant(self.since) if self.since else None,
            "compared": self.compared,
            "matching": self.matching,
            **by_kind,
            "mismatches": len(self.items),
            "by_resource_type": by_type,
        }


def _ident(system: str, value: str) -> str:
    return f"{system}|{value}"


def _q(value: str) -> str:
    return quote(value, safe=":/.-_~@")


async def _our_resources(
    session: AsyncSession, target: EhrTargetProfile, since: datetime | None
) -> list[FhirResource]:
    types = sorted(received_types(target) - {"Provenance"})
    stmt = select(FhirResource).where(FhirResource.resource_type.in_(types))
    if since is not None:
        stmt = stmt.where(FhirResource.updated_at >= since)
    return list((await session.scalars(stmt.order_by(FhirResource.resource_type))).all())


async def _held_systems(session: AsyncSession, target: EhrTargetProfile) -> dict[str, set[str]]:
    """The business-identifier systems of the gateway's resources of ``target``'s types,
    per type (all of them, whenever changed)."""
    types = sorted(received_types(target) - {"Provenance"})
    rows = await session.execute(
        select(FhirResource.resource_type, FhirResource.identifier_system)
        .where(FhirResource.resource_type.in_(types), FhirResource.identifier_system.is_not(None))
        .distinct()
    )
    systems: dict[str, set[str]] = {}
    for resource_type, system in rows:
        systems.setdefault(resource_type, set()).add(str(system))
    return systems


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def reconcile(
    session: AsyncSession,
    client: EhrClient,
    target: EhrTargetProfile,
    profiles: ProfileSet,
    *,
    provenance_tag_system: str,
    since: datetime | None = None,
) -> Report:
    """Compare the gateway's resources for ``target`` with the EHR's (see the module
    docstring). Reads only.

    Args:
        session: a read session.
        client: the target's client (its token).
        target: the target.
        profiles: the profile set (concept maps of the target's overrides).
        provenance_tag_system: the ``meta.tag`` system of our Provenance.
        since: only resources the gateway changed (and EHR resources updated) since then;
            an EHR resource updated since then that the gateway holds from before is not
            ``ehr_only``.

    Raises:
        EhrUnavailableError, EhrRejectedError, EhrConfigError: a search failed.
    """
    report = Report(target=target.name, since=since)
    transform = target_transform(target, profiles.concept_maps)
    ours = await _our_resources(session, target, since)
    # what the target gets of each resource, and the identifier it is found by
    wanted: dict[str, dict[str, tuple[FhirResource, dict[str, Any]]]] = {}
    systems: dict[str, set[str]] = {}
    for row in ours:
        [call] = rest_calls(
            [row.resource],
            remote_ids={},
            outside_identifiers={},
            provenance_tag_system=provenance_tag_system,
            transform=transform,
        )
        ident = business_identifier(call.resource)
        if ident is None:
            continue
        wanted.setdefault(row.resource_type, {})[_ident(*ident)] = (row, call.resource)
        systems.setdefault(row.resource_type, set()).add(ident[0])
    for resource_type, by_ident in wanted.items():
        keys = sorted(by_ident)
        for chunk in _chunks(keys, SEARCH_BATCH):
            query = "identifier=" + ",".join(
                f"{_q(k.split('|', 1)[0])}|{_q(k.split('|', 1)[1])}" for k in chunk
            )
            found = await _search(client, resource_type, f"{query}&_count={len(chunk) * 2}")
            theirs: dict[str, dict[str, Any]] = {}
            for resource in found:
                for key in _identifiers(resource):
                    theirs.setdefault(key, resource)
            for key in chunk:
                row, mine = by_ident[key]
                report.compared += 1
                remote = theirs.get(key)
                if remote is None:
                    report.items.append(
                        Mismatch(
                            "missing",
                            resource_type,
                            key,
                            f"{resource_type}/{row.id}",
                            patient_id=row.patient_id,
                            message_id=row.inbound_message_id,
                        )
                    )
                    continue
                diff = owned_diff(remote, mine)
                if not diff:
                    report.matching += 1
                    continue
                report.items.append(
                    Mismatch(
                        "different",
                        resource_type,
                        key,
                        f"{resource_type}/{row.id}",
                        str(remote.get("id")),
                        diff,
                        patient_id=row.patient_id,
                        message_id=row.inbound_message_id,
                    )
                )
    if since is not None:
        # ``ours`` holds only what changed since then; the EHR side is searched by every
        # identifier system of the target's types the gateway holds
        systems = await _held_systems(session, target)
    for resource_type, type_systems in sorted(systems.items()):
        known = set(wanted.get(resource_type, {}))
        for system in sorted(type_systems):
            query = f"identifier={_q(system)}|&_count={PAGE_SIZE}"
            if since is not None:
                query += f"&_lastUpdated=ge{_q(to_fhir_instant(since))}"
            async for resource in _pages(client, resource_type, query):
                idents = [i for i in _identifiers(resource) if i.startswith(f"{system}|")]
                if not idents or any(i in known for i in idents):
                    continue
                # With ``since``, ``known`` holds only what the gateway changed since
                # then: an EHR resource edited since then may be one of our older ones.
                if since is not None and any(
                    [
                        await find_by_identifier(session, resource_type, *i.split("|", 1))
                        for i in idents
                    ]
                ):
                    continue
                report.items.append(
                    Mismatch("ehr_only", resource_type, idents[0], None, str(resource.get("id")))
                )
    log.info(
        "reconcile.done", target=target.name, compared=report.compared, mismatches=len(report.items)
    )
    return report


async def _search(client: EhrClient, resource_type: str, query: str) -> list[dict[str, Any]]:
    """A search, tried again after a transient failure (timeout, 429, 5xx) up to
    :data:`SEARCH_ATTEMPTS` times with a growing pause: a long reconciliation should not
    stop at one slow answer."""
    attempt = 1
    while True:
        try:
            return await client.search(resource_type, query)
        except EhrUnavailableError as exc:
            if attempt >= SEARCH_ATTEMPTS:
                raise
            pause = exc.retry_after_s if exc.retry_after_s is not None else float(attempt)
            log.info("reconcile.search_retry", attempt=attempt, status_code=exc.status_code)
            await asyncio.sleep(min(pause, 30.0))
            attempt += 1


def _identifiers(resource: dict[str, Any]) -> list[str]:
    ident = resource.get("identifier")
    items = [ident] if isinstance(ident, dict) else (ident or [])
    return [
        _ident(str(i["system"]), str(i["value"]))
        for i in items
        if isinstance(i, dict) and i.get("system") and i.get("value")
    ]


async def _pages(
    client: EhrClient, resource_type: str, query: str
) -> AsyncIterator[dict[str, Any]]:
    """Every resource of a paged search (``Bundle.link`` ``next``), at most
    :data:`MAX_PAGES` pages."""
    bundle = await client.search_bundle(f"{client.base_url}/{resource_type}?{query}")
    for _ in range(MAX_PAGES):
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
                yield resource
        nxt = next(
            (
                link.get("url")
                for link in bundle.get("link") or []
                if link.get("relation") == "next"
            ),
            None,
        )
        if not nxt:
            return
        bundle = await client.search_bundle(str(nxt))


async def requeue(
    session: AsyncSession, target: EhrTargetProfile, items: Iterable[Mismatch], *, now: datetime
) -> list[Delivery]:
    """Queue the ``missing`` and ``different`` mismatches for redelivery to ``target``
    (flushes): one outbox row per inbound message (per patient when the message is not
    known) with its mismatched resources, its Patient first so references resolve. For a ``different`` one the EHR's id is recorded first (``remote_ids``), so
    it goes as an update of that resource, not as a conditional create the EHR would
    ignore. ``ehr_only`` items are for a person to look at: never deleted.

    Returns:
        The new outbox rows.
    """
    learned = []
    groups: dict[tuple[str, str | None], list[str]] = {}
    for item in items:
        if item.kind not in ("missing", "different") or not item.resource or not item.patient_id:
            continue
        resource_type, local_id = item.resource.split("/", 1)
        if item.kind == "different" and item.remote_id:
            learned.append(
                delivery_repo.RemoteIdRow(resource_type, local_id, item.remote_id, None, None)
            )
        groups.setdefault((item.patient_id, item.message_id), []).append(item.resource)
    order: dict[str, int] = {str(t): i for i, t in enumerate(target.send)}
    rows = []
    for (patient_id, message_id), refs in groups.items():
        patient_ref = f"Patient/{patient_id}"
        others = sorted(
            {r for r in refs if r != patient_ref}, key=lambda r: order.get(r.split("/")[0], 99)
        )
        row = Delivery(
            kind="ehr",
            target=target.name,
            ordering_key=patient_id,
            inbound_message_id=message_id,
            resource_refs=deliverable_refs(target, [patient_ref, *others]),
            available_at=now,
            created_at=now,
            source_received_at=now,
        )
        session.add(row)
        rows.append(row)
    await delivery_repo.save_remote_ids(session, target=target.name, rows=learned, now=now)
    await session.flush()
    log.info("reconcile.requeued", target=target.name, deliveries=len(rows))
    return rows


def to_ndjson(report: Report) -> str:
    """One JSON object per mismatch, then the summary (``{"summary": ...}``)."""
    lines = [json.dumps(i.as_dict(), separators=(",", ":")) for i in report.items]
    lines.append(json.dumps({"summary": report.summary()}, separators=(",", ":")))
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    """One CSV row per mismatch (``diff`` as compact JSON); the summary is separate."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for i in report.items:
        writer.writerow(
            [
                i.kind,
                i.resource_type,
                i.resource or "",
                i.identifier,
                i.remote_id or "",
                json.dumps(i.diff, separators=(",", ":")) if i.diff else "",
            ]
        )
    return out.getvalue()


# --------------------------------------------------------------------------- API jobs


#: A ``running`` job whose process showed no life for this long (seconds) is taken as
#: interrupted (a restart or a crash stopped it): shown ``failed``, to be started again.
STALE_AFTER_S = 120.0
#: How often a running job renews its heartbeat (seconds).
HEARTBEAT_S = 30.0
#: The ``error`` of a job whose process stopped.
INTERRUPTED = "interrupted: the process running it stopped; start the reconciliation again"


async def create_job(
    session: AsyncSession, *, target: str, since: datetime | None, runner: str | None = None
) -> str:
    """A new reconciliation job row run by ``runner`` (flushes); its id."""
    now = utcnow()
    job = ReconcileJob(
        id=str(uuid.uuid4()),
        target=target,
        since=since,
        status=ImportStatus.RUNNING,
        created_at=now,
        runner=runner,
        heartbeat_at=now,
    )
    session.add(job)
    await session.flush()
    return job.id


async def beat(session: AsyncSession, job_id: str) -> None:
    """Renew a running job's heartbeat (flushes)."""
    await session.execute(
        update(ReconcileJob)
        .where(ReconcileJob.id == job_id, ReconcileJob.status == ImportStatus.RUNNING)
        .values(heartbeat_at=utcnow())
    )


async def settle_interrupted(
    session: AsyncSession,
    *,
    now: datetime,
    stale_after_s: float = STALE_AFTER_S,
    runner: str | None = None,
) -> int:
    """Mark ``failed`` (:data:`INTERRUPTED`) the running jobs whose process stopped: those
    with no heartbeat for ``stale_after_s`` (a job from before heartbeats: since its
    creation), or, with ``runner``, every running job of that process (it is stopping).
    Flushes; returns how many."""
    stale = func.coalesce(ReconcileJob.heartbeat_at, ReconcileJob.created_at) < now - timedelta(
        seconds=stale_after_s
    )
    result = await session.execute(
        update(ReconcileJob)
        .where(
            ReconcileJob.status == ImportStatus.RUNNING,
            ReconcileJob.runner == runner if runner is not None else stale,
        )
        .values(status=ImportStatus.FAILED, finished_at=now, error=INTERRUPTED)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def finish_job(
    session: AsyncSession, job_id: str, *, report: Report | None, error: str | None = None
) -> None:
    """Record a job's outcome (flushes)."""
    await session.execute(
        update(ReconcileJob)
        .where(ReconcileJob.id == job_id)
        .values(
            status=ImportStatus.FAILED if report is None else ImportStatus.COMPLETED,
            summary=report.summary() if report else None,
            items=[i.as_dict() for i in report.items] if report else None,
            finished_at=utcnow(),
            error=error,
        )
    )


def report_of(job: ReconcileJob) -> Report:
    """The report a finished job recorded."""
    report = Report(target=job.target, since=job.since)
    summary = job.summary or {}
    report.compared, report.matching = summary.get("compared", 0), summary.get("matching", 0)
    report.items = [
        Mismatch(
            i["kind"],
            i["resource_type"],
            i["identifier"],
            i.get("resource"),
            i.get("remote_id"),
            i.get("diff"),
            i.get("patient_id"),
            i.get("message_id"),
        )
        for i in job.items or []
    ]
    return report


ClientFor = Callable[[EhrTargetProfile], EhrClient]
