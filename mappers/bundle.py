"""Stored resources -> a FHIR transaction Bundle for one EHR, and reading its response.

Rules (https://hl7.org/fhir/R4/http.html#transaction):

* every entry has ``fullUrl = urn:uuid:<local id>`` (our local ids are UUIDs);
* a resource the EHR has not seen is ``POST`` with ``ifNoneExist`` on its business
  identifier (``identifier=<system>|<value>``; Provenance, which has no identifier in R4,
  on ``_tag=<system>|<code>``), so a replay creates nothing twice: one match answers
  200 and the POST is ignored;
* a resource the EHR already has (its id known from an earlier transaction-response) is
  ``PUT Type/<remote id>``, an update of the EHR's resource, not a new one;
* references to resources in the Bundle become their ``urn:uuid:`` fullUrl (the server
  substitutes its ids); references to resources outside it become the EHR's id when
  known, else a conditional reference ``Type?identifier=<system>|<value>`` (allowed in
  transactions), else they are dropped when optional (``supportingInformation``).
  Canonicals (``QuestionnaireResponse.questionnaire``) are never rewritten.

EHRs that accept only small transactions get several Bundles
(:func:`split_for_transaction`: dependency order, Patient first, each Bundle referring only
to resources of earlier Bundles, by the ids the EHR assigned); EHRs without transactions
get the same REST calls (:func:`rest_calls`) one at a time: a transaction Bundle is only
one rendering of that list (:func:`transaction_bundle`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

#: Elements whose references may be dropped when the target cannot resolve them.
OPTIONAL_REFERENCE_ELEMENTS = frozenset({"supportingInformation", "derivedFrom", "basedOn"})

_REF = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-\.]{1,64})$")


def business_identifier(resource: Mapping[str, Any]) -> tuple[str, str] | None:
    """The ``(system, value)`` the gateway deduplicates a resource on, or None.

    The first identifier with both system and value (``identifier`` is a single object on
    QuestionnaireResponse, a list elsewhere).
    """
    ident = resource.get("identifier")
    candidates = [ident] if isinstance(ident, dict) else (ident or [])
    for item in candidates:
        if isinstance(item, dict) and item.get("system") and item.get("value"):
            return str(item["system"]), str(item["value"])
    return None


def if_none_exist(resource: Mapping[str, Any], provenance_tag_system: str) -> str | None:
    """The ``ifNoneExist`` search (no ``?``, no type) for a resource, or None."""
    if resource.get("resourceType") == "Provenance":
        for tag in resource.get("meta", {}).get("tag", []):
            if tag.get("system") == provenance_tag_system:
                return f"_tag={_q(tag['system'])}|{_q(tag['code'])}"
        return None
    ident = business_identifier(resource)
    if ident is None:
        return None
    return identifier_search(*ident)


def identifier_search(system: str, value: str) -> str:
    """The token search for one business identifier, ``identifier=<system>|<value>``
    (https://hl7.org/fhir/R4/search.html#token), each part escaped for a query string.

    >>> identifier_search("urn:oid:1.2", "a b|c")
    'identifier=urn:oid:1.2|a%20b%7Cc'
    """
    return f"identifier={_q(system)}|{_q(value)}"


def _q(value: str) -> str:
    # Search values escape only what would break the query string.
    return quote(value, safe=":/.-_~@")


@dataclass(frozen=True)
class EntryInfo:
    """What the transaction-response told us about one entry."""

    resource_type: str
    local_id: str
    remote_id: str | None
    remote_version: str | None
    status: str
    status_code: int | None = None
    outcome: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        """The entry's status is a 4xx or 5xx (the EHR did not write it)."""
        return self.status_code is not None and self.status_code >= 400


@dataclass(frozen=True)
class RestCall:
    """One write of one stored resource to one EHR, as a FHIR REST interaction
    (https://hl7.org/fhir/R4/http.html#create, #update).

    The same call is an entry of a transaction Bundle (:func:`transaction_bundle`) or sent
    on its own (the ``individual`` write strategy): ``POST Type`` with an
    ``If-None-Exist`` header (``request.ifNoneExist`` in a Bundle) for a resource the EHR
    has not seen, ``PUT Type/<remote id>`` for one it has.

    Attributes:
        method: ``POST`` (create, conditional on ``if_none_exist`` when set) or ``PUT``.
        resource_type: the resource type.
        resource_id: the EHR's id (``PUT``), else None.
        if_none_exist: the conditional create's search (no ``?``, no type), or None.
        resource: the resource as the EHR gets it (references rewritten, transformed).
        local_ref: ``Type/<local id>`` of the stored resource it writes.
    """

    method: str
    resource_type: str
    resource_id: str | None
    if_none_exist: str | None
    resource: dict[str, Any]
    local_ref: str

    @property
    def full_url(self) -> str:
        """The entry's ``fullUrl`` in a transaction: ``urn:uuid:<local id>``."""
        return f"urn:uuid:{self.local_ref.split('/', 1)[1]}"

    def as_entry(self) -> dict[str, Any]:
        """The transaction Bundle entry of this call."""
        request: dict[str, Any] = {
            "method": self.method,
            "url": f"{self.resource_type}/{self.resource_id}"
            if self.method == "PUT"
            else self.resource_type,
        }
        if self.if_none_exist:
            request["ifNoneExist"] = self.if_none_exist
        return {"fullUrl": self.full_url, "resource": self.resource, "request": request}


def rest_calls(
    resources: list[dict[str, Any]],
    *,
    remote_ids: Mapping[str, str],
    outside_identifiers: Mapping[str, tuple[str, str]],
    provenance_tag_system: str,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[RestCall]:
    """The REST calls that write ``resources`` to one target: the one place a target's
    FHIR payload is built, whatever the write strategy.

    Args:
        resources: stored resources (local ids, local references ``Type/<id>``), in
            dependency order (Patient first).
        remote_ids: ``"Type/<local id>" -> "<remote id>"`` for resources this target
            already has.
        outside_identifiers: ``"Type/<local id>" -> (system, value)`` business identifiers
            of referenced resources that are not in ``resources``.
        provenance_tag_system: the ``meta.tag`` system used to deduplicate Provenance.
        transform: optional per-target rewrite applied to each resource copy last.

    Returns:
        One call per resource, in order. References to resources among ``resources``
        are their ``urn:uuid:`` fullUrls (resolved only inside one transaction: send the
        calls of one resource at a time otherwise). The inputs are not modified.
    """
    in_bundle = {f"{r['resourceType']}/{r['id']}" for r in resources}
    calls = []
    for stored in resources:
        local_ref = f"{stored['resourceType']}/{stored['id']}"
        resource = json.loads(json.dumps(stored))  # a deep copy of JSON data, ~3x faster
        resource.pop("id", None)
        meta = resource.get("meta")
        if meta:
            meta.pop("versionId", None)
            meta.pop("lastUpdated", None)
        _rewrite_references(resource, in_bundle, remote_ids, outside_identifiers)
        remote = remote_ids.get(local_ref)
        if transform is not None:
            resource = transform(resource)
        if remote is not None:
            resource["id"] = remote
            calls.append(RestCall("PUT", stored["resourceType"], remote, None, resource, local_ref))
        else:
            search = if_none_exist(stored, provenance_tag_system)
            calls.append(
                RestCall("POST", stored["resourceType"], None, search, resource, local_ref)
            )
    return calls


def transaction_bundle(calls: list[RestCall]) -> dict[str, Any]:
    """A ``transaction`` Bundle (R4 JSON) of ``calls``
    (https://hl7.org/fhir/R4/http.html#transaction), entries in the same order."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": [c.as_entry() for c in calls]}


def build_transaction_bundle(
    resources: list[dict[str, Any]],
    *,
    remote_ids: Mapping[str, str],
    outside_identifiers: Mapping[str, tuple[str, str]],
    provenance_tag_system: str,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """:func:`transaction_bundle` of :func:`rest_calls` (same arguments): the Bundle that
    writes ``resources`` to one target. The inputs are not modified."""
    return transaction_bundle(
        rest_calls(
            resources,
            remote_ids=remote_ids,
            outside_identifiers=outside_identifiers,
            provenance_tag_system=provenance_tag_system,
            transform=transform,
        )
    )


def _rewrite_references(
    node: Any,
    in_bundle: set[str],
    remote_ids: Mapping[str, str],
    outside: Mapping[str, tuple[str, str]],
) -> None:
    if isinstance(node, list):
        for child in node:
            _rewrite_references(child, in_bundle, remote_ids, outside)
        return
    if not isinstance(node, dict):
        return
    for key in list(node):
        value = node[key]
        if key == "reference" and isinstance(value, str) and _REF.match(value):
            if value in in_bundle:
                node[key] = f"urn:uuid:{value.split('/', 1)[1]}"
            elif value in remote_ids:
                node[key] = f"{value.split('/', 1)[0]}/{remote_ids[value]}"
            elif value in outside:
                system, ident = outside[value]
                node[key] = f"{value.split('/', 1)[0]}?{identifier_search(system, ident)}"
            continue
        if key in OPTIONAL_REFERENCE_ELEMENTS and isinstance(value, list):
            # Drop what the target cannot resolve before rewriting what it can.
            value = [v for v in value if not _unresolved(v, in_bundle, remote_ids, outside)]
            if not value:
                del node[key]
                continue
            node[key] = value
        if isinstance(value, dict | list):
            _rewrite_references(value, in_bundle, remote_ids, outside)


def _unresolved(
    ref: Any,
    in_bundle: set[str],
    remote_ids: Mapping[str, str],
    outside: Mapping[str, tuple[str, str]],
) -> bool:
    value = ref.get("reference") if isinstance(ref, dict) else None
    return (
        isinstance(value, str)
        and bool(_REF.match(value))
        and value not in in_bundle
        and value not in remote_ids
        and value not in outside
    )


def local_references(resource: Mapping[str, Any]) -> set[str]:
    """Every local ``Type/id`` reference in ``resource`` (conditional ones excluded)."""
    found: set[str] = set()
    _collect_references(resource, found)
    return found


def _collect_references(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and _REF.match(value):
                out.add(value)
            elif isinstance(value, dict | list):
                _collect_references(value, out)
    elif isinstance(node, list):
        for child in node:
            _collect_references(child, out)


def dependency_order(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``resources`` sorted so that each comes after the resources it references.

    Patients first; otherwise the given order is kept where references allow (a stable
    topological sort). A reference cycle (not produced by our mappers) keeps the given
    order for the resources in it.

    >>> [r["resourceType"] for r in dependency_order([
    ...     {"resourceType": "Provenance", "id": "v",
    ...      "target": [{"reference": "Patient/p"}, {"reference": "QuestionnaireResponse/q"}]},
    ...     {"resourceType": "QuestionnaireResponse", "id": "q",
    ...      "subject": {"reference": "Patient/p"}},
    ...     {"resourceType": "Patient", "id": "p"}])]
    ['Patient', 'QuestionnaireResponse', 'Provenance']
    """
    refs = [f"{r['resourceType']}/{r['id']}" for r in resources]
    index = {ref: i for i, ref in enumerate(refs)}
    needs = [
        {index[d] for d in local_references(r) if d in index and index[d] != i}
        for i, r in enumerate(resources)
    ]
    start = sorted(
        range(len(resources)), key=lambda i: (resources[i]["resourceType"] != "Patient", i)
    )
    placed: list[int] = []
    done: set[int] = set()
    while len(placed) < len(resources):
        ready = [i for i in start if i not in done and needs[i] <= done]
        if not ready:  # a cycle: take the first remaining one as given
            ready = [next(i for i in start if i not in done)]
        placed.append(ready[0])
        done.add(ready[0])
    return [resources[i] for i in placed]


def split_for_transaction(
    resources: list[dict[str, Any]], max_entries: int | None
) -> list[list[dict[str, Any]]]:
    """Split ``resources`` into transaction Bundles of at most ``max_entries`` entries.

    In dependency order (:func:`dependency_order`, Patient first), cut into consecutive
    chunks, so a resource only refers to resources of its own or an earlier chunk; the
    sender learns the EHR's ids from each transaction-response before building the next.
    One chunk, in the given order (a transaction's result does not depend on entry
    order), when ``max_entries`` is None or not smaller than the number of resources; no
    chunk for no resources.
    """
    if not resources:
        return []
    if max_entries is None or len(resources) <= max_entries:
        return [list(resources)]
    ordered = dependency_order(resources)
    return [ordered[i : i + max_entries] for i in range(0, len(ordered), max_entries)]


def parse_transaction_response(
    bundle: Mapping[str, Any], sent: list[dict[str, Any]]
) -> list[EntryInfo]:
    """Pair a ``transaction-response`` with the resources sent, entry by entry.

    The response has one entry per request entry, in the same order
    (https://hl7.org/fhir/R4/http.html#transaction-response). ``response.location`` is
    ``Type/<id>[/_history/<vid>]``, absolute or relative; ``response.status`` starts with
    the HTTP code (``"201 Created"`` or ``"201"``). A ``batch-response`` is read the same
    way: some servers process a transaction entry by entry and answer 200 with a failed
    entry's 4xx status and ``response.outcome`` in it (:attr:`EntryInfo.failed`).

    Raises:
        ValueError: the response is not a transaction- or batch-response with matching
            entries.
    """
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in (
        "transaction-response",
        "batch-response",
    ):
        raise ValueError("not a transaction-response Bundle")
    entries = bundle.get("entry") or []
    if len(entries) != len(sent):
        raise ValueError("transaction-response entry count differs from the request")
    out = []
    for stored, entry in zip(sent, entries, strict=True):
        response = _object(entry, "response")
        returned = _object(entry, "resource")
        status = str(response.get("status", ""))
        code_match = _STATUS.match(status)
        status_code = int(code_match.group(1)) if code_match else None
        outcome = response.get("outcome")
        if not (isinstance(outcome, Mapping) and outcome.get("resourceType") == "OperationOutcome"):
            outcome = returned if returned.get("resourceType") == "OperationOutcome" else None
        remote_id, version = parse_location(response.get("location"), stored["resourceType"])
        if remote_id is None and returned.get("resourceType") == stored["resourceType"]:
            remote_id = returned.get("id")
            version = (returned.get("meta") or {}).get("versionId")
        if version is None and isinstance(response.get("etag"), str):
            version = response["etag"].removeprefix("W/").strip('"')
        failed = status_code is not None and status_code >= 400
        out.append(
            EntryInfo(
                resource_type=stored["resourceType"],
                local_id=stored["id"],
                remote_id=None if failed else remote_id,
                remote_version=None if failed else version,
                status=status,
                status_code=status_code,
                outcome=dict(outcome) if outcome is not None else None,
            )
        )
    return out


def _object(entry: Any, name: str) -> Mapping[str, Any]:
    """``entry[name]`` when it is a JSON object, else an empty one."""
    value = entry.get(name) if isinstance(entry, Mapping) else None
    return value if isinstance(value, Mapping) else {}


_STATUS = re.compile(r"^\s*(\d{3})\b")
_LOCATION = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-\.]{1,64})(?:/_history/([A-Za-z0-9\-\.]{1,64}))?/?$"
)


def parse_location(location: Any, resource_type: str) -> tuple[str | None, str | None]:
    """``[base/]Type/id[/_history/vid]`` -> ``(id, vid)``; ``(None, None)`` if unusable."""
    if not isinstance(location, str):
        return None, None
    m = _LOCATION.search(location.split("?", 1)[0])
    if not m or m.group(1) != resource_type:
        return None, None
    return m.group(2), m.group(3)
