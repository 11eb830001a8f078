"""Running a parsed FHIR search (:class:`mappers.search.SearchQuery`) on the local store,
and the Bundles it answers with (``searchset``, ``history``).

The database narrows the candidates (the resource type; the patient when a
``patient``/``subject`` reference names plain ids; ``_id``), then each criterion is
evaluated on the stored JSON by :mod:`mappers.search`, so every database answers alike.
The cost grows with the candidates of one type (or of one patient): fine for the
gateway's store, which keeps what it produced, not a clinical record.

What a client limited to programs may not see is left out before counting (it is not
counted in ``total`` either). Every search is audited (BALP query: one entry per
Patient whose data it returned, :func:`gateway.audit.service.record_patients`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit import service as audit
from gateway.clients.service import Principal
from gateway.fhir import repository as fhir_repo
from gateway.fhir.repository import StoredResource
from gateway.workflow.scoping import patient_visible
from mappers import search as fs

#: The resource types a searchset or $everything may hold for a client limited to
#: resource types (SMART ``system/<Type>.rs``) is checked by the caller; here, only rows.


@dataclass
class SearchResult:
    """A search's page: ``matches`` (the page's rows), ``total`` (all matches),
    ``included`` (rows added by ``_include``/``_revinclude``)."""

    matches: list[StoredResource]
    total: int
    included: list[StoredResource] = field(default_factory=list)


def _patient_ids(query: fs.SearchQuery) -> set[str] | None:
    """Plain Patient ids a ``patient``/``subject`` criterion (or Patient ``_id``) names:
    the candidates' ``patient_id`` must be one of them."""
    for c in query.criteria:
        if c.modifier not in (None, "Patient") or c.param.type not in ("reference", "token"):
            continue
        if c.param.name in ("patient", "subject") and c.param.targets == ("Patient",):
            ids = set()
            for v in c.values:
                ref = v.rsplit("/", 2)[-2:] if "/" in v else ["Patient", v]
                if ref[0] != "Patient" or "|" in ref[1]:
                    return None
                ids.add(ref[1])
            return ids
        if c.param.name == "_id" and query.resource_type == "Patient" and c.modifier is None:
            return {v for v in c.values if "|" not in v}
    return None


async def visible(
    session: AsyncSession, principal: Principal, rows: list[StoredResource]
) -> list[StoredResource]:
    """``rows`` the principal may see (all unless it is limited to programs): one look-up
    per patient, not per row."""
    if principal.programs is None:
        return rows
    seen: dict[str | None, bool] = {}
    out = []
    for row in rows:
        pid = row.patient_id
        if pid not in seen:
            seen[pid] = await patient_visible(session, principal, pid)
        if seen[pid]:
            out.append(row)
    return out


async def run_search(
    session: AsyncSession, query: fs.SearchQuery, *, principal: Principal, base_url: str
) -> SearchResult:
    """The page of ``query``: the matches sorted (``_sort``; default oldest update
    first), ``_count`` of them from ``_offset``, and what ``_include``/``_revinclude``
    add for that page.

    Args:
        base_url: this server's FHIR base (``<public base>/fhir``): absolute references
            on it compare as relative ones.
    """
    rows = await fhir_repo.resources_of_type(
        session, query.resource_type, patient_ids=_patient_ids(query)
    )
    found = [r for r in rows if fs.matches(query, r.resource, base_url=base_url)]
    found = await visible(session, principal, found)
    for key, desc in reversed(query.sort):
        if key == "_id":
            found.sort(key=lambda r: r.id, reverse=desc)
        else:
            found.sort(key=lambda r: (r.updated_at, r.id), reverse=desc)
    if query.summary == "count":
        return SearchResult([], len(found))
    page = found[query.offset : query.offset + query.count]
    included = await _included(session, query, page, principal)
    return SearchResult(page, len(found), included)


async def _included(
    session: AsyncSession,
    query: fs.SearchQuery,
    page: list[StoredResource],
    principal: Principal,
) -> list[StoredResource]:
    if not page or not (query.includes or query.revincludes):
        return []
    have = {(r.resource_type, r.id) for r in page}
    refs: list[str] = []
    for include in query.includes:
        for row in page:
            refs += fs.references(row.resource, include)
    wanted: dict[str, set[str]] = defaultdict(set)
    for ref in refs:
        rtype, rid = ref.split("/", 1)
        if (rtype, rid) not in have:
            wanted[rtype].add(rid)
    out: list[StoredResource] = []
    for rtype, ids in sorted(wanted.items()):
        out += await fhir_repo.resources_of_type(session, rtype, ids=ids)
    page_refs = {f"{r.resource_type}/{r.id}" for r in page}
    patients = {r.patient_id for r in page}
    for include in query.revincludes:
        candidates = await fhir_repo.resources_of_type(
            session,
            include.source,
            patient_ids=None if None in patients else {p for p in patients if p},
        )
        for row in candidates:
            if set(fs.references(row.resource, include)) & page_refs:
                out.append(row)
    unique: dict[tuple[str, str], StoredResource] = {}
    for row in out:
        key = (row.resource_type, row.id)
        if key not in have:
            unique.setdefault(key, row)
    return await visible(session, principal, list(unique.values()))


def searchset(
    query: fs.SearchQuery,
    result: SearchResult,
    *,
    base_url: str,
    path: str,
) -> dict[str, Any]:
    """The ``searchset`` Bundle (https://hl7.org/fhir/R4/bundle.html#searchset): ``total``,
    ``self``/``first``/``previous``/``next``/``last`` links built from the parsed query
    (ignored parameters left out), entries with ``search.mode`` ``match`` or
    ``include``; ``_elements``/``_summary=data`` subset the matches.

    Args:
        path: the search's URL path under the base (``Patient``,
            ``Patient/<id>/$everything``).
    """

    def link(relation: str, offset: int) -> dict[str, str]:
        return {
            "relation": relation,
            "url": f"{base_url}/{path}?{urlencode(query.params(offset=offset))}",
        }

    links = [link("self", query.offset)]
    if query.summary != "count" and query.count > 0:
        last = max(0, (result.total - 1) // query.count * query.count)
        links.append(link("first", 0))
        if query.offset > 0:
            links.append(link("previous", max(0, query.offset - query.count)))
        if query.offset + query.count < result.total:
            links.append(link("next", query.offset + query.count))
        links.append(link("last", last))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if query.total != "none":
        bundle["total"] = result.total
    bundle["link"] = links
    entries = [_entry(row, base_url, "match", query) for row in result.matches] + [
        _entry(row, base_url, "include", None) for row in result.included
    ]
    if entries:
        bundle["entry"] = entries
    return bundle


def _entry(
    row: StoredResource, base_url: str, mode: str, query: fs.SearchQuery | None
) -> dict[str, Any]:
    resource = row.resource
    if query is not None:
        resource = fs.subset(resource, elements=query.elements, summary=query.summary)
    return {
        "fullUrl": f"{base_url}/{row.resource_type}/{row.id}",
        "resource": resource,
        "search": {"mode": mode},
    }


def audit_search(
    session: AsyncSession, *, resource_type: str, query_text: str, result: SearchResult
) -> None:
    """Record the search (BALP query) with each Patient whose data it returned."""
    rows = result.matches + result.included
    audit.record_patients(
        session,
        action="search",
        entity_type=resource_type,
        hits=[(r.id, r.patient_id) for r in rows],
        query=query_text,
        detail={"total": result.total},
    )
