"""In-memory FHIR R4 repository behind the fake EHR, independent of any web framework.

It implements the REST semantics an EHR's FHIR server has (HAPI-like), following the R4
normative http.html (https://hl7.org/fhir/R4/http.html):

- create, with conditional create (``If-None-Exist`` / ``Bundle.entry.request.ifNoneExist``):
  0 matches create (201), 1 match returns the existing resource untouched (200), 2+ fail (412);
- update by id (update or create-with-id, ``If-Match`` version check, 412 on mismatch) and
  conditional update ``PUT Type?identifier=sys|val`` (0 create, 1 update, 2+ 412);
- read, vread and search on ``identifier``, ``_tag`` and ``_id`` (token searches, dict indexes);
- transactions (https://hl7.org/fhir/R4/http.html#trules): all-or-nothing, POST before PUT
  before GET, ``urn:uuid:``/fullUrl references rewritten to the assigned ``Type/id`` (and to the
  existing resource when ``ifNoneExist`` matched), conditional references ``Type?query``,
  referential integrity of ``Type/id`` references; a failure stores nothing and is one
  OperationOutcome;
- batches: every entry on its own, failures reported per entry in a ``batch-response``.

Every incoming resource is validated with ``fhir.resources.R4B`` (optional) and resource types
that R4 (4.0.1) does not have are rejected even though R4B knows them.

Errors: every failure is an ``OperationOutcomeError`` carrying the HTTP status and the
OperationOutcome issues. Diagnostics name elements and ids, never the submitted values.
"""

from __future__ import annotations

import copy
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qsl

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource as R4BResource
from pydantic import ValidationError

JsonObject = dict[str, Any]
ResourcePredicate = Callable[[JsonObject], bool]
"""A test rule: gets an incoming resource (as sent), returns True to reject it."""

#: Resource types that ``fhir.resources.R4B`` (FHIR 4.3) knows but FHIR R4 (4.0.1) does not.
R4B_ONLY_RESOURCE_TYPES: Final = frozenset(
    {
        "AdministrableProductDefinition",
        "Citation",
        "ClinicalUseDefinition",
        "EvidenceReport",
        "Ingredient",
        "ManufacturedItemDefinition",
        "MedicinalProductDefinition",
        "NutritionProduct",
        "PackagedProductDefinition",
        "RegulatedAuthorization",
        "SubscriptionStatus",
        "SubscriptionTopic",
    }
)
_ABSTRACT_RESOURCE_TYPES: Final = frozenset({"Resource", "DomainResource"})

_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_RE: Final = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_RELATIVE_REFERENCE_RE: Final = re.compile(
    r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]{1,64}))?$"
)
_ABSOLUTE_URL_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_ETAG_RE: Final = re.compile(r'^(?:W/)?"?([0-9]+)"?$')
_UNESCAPED_COMMA_RE: Final = re.compile(r"(?<!\\),")
_UNESCAPED_PIPE_RE: Final = re.compile(r"(?<!\\)\|")

#: Token search parameters this server indexes.
_TOKEN_PARAMETERS: Final = ("identifier", "_tag")
#: Search result parameters that are accepted (``_count``) or harmlessly ignored.
_IGNORED_SEARCH_PARAMETERS: Final = frozenset({"_format", "_pretty", "_total", "_summary"})
_MAX_VALIDATION_ISSUES: Final = 20


class OperationOutcomeError(Exception):
    """A FHIR interaction failed: HTTP status plus the OperationOutcome issues to return."""

    def __init__(self, status: int, issues: list[JsonObject]) -> None:
        super().__init__(f"{status}: {issues[0].get('diagnostics', issues[0]['code'])}")
        self.status = status
        self.issues = issues

    @classmethod
    def of(
        cls,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: str | None = None,
    ) -> OperationOutcomeError:
        """Build an error with a single issue."""
        return cls(status, [issue(code, diagnostics, expression=expression)])

    @property
    def outcome(self) -> JsonObject:
        """The OperationOutcome resource for this error."""
        return {"resourceType": "OperationOutcome", "issue": self.issues}

    def in_entry(self, index: int) -> OperationOutcomeError:
        """The same error, with diagnostics and expressions placed in ``Bundle.entry[index]``."""
        prefix = f"Bundle.entry[{index}]"
        issues = []
        for item in self.issues:
            item = dict(item)
            item["diagnostics"] = f"{prefix}: {item.get('diagnostics', '')}".rstrip(": ")
            if "expression" in item:
                item["expression"] = [
                    e if e.startswith("Bundle.") else f"{prefix}.{e}" for e in item["expression"]
                ]
            issues.append(item)
        return OperationOutcomeError(self.status, issues)


def issue(
    code: str,
    diagnostics: str,
    *,
    severity: str = "error",
    expression: str | None = None,
) -> JsonObject:
    """One ``OperationOutcome.issue`` (code from http://hl7.org/fhir/issue-type)."""
    item: JsonObject = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        item["expression"] = [expression]
    return item


def operation_outcome(code: str, diagnostics: str, *, severity: str = "error") -> JsonObject:
    """A one-issue OperationOutcome resource."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [issue(code, diagnostics, severity=severity)],
    }


def status_line(status: int) -> str:
    """``Bundle.entry.response.status`` text, e.g. ``201 Created``."""
    return f"{status} {HTTPStatus(status).phrase}"


def etag(version: str) -> str:
    """Weak ETag for a version id: ``W/"3"``."""
    return f'W/"{version}"'


def parse_if_match(value: str) -> int:
    """Version from an ``If-Match`` value (``W/"3"``); 400 when it is not one."""
    match = _ETAG_RE.match(value.strip())
    if match is None:
        raise OperationOutcomeError.of(400, "invalid", 'If-Match must look like W/"<versionId>"')
    return int(match.group(1))


@dataclass(frozen=True)
class RejectRule:
    """A persistent test rule: reject any resource for which ``predicate`` is true."""

    predicate: ResourcePredicate
    status: int
    outcome: JsonObject


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class _Token:
    """One token search value: ``system|code``, ``code``, ``|code`` or ``system|``."""

    any_system: bool
    system: str | None
    code: str | None

    def matches(self, system: str | None, code: str | None) -> bool:
        if not self.any_system and self.system != system:
            return False
        return self.code is None or self.code == code


@dataclass(frozen=True)
class SearchQuery:
    """A parsed search: AND over parameters, OR over the comma-separated values of each."""

    parameters: tuple[tuple[str, tuple[_Token, ...]], ...]
    count: int | None = None
    summary_count: bool = False

    @property
    def is_empty(self) -> bool:
        return not self.parameters


def _unescape(value: str) -> str:
    return value.replace("\\,", ",").replace("\\|", "|").replace("\\$", "$").replace("\\\\", "\\")


def _parse_token(raw: str, *, name: str) -> _Token:
    parts = _UNESCAPED_PIPE_RE.split(raw, maxsplit=1)
    if len(parts) == 1:
        code = _unescape(parts[0])
        if not code:
            raise OperationOutcomeError.of(
                400, "invalid", f"Empty value for search parameter {name}"
            )
        return _Token(any_system=True, system=None, code=code)
    system, code = (_unescape(p) for p in parts)
    if not system and not code:
        raise OperationOutcomeError.of(400, "invalid", f"Empty value for search parameter {name}")
    return _Token(any_system=False, system=system or None, code=code or None)


def parse_search(pairs: Iterable[tuple[str, str]], *, expression: str | None = None) -> SearchQuery:
    """Parse search parameters (already URL-decoded name/value pairs).

    Supports ``identifier`` and ``_tag`` (token: ``sys|val``, ``val``, ``|val``, ``sys|``),
    ``_id``, ``_count`` and ``_summary=count``; ``_format``, ``_pretty`` and ``_total`` are
    ignored. Anything else is a 400, as HAPI answers for an unknown search parameter.
    """
    parameters: list[tuple[str, tuple[_Token, ...]]] = []
    count: int | None = None
    summary_count = False
    for name, value in pairs:
        if name in _TOKEN_PARAMETERS:
            alternatives = tuple(
                _parse_token(v, name=name) for v in _UNESCAPED_COMMA_RE.split(value)
            )
            parameters.append((name, alternatives))
        elif name == "_id":
            ids = tuple(_Token(any_system=True, system=None, code=v) for v in value.split(",") if v)
            if not ids:
                raise OperationOutcomeError.of(400, "invalid", "Empty value for _id")
            parameters.append(("_id", ids))
        elif name == "_count":
            if not value.isdigit():
                raise OperationOutcomeError.of(
                    400, "invalid", "_count must be a non-negative integer", expression=expression
                )
            count = int(value)
        elif name == "_summary" and value == "count":
            summary_count = True
        elif name in _IGNORED_SEARCH_PARAMETERS:
            continue
        else:
            raise OperationOutcomeError.of(
                400,
                "not-supported",
                f"Unknown search parameter '{name}' (supported: identifier, _tag, _id, _count)",
                expression=expression,
            )
    return SearchQuery(tuple(parameters), count, summary_count)


def parse_search_string(query: str, *, expression: str | None = None) -> SearchQuery:
    """Parse a query string such as ``identifier=sys|val&_tag=sys|code``."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise OperationOutcomeError.of(
            400, "invalid", "Malformed search parameters", expression=expression
        ) from exc
    return parse_search(pairs, expression=expression)


def _tokens(resource: Mapping[str, Any], parameter: str) -> Iterator[tuple[str | None, str]]:
    """(system, code) pairs of ``Resource.identifier`` (list or single) or ``Resource.meta.tag``."""
    if parameter == "identifier":
        values: Any = resource.get("identifier")
        code_key = "value"
    else:
        meta = resource.get("meta")
        values = meta.get("tag") if isinstance(meta, dict) else None
        code_key = "code"
    if isinstance(values, dict):
        values = [values]
    if not isinstance(values, list):
        return
    for item in values:
        if isinstance(item, dict) and isinstance(item.get(code_key), str):
            system = item.get("system")
            yield (system if isinstance(system, str) else None, item[code_key])


def _matches(resource: Mapping[str, Any], query: SearchQuery) -> bool:
    for name, alternatives in query.parameters:
        if name == "_id":
            if not any(t.code == resource.get("id") for t in alternatives):
                return False
            continue
        pairs = list(_tokens(resource, name))
        if not any(t.matches(s, c) for t in alternatives for s, c in pairs):
            return False
    return True


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class InteractionResult:
    """Result of one interaction (REST call or bundle entry)."""

    status: int
    resource: JsonObject | None
    """The resource (current version), a searchset Bundle, or None."""
    resource_type: str | None = None
    resource_id: str | None = None
    version: str | None = None
    is_read: bool = False
    """True for read and search results, whose body is always returned."""

    @property
    def location(self) -> str | None:
        """``Type/id/_history/vid`` of the resource written or matched."""
        if self.resource_id is None or self.version is None:
            return None
        return f"{self.resource_type}/{self.resource_id}/_history/{self.version}"

    @property
    def etag(self) -> str | None:
        return None if self.version is None else etag(self.version)

    @property
    def last_updated(self) -> str | None:
        """``meta.lastUpdated`` of the resource (a FHIR instant)."""
        if self.version is None or self.resource is None:
            return None
        value = self.resource.get("meta", {}).get("lastUpdated")
        return value if isinstance(value, str) else None

    def response_entry(self, *, include_resource: bool) -> JsonObject:
        """A ``transaction-response``/``batch-response`` entry."""
        response: JsonObject = {"status": status_line(self.status)}
        if self.location is not None:
            response["location"] = self.location
            response["etag"] = self.etag
            if self.last_updated is not None:
                response["lastModified"] = self.last_updated
        entry: JsonObject = {"response": response}
        if self.resource is not None and (include_resource or self.is_read):
            entry["resource"] = self.resource
        return entry


@dataclass
class _Entry:
    """A parsed ``Bundle.entry``."""

    index: int
    method: str
    resource_type: str
    resource_id: str | None = None
    history_version: str | None = None
    query: SearchQuery | None = None
    resource: JsonObject | None = None
    full_url: str | None = None
    if_none_exist: SearchQuery | None = None
    if_match: int | None = None


_METHOD_ORDER: Final = {"POST": 0, "PUT": 1, "GET": 2}


def _now_instant() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iter_references(node: Any) -> Iterator[JsonObject]:
    """Every object in ``node`` that has a string ``reference`` (i.e. each Reference)."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node
        for value in node.values():
            if isinstance(value, dict | list):
                yield from _iter_references(value)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict | list):
                yield from _iter_references(value)


def _validation_expression(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) and part != "root":
            path += f".{part}"
    return path


# --------------------------------------------------------------------------- store


class FhirStore:
    """Thread-safe in-memory FHIR repository (current versions plus history, token indexes).

    Args:
        validate: validate every incoming resource with ``fhir.resources.R4B``.
        referential_integrity: reject a relative reference ``Type/id`` to a resource that does
            not exist (HAPI's default); references to other servers are not checked.
    """

    def __init__(self, *, validate: bool = True, referential_integrity: bool = True) -> None:
        self.validate = validate
        self.referential_integrity = referential_integrity
        self.rules: list[RejectRule] = []
        self._lock = threading.Lock()
        self._history: dict[tuple[str, str], list[JsonObject]] = {}
        self._ids_by_type: dict[str, dict[str, None]] = {}  # ordered set per type
        # (parameter, type, system, code) -> ids and (parameter, type, code) -> ids
        self._index: dict[tuple[str, str, str | None, str], set[str]] = {}
        self._code_index: dict[tuple[str, str, str], set[str]] = {}
        self._sequence: dict[tuple[str, str], int] = {}
        self._next_id = 1

    # ------------------------------------------------------------------ test access

    def clear(self) -> None:
        """Drop every resource and index."""
        with self._lock:
            self._history.clear()
            self._ids_by_type.clear()
            self._index.clear()
            self._code_index.clear()
            self._sequence.clear()

    def resources(self, resource_type: str) -> list[JsonObject]:
        """Copies of the current versions of every resource of a type, oldest first."""
        with self._lock:
            ids = list(self._ids_by_type.get(resource_type, ()))
            return [copy.deepcopy(self._history[(resource_type, i)][-1]) for i in ids]

    def count(self, resource_type: str) -> int:
        with self._lock:
            return len(self._ids_by_type.get(resource_type, ()))

    def get(self, resource_type: str, resource_id: str) -> JsonObject | None:
        """Copy of the current version, or None."""
        with self._lock:
            versions = self._history.get((resource_type, resource_id))
            return copy.deepcopy(versions[-1]) if versions else None

    def find(self, resource_type: str, system: str | None, value: str) -> list[JsonObject]:
        """Copies of the resources having ``identifier`` ``system|value`` (None: no system)."""
        query = SearchQuery(
            (("identifier", (_Token(any_system=False, system=system, code=value),)),)
        )
        with self._lock:
            ids = self._search_committed(resource_type, query)
            return [copy.deepcopy(self._history[(resource_type, i)][-1]) for i in ids]

    # ------------------------------------------------------------------ validation

    def check_resource_type(self, resource_type: str, *, expression: str | None = None) -> None:
        """400/404-free check that ``resource_type`` is an R4 resource type; raises 400."""
        if resource_type in R4B_ONLY_RESOURCE_TYPES or resource_type in _ABSTRACT_RESOURCE_TYPES:
            raise OperationOutcomeError.of(
                400,
                "not-supported",
                f"Resource type {resource_type} is not supported by this FHIR R4 server",
                expression=expression,
            )
        if not _TYPE_RE.match(resource_type):
            raise OperationOutcomeError.of(
                400, "not-supported", "Unknown resource type", expression=expression
            )
        try:
            model = get_fhir_model_class(resource_type)
        except (KeyError, ValueError) as exc:
            raise OperationOutcomeError.of(
                400,
                "not-supported",
                f"Unknown resource type {resource_type}",
                expression=expression,
            ) from exc
        if not issubclass(model, R4BResource):
            raise OperationOutcomeError.of(
                400,
                "not-supported",
                f"{resource_type} is a data type, not a resource",
                expression=expression,
            )

    def check_resource(
        self, resource: Any, *, expression: str | None = None, apply_rules: bool = True
    ) -> str:
        """Validate an incoming resource and apply the reject rules; returns its type.

        Raises:
            OperationOutcomeError: 400 ``invalid`` (structure, with one issue per error and the
                element path in ``expression``), 400 ``not-supported`` (type not in R4), or the
                status of a matching ``RejectRule``.
        """
        if not isinstance(resource, dict):
            raise OperationOutcomeError.of(
                400, "structure", "A resource must be a JSON object", expression=expression
            )
        resource_type = resource.get("resourceType")
        if not isinstance(resource_type, str):
            raise OperationOutcomeError.of(
                400, "structure", "Missing resourceType", expression=expression
            )
        self.check_resource_type(resource_type, expression=expression)
        if self.validate:
            model = get_fhir_model_class(resource_type)
            try:
                model.model_validate(resource)
            except ValidationError as exc:
                prefix = expression or resource_type
                errors = exc.errors(include_input=False, include_url=False, include_context=False)
                raise OperationOutcomeError(
                    400,
                    [
                        issue(
                            "invalid",
                            f"{resource_type}: {err['msg']}",
                            expression=_validation_expression(prefix, tuple(err["loc"])),
                        )
                        for err in errors[:_MAX_VALIDATION_ISSUES]
                    ],
                ) from exc
        for rule in tuple(self.rules) if apply_rules else ():
            if rule.predicate(resource):
                issues = rule.outcome.get("issue")
                raise OperationOutcomeError(
                    rule.status,
                    list(issues)
                    if isinstance(issues, list) and issues
                    else [issue("processing", "Rejected by a rule of the test EHR")],
                )
        return resource_type

    def check_bundle_envelope(self, bundle: JsonObject) -> None:
        """Validate a Bundle without its entries' resources (checked one by one instead)."""
        if not self.validate:
            return
        entries = bundle.get("entry")
        stripped = dict(bundle)
        if isinstance(entries, list):
            stripped["entry"] = [
                {k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
                for e in entries
            ]
        try:
            get_fhir_model_class("Bundle").model_validate(stripped)
        except ValidationError as exc:
            errors = exc.errors(include_input=False, include_url=False, include_context=False)
            raise OperationOutcomeError(
                400,
                [
                    issue(
                        "invalid",
                        f"Bundle: {err['msg']}",
                        expression=_validation_expression("Bundle", tuple(err["loc"])),
                    )
                    for err in errors[:_MAX_VALIDATION_ISSUES]
                ],
            ) from exc

    # ------------------------------------------------------------------ REST interactions

    def create(
        self, resource: JsonObject, *, if_none_exist: SearchQuery | None = None
    ) -> InteractionResult:
        """``POST [base]/Type`` (resource already checked). Any ``id`` in the body is ignored."""
        with self._lock:
            work = _UnitOfWork(self)
            result = work.create(resource, if_none_exist=if_none_exist)
            work.resolve_references({})
            work.commit()
            return result

    def update(
        self,
        resource_type: str,
        resource_id: str,
        resource: JsonObject,
        *,
        if_match: int | None = None,
    ) -> InteractionResult:
        """``PUT [base]/Type/id``: update, or create with that id (resource already checked)."""
        with self._lock:
            work = _UnitOfWork(self)
            result = work.update(resource_type, resource_id, resource, if_match=if_match)
            work.resolve_references({})
            work.commit()
            return result

    def conditional_update(
        self, resource_type: str, query: SearchQuery, resource: JsonObject
    ) -> InteractionResult:
        """``PUT [base]/Type?search``: 0 matches create, 1 updates, 2+ is a 412."""
        with self._lock:
            work = _UnitOfWork(self)
            result = work.conditional_update(resource_type, query, resource)
            work.resolve_references({})
            work.commit()
            return result

    def read(
        self, resource_type: str, resource_id: str, *, version: str | None = None
    ) -> InteractionResult:
        """``GET [base]/Type/id[/_history/vid]``; 404 when absent."""
        with self._lock:
            return _UnitOfWork(self).read(resource_type, resource_id, version)

    def search(self, resource_type: str, query: SearchQuery, *, base_url: str) -> JsonObject:
        """``GET [base]/Type?search``: a searchset Bundle."""
        with self._lock:
            return _UnitOfWork(self).search(resource_type, query, base_url=base_url)

    # ------------------------------------------------------------------ bundles

    def process_bundle(
        self, bundle: Any, *, base_url: str, return_resources: bool = False
    ) -> JsonObject:
        """``POST [base]`` with a transaction or batch Bundle; returns the response Bundle.

        Args:
            bundle: the parsed request body.
            base_url: the FHIR base the client used (for absolute URLs in responses).
            return_resources: include each written resource in its response entry
                (``Prefer: return=representation``).

        Raises:
            OperationOutcomeError: 400 when the body is not a transaction or batch Bundle or
                the envelope is invalid; for a transaction, the first failing entry's error.
        """
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise OperationOutcomeError.of(
                400, "invalid", "POST [base] expects a Bundle of type transaction or batch"
            )
        bundle_type = bundle.get("type")
        if bundle_type not in ("transaction", "batch"):
            raise OperationOutcomeError.of(
                400,
                "invalid",
                "Bundle.type must be transaction or batch",
                expression="Bundle.type",
            )
        self.check_bundle_envelope(bundle)
        if bundle_type == "transaction":
            return self.transaction(bundle, base_url=base_url, return_resources=return_resources)
        return self.batch(bundle, base_url=base_url, return_resources=return_resources)

    def transaction(
        self, bundle: JsonObject, *, base_url: str, return_resources: bool = False
    ) -> JsonObject:
        """Process a ``transaction`` Bundle all-or-nothing; returns the transaction-response.

        Order per R4 http.html#trules: POST, then PUT, then GET; references are rewritten
        once every id is known. The response lists the entries in request order.

        Raises:
            OperationOutcomeError: the first failing entry's error (with ``Bundle.entry[i]`` in
                its diagnostics); nothing is stored.
        """
        entries: list[_Entry] = []
        for parsed in self._parse_entries(bundle, base_url=base_url):
            if isinstance(parsed, OperationOutcomeError):
                raise parsed
            entries.append(parsed)
        for entry in entries:
            if entry.resource is not None:
                try:
                    self.check_resource(
                        entry.resource, expression=f"Bundle.entry[{entry.index}].resource"
                    )
                except OperationOutcomeError as exc:
                    raise exc.in_entry(entry.index) from exc
        results: list[InteractionResult | None] = [None] * len(entries)
        with self._lock:
            work = _UnitOfWork(self)
            placeholders: dict[str, str] = {}
            for entry in sorted(entries, key=lambda e: (_METHOD_ORDER[e.method], e.index)):
                if entry.method == "GET":
                    continue
                try:
                    result = work.apply(entry)
                except OperationOutcomeError as exc:
                    raise exc.in_entry(entry.index) from exc
                results[entry.index] = result
                if entry.full_url and result.resource_id is not None:
                    placeholders[entry.full_url] = f"{result.resource_type}/{result.resource_id}"
            work.resolve_references(placeholders)
            for entry in entries:
                if entry.method == "GET":
                    try:
                        results[entry.index] = work.apply(entry, base_url=base_url)
                    except OperationOutcomeError as exc:
                        raise exc.in_entry(entry.index) from exc
            work.commit()
        return self._response_bundle(
            "transaction-response",
            [r.response_entry(include_resource=return_resources) for r in results if r],
        )

    def batch(
        self, bundle: JsonObject, *, base_url: str, return_resources: bool = False
    ) -> JsonObject:
        """Process a ``batch`` Bundle entry by entry; returns the batch-response.

        Each entry succeeds or fails on its own; a failed entry's response carries its status
        and an OperationOutcome. Entries may not reference each other (``urn:uuid:`` fails).
        """
        response_entries: list[JsonObject] = []
        for parsed in self._parse_entries(bundle, base_url=base_url):
            try:
                if isinstance(parsed, OperationOutcomeError):
                    raise parsed
                if parsed.resource is not None:
                    self.check_resource(parsed.resource)
                with self._lock:
                    work = _UnitOfWork(self)
                    result = work.apply(parsed, base_url=base_url)
                    work.resolve_references({})
                    work.commit()
                response_entries.append(result.response_entry(include_resource=return_resources))
            except OperationOutcomeError as exc:
                response_entries.append(
                    {"response": {"status": status_line(exc.status), "outcome": exc.outcome}}
                )
        return self._response_bundle("batch-response", response_entries)

    @staticmethod
    def _response_bundle(bundle_type: str, entries: list[JsonObject]) -> JsonObject:
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": _now_instant()},
            "type": bundle_type,
            "entry": entries,
        }

    def _parse_entries(
        self, bundle: JsonObject, *, base_url: str
    ) -> list[_Entry | OperationOutcomeError]:
        raw_entries = bundle.get("entry", [])
        if not isinstance(raw_entries, list):
            raise OperationOutcomeError.of(
                400, "structure", "Bundle.entry must be an array", expression="Bundle.entry"
            )
        parsed: list[_Entry | OperationOutcomeError] = []
        for index, raw in enumerate(raw_entries):
            try:
                parsed.append(self._parse_entry(index, raw, base_url=base_url))
            except OperationOutcomeError as exc:
                parsed.append(exc.in_entry(index))
        return parsed

    def _parse_entry(self, index: int, raw: Any, *, base_url: str) -> _Entry:
        if not isinstance(raw, dict):
            raise OperationOutcomeError.of(400, "structure", "An entry must be a JSON object")
        request = raw.get("request")
        if not isinstance(request, dict):
            raise OperationOutcomeError.of(400, "required", "Missing request", expression="request")
        method, url = request.get("method"), request.get("url")
        if not isinstance(method, str) or not isinstance(url, str) or not url:
            raise OperationOutcomeError.of(
                400, "required", "request.method and request.url are required", expression="request"
            )
        if method not in _METHOD_ORDER:
            raise OperationOutcomeError.of(
                400,
                "not-supported",
                f"request.method {method} is not supported by this server",
                expression="request.method",
            )
        if _ABSOLUTE_URL_RE.match(url):
            if not url.startswith(base_url.rstrip("/") + "/"):
                raise OperationOutcomeError.of(
                    400, "invalid", "request.url points to another server", expression="request.url"
                )
            url = url[len(base_url.rstrip("/")) + 1 :]
        path, _, query_string = url.partition("?")
        segments = path.strip("/").split("/")
        resource_type = segments[0]
        self.check_resource_type(resource_type, expression="request.url")
        entry = _Entry(index=index, method=method, resource_type=resource_type)
        if query_string or (method == "GET" and len(segments) == 1):
            entry.query = parse_search_string(query_string, expression="request.url")
        full_url = raw.get("fullUrl")
        entry.full_url = full_url if isinstance(full_url, str) else None
        resource = raw.get("resource")

        if method == "POST":
            if len(segments) != 1 or query_string:
                raise OperationOutcomeError.of(
                    400,
                    "invalid",
                    "POST request.url must be a resource type",
                    expression="request.url",
                )
            if_none_exist = request.get("ifNoneExist")
            if if_none_exist is not None:
                entry.if_none_exist = _parse_if_none_exist(if_none_exist)
        elif method == "PUT":
            if len(segments) == 2 and not query_string:
                entry.resource_id = _checked_id(segments[1], expression="request.url")
            elif len(segments) != 1 or not query_string:
                raise OperationOutcomeError.of(
                    400,
                    "invalid",
                    "PUT request.url must be Type/id or Type?search",
                    expression="request.url",
                )
            if_match = request.get("ifMatch")
            if if_match is not None:
                entry.if_match = parse_if_match(str(if_match))
        else:  # GET
            if len(segments) in (2, 4) and not query_string:
                entry.resource_id = segments[1]
                if len(segments) == 4:
                    if segments[2] != "_history":
                        raise OperationOutcomeError.of(
                            400, "invalid", "Unsupported GET request.url", expression="request.url"
                        )
                    entry.history_version = segments[3]
            elif len(segments) != 1:
                raise OperationOutcomeError.of(
                    400, "invalid", "Unsupported GET request.url", expression="request.url"
                )
        if method in ("POST", "PUT"):
            if not isinstance(resource, dict):
                raise OperationOutcomeError.of(
                    400, "required", f"{method} entry without a resource", expression="resource"
                )
            if resource.get("resourceType") != resource_type:
                raise OperationOutcomeError.of(
                    400,
                    "invalid",
                    "resource.resourceType does not match request.url",
                    expression="resource",
                )
            entry.resource = resource
        return entry

    # ------------------------------------------------------------------ committed state

    def _allocate_id(self, taken: Callable[[str], bool]) -> str:
        while True:
            candidate = str(self._next_id)
            self._next_id += 1
            if not taken(candidate):
                return candidate

    def _search_committed(self, resource_type: str, query: SearchQuery) -> set[str]:
        all_ids = self._ids_by_type.get(resource_type, {})
        result: set[str] | None = None
        for name, alternatives in query.parameters:
            found: set[str] = set()
            for token in alternatives:
                if name == "_id":
                    if token.code is not None and token.code in all_ids:
                        found.add(token.code)
                elif token.code is None:  # "system|": no index on system alone
                    found.update(
                        i
                        for i in all_ids
                        if any(
                            token.matches(s, c)
                            for s, c in _tokens(self._history[(resource_type, i)][-1], name)
                        )
                    )
                elif token.any_system:
                    found |= self._code_index.get((name, resource_type, token.code), set())
                else:
                    found |= self._index.get((name, resource_type, token.system, token.code), set())
            result = found if result is None else result & found
            if not result:
                return set()
        return set(all_ids) if result is None else result

    def _order(self, resource_type: str, ids: set[str]) -> list[str]:
        """Ids in creation order (staged, not yet stored ids last)."""
        unknown = len(self._sequence)
        return sorted(ids, key=lambda i: (self._sequence.get((resource_type, i), unknown), i))

    def _store(self, key: tuple[str, str], resource: JsonObject) -> None:
        resource_type, resource_id = key
        versions = self._history.get(key)
        if versions:
            self._unindex(resource_type, resource_id, versions[-1])
            versions.append(resource)
        else:
            self._history[key] = [resource]
            self._sequence[key] = len(self._sequence)
            self._ids_by_type.setdefault(resource_type, {})[resource_id] = None
        for name in _TOKEN_PARAMETERS:
            for system, code in _tokens(resource, name):
                self._index.setdefault((name, resource_type, system, code), set()).add(resource_id)
                self._code_index.setdefault((name, resource_type, code), set()).add(resource_id)

    def _unindex(self, resource_type: str, resource_id: str, resource: JsonObject) -> None:
        for name in _TOKEN_PARAMETERS:
            for system, code in _tokens(resource, name):
                self._index.get((name, resource_type, system, code), set()).discard(resource_id)
                self._code_index.get((name, resource_type, code), set()).discard(resource_id)


def _checked_id(resource_id: str, *, expression: str) -> str:
    if not _ID_RE.match(resource_id):
        raise OperationOutcomeError.of(
            400,
            "invalid",
            "Invalid resource id (FHIR id: [A-Za-z0-9-.]{1,64})",
            expression=expression,
        )
    return resource_id


def _parse_if_none_exist(value: Any) -> SearchQuery:
    expression = "request.ifNoneExist"
    if not isinstance(value, str) or not value:
        raise OperationOutcomeError.of(400, "invalid", "Empty ifNoneExist", expression=expression)
    if "?" in value:
        # R4 http.html#ccreate: the value is the search parameters only, no type and no "?".
        raise OperationOutcomeError.of(
            400,
            "invalid",
            "ifNoneExist must hold search parameters only (e.g. identifier=sys|val), "
            "without a resource type or '?'",
            expression=expression,
        )
    query = parse_search_string(value, expression=expression)
    if query.is_empty:
        raise OperationOutcomeError.of(400, "invalid", "Empty ifNoneExist", expression=expression)
    return query


def parse_if_none_exist_header(value: str) -> SearchQuery:
    """Parse an ``If-None-Exist`` header value (search parameters, no type, no '?')."""
    return _parse_if_none_exist(value)


@dataclass
class _UnitOfWork:
    """Writes staged on top of the committed state, committed at once (caller holds the lock)."""

    store: FhirStore
    last_updated: str = field(default_factory=_now_instant)
    staged: dict[tuple[str, str], JsonObject] = field(default_factory=dict)

    # -------------------------------------------------------------- state view

    def current(self, resource_type: str, resource_id: str) -> JsonObject | None:
        staged = self.staged.get((resource_type, resource_id))
        if staged is not None:
            return staged
        versions = self.store._history.get((resource_type, resource_id))
        return versions[-1] if versions else None

    def search_ids(self, resource_type: str, query: SearchQuery) -> list[str]:
        ids = self.store._search_committed(resource_type, query)
        for (staged_type, staged_id), resource in self.staged.items():
            if staged_type != resource_type:
                continue
            if _matches(resource, query):
                ids.add(staged_id)
            else:
                ids.discard(staged_id)
        return self.store._order(resource_type, ids)

    def _one_match(self, resource_type: str, query: SearchQuery, what: str) -> str | None:
        ids = self.search_ids(resource_type, query)
        if len(ids) > 1:
            listed = ", ".join(f"{resource_type}/{i}" for i in ids)
            raise OperationOutcomeError.of(
                412,
                "duplicate",
                f"{what} matched {len(ids)} resources ({listed}); expected at most one",
            )
        return ids[0] if ids else None

    def _result(
        self, status: int, resource_type: str, resource_id: str, *, is_read: bool = False
    ) -> InteractionResult:
        resource = self.current(resource_type, resource_id)
        assert resource is not None
        return InteractionResult(
            status=status,
            resource=resource,
            resource_type=resource_type,
            resource_id=resource_id,
            version=resource["meta"]["versionId"],
            is_read=is_read,
        )

    # -------------------------------------------------------------- writes

    def _write(self, resource_type: str, resource_id: str, resource: JsonObject) -> int:
        key = (resource_type, resource_id)
        if key in self.staged:
            raise OperationOutcomeError.of(
                400,
                "duplicate",
                f"The bundle writes {resource_type}/{resource_id} more than once",
            )
        previous = self.current(resource_type, resource_id)
        version = int(previous["meta"]["versionId"]) + 1 if previous else 1
        incoming_meta = resource.get("meta")
        meta = dict(incoming_meta) if isinstance(incoming_meta, dict) else {}
        meta["versionId"] = str(version)
        meta["lastUpdated"] = self.last_updated
        # resourceType, id and meta first, as servers serialize them.
        stored = {"resourceType": resource_type, "id": resource_id, "meta": meta}
        stored.update((k, v) for k, v in resource.items() if k not in stored)
        self.staged[key] = stored
        return 201 if previous is None else 200

    def _new_id(self, resource_type: str) -> str:
        return self.store._allocate_id(lambda i: self.current(resource_type, i) is not None)

    def create(
        self, resource: JsonObject, *, if_none_exist: SearchQuery | None
    ) -> InteractionResult:
        resource_type = resource["resourceType"]
        if if_none_exist is not None:
            existing = self._one_match(resource_type, if_none_exist, "ifNoneExist")
            if existing is not None:
                return self._result(200, resource_type, existing)
        resource_id = self._new_id(resource_type)
        self._write(resource_type, resource_id, resource)
        return self._result(201, resource_type, resource_id)

    def update(
        self,
        resource_type: str,
        resource_id: str,
        resource: JsonObject,
        *,
        if_match: int | None,
        body_id_required: bool = True,
    ) -> InteractionResult:
        _checked_id(resource_id, expression="id")
        body_id = resource.get("id")
        if body_id is None and body_id_required:
            # R4 http.html#update: no id in the body is a 400.
            raise OperationOutcomeError.of(
                400, "required", "The resource must have an id matching the URL", expression="id"
            )
        if body_id is not None and body_id != resource_id:
            raise OperationOutcomeError.of(
                400, "invalid", "The resource id does not match the URL", expression="id"
            )
        if if_match is not None:
            current = self.current(resource_type, resource_id)
            current_version = int(current["meta"]["versionId"]) if current else None
            if current_version != if_match:
                raise OperationOutcomeError.of(
                    412,
                    "conflict",
                    f"Version conflict: If-Match {if_match}, current version "
                    f"{current_version if current_version is not None else '(none)'}",
                )
        status = self._write(resource_type, resource_id, resource)
        return self._result(status, resource_type, resource_id)

    def conditional_update(
        self, resource_type: str, query: SearchQuery, resource: JsonObject
    ) -> InteractionResult:
        existing = self._one_match(resource_type, query, "Conditional update")
        body_id = resource.get("id")
        if body_id is not None and not isinstance(body_id, str):
            raise OperationOutcomeError.of(400, "invalid", "id must be a string", expression="id")
        if existing is None:
            if body_id is not None:
                resource_id = _checked_id(body_id, expression="id")
                if self.current(resource_type, resource_id) is not None:
                    raise OperationOutcomeError.of(
                        400,
                        "invalid",
                        "No resource matches the search but the body id exists already",
                        expression="id",
                    )
            else:
                resource_id = self._new_id(resource_type)
        else:
            if body_id is not None and body_id != existing:
                raise OperationOutcomeError.of(
                    400, "invalid", "The body id differs from the matched resource", expression="id"
                )
            resource_id = existing
        status = self._write(resource_type, resource_id, resource)
        return self._result(status, resource_type, resource_id)

    def read(self, resource_type: str, resource_id: str, version: str | None) -> InteractionResult:
        if version is None:
            if self.current(resource_type, resource_id) is None:
                raise OperationOutcomeError.of(
                    404, "not-found", f"Resource {resource_type}/{resource_id} is not known"
                )
            return self._result(200, resource_type, resource_id, is_read=True)
        versions = list(self.store._history.get((resource_type, resource_id), []))
        staged = self.staged.get((resource_type, resource_id))
        if staged is not None:
            versions.append(staged)
        for resource in versions:
            if resource["meta"]["versionId"] == version:
                return InteractionResult(
                    200, resource, resource_type, resource_id, version, is_read=True
                )
        raise OperationOutcomeError.of(
            404,
            "not-found",
            f"Version {version} of {resource_type}/{resource_id} is not known",
        )

    def search(self, resource_type: str, query: SearchQuery, *, base_url: str) -> JsonObject:
        ids = self.search_ids(resource_type, query)
        shown = (
            [] if query.summary_count else ids[: query.count] if query.count is not None else ids
        )
        base = base_url.rstrip("/")
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": _now_instant()},
            "type": "searchset",
            "total": len(ids),
            "link": [{"relation": "self", "url": f"{base}/{resource_type}"}],
            "entry": [
                {
                    "fullUrl": f"{base}/{resource_type}/{i}",
                    "resource": self.current(resource_type, i),
                    "search": {"mode": "match"},
                }
                for i in shown
            ],
        }

    def apply(self, entry: _Entry, *, base_url: str = "") -> InteractionResult:
        """Run one parsed bundle entry against this unit of work."""
        if entry.method == "POST":
            assert entry.resource is not None
            return self.create(entry.resource, if_none_exist=entry.if_none_exist)
        if entry.method == "PUT":
            assert entry.resource is not None
            if entry.resource_id is not None:
                return self.update(
                    entry.resource_type,
                    entry.resource_id,
                    entry.resource,
                    if_match=entry.if_match,
                    body_id_required=False,
                )
            assert entry.query is not None
            return self.conditional_update(entry.resource_type, entry.query, entry.resource)
        if entry.resource_id is not None:
            return self.read(entry.resource_type, entry.resource_id, entry.history_version)
        bundle = self.search(entry.resource_type, entry.query or SearchQuery(()), base_url=base_url)
        return InteractionResult(200, bundle, is_read=True)

    # -------------------------------------------------------------- references

    def resolve_references(self, placeholders: Mapping[str, str]) -> None:
        """Rewrite references in every staged resource, then check they resolve.

        ``placeholders`` maps entry fullUrls (``urn:uuid:...`` or absolute) to ``Type/id``.
        A conditional reference ``Type?search`` must match exactly one resource (R4
        http.html#trules). Canonical elements are not ``reference`` keys, so they are untouched.
        """
        for (resource_type, _), resource in self.staged.items():
            for reference in _iter_references(resource):
                value: str = reference["reference"]
                if value in placeholders:
                    reference["reference"] = placeholders[value]
                elif value.startswith(("urn:uuid:", "urn:oid:")):
                    raise OperationOutcomeError.of(
                        400,
                        "not-found",
                        f"{resource_type}: reference to placeholder {value} that is not the "
                        "fullUrl of an entry in this transaction",
                    )
                elif "?" in value and not value.startswith(("http:", "https:", "#")):
                    reference["reference"] = self._conditional_reference(value)
            if self.store.referential_integrity:
                for reference in _iter_references(resource):
                    self._check_target(resource_type, reference["reference"])

    def _conditional_reference(self, value: str) -> str:
        target_type, _, query_string = value.partition("?")
        self.store.check_resource_type(target_type)
        ids = self.search_ids(target_type, parse_search_string(query_string))
        if len(ids) != 1:
            raise OperationOutcomeError.of(
                404 if not ids else 412,
                "not-found" if not ids else "duplicate",
                f"Conditional reference {target_type}?... matched {len(ids)} resources "
                "(exactly one required)",
            )
        return f"{target_type}/{ids[0]}"

    def _check_target(self, source_type: str, value: str) -> None:
        match = _RELATIVE_REFERENCE_RE.match(value)
        if match is None:
            return  # contained (#id), absolute URL or logical reference: not checked
        target_type, target_id, _ = match.groups()
        if self.current(target_type, target_id) is None:
            raise OperationOutcomeError.of(
                400,
                "not-found",
                f"{source_type} references {target_type}/{target_id}, which does not exist",
            )

    def commit(self) -> None:
        for key, resource in self.staged.items():
            self.store._store(key, resource)
        self.staged.clear()
