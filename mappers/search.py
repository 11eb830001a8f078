"""FHIR R4 search, parsed once into a typed query and evaluated on resources (pure).

What the gateway's ``/fhir`` search serves, as data (:data:`SEARCH_PARAMETERS`): each
resource type's search parameters, with the R4 (or US Core) SearchParameter they follow,
their type and the element paths they read. The same table builds the
CapabilityStatement, so ``GET /fhir/metadata`` lists exactly what is searched.

Rules followed (https://hl7.org/fhir/R4/search.html):

* **token** (``[system]|[code]``, ``|[code]``, ``[system]|``, ``[code]``; ``:text``
  matches ``CodeableConcept.text``, ``Coding.display`` or ``Identifier.type.text``,
  starts-with and case-insensitive; ``:not`` negates);
* **string** (starts-with, case- and accent-insensitive; ``:exact`` is an exact,
  case-sensitive match; ``:contains`` anywhere in the value); a ``HumanName`` or an
  ``Address`` matches on any of its parts;
* **date** (``eq ne gt lt ge le sa eb ap``; the parameter and the element are both ranges
  set by their precision, https://hl7.org/fhir/R4/search.html#prefix; a value without a
  time zone is taken as UTC);
* **reference** (``[type]/[id]``, ``[id]``, an absolute URL on this server, ``:[type]``);
  a canonical (``QuestionnaireResponse.questionnaire``) matches with or without its
  ``|version``;
* a comma is OR inside one parameter; repeating a parameter is AND.

Result parameters: ``_count`` (0..:data:`MAX_COUNT`), ``_offset`` (paging), ``_sort``
(``_lastUpdated``/``-_lastUpdated``, ``_id``), ``_summary`` (``count``, ``false``,
``data``), ``_elements``, ``_include`` and ``_revinclude`` (``Type:param[:Target]``),
``_total`` (``accurate``/``none``/``estimate``: the total is always exact) and ``_format``.

Errors: :class:`SearchError` carries one ``(parameter, message)`` per problem, never the
value searched for (it may be PHI).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

ParamType = Literal["token", "string", "date", "reference"]

#: The largest page a search answers.
MAX_COUNT = 500
#: The page size when ``_count`` is not given.
DEFAULT_COUNT = 50
#: The largest ``_offset`` accepted.
MAX_OFFSET = 1_000_000

R4 = "http://hl7.org/fhir/SearchParameter/"
US_CORE = "http://hl7.org/fhir/us/core/SearchParameter/"


@dataclass(frozen=True)
class SearchParam:
    """One search parameter of one resource type.

    Attributes:
        name: the parameter's code (``birthdate``).
        type: token, string, date or reference.
        paths: dotted element paths read (``name.family``); a choice element is named
            by its stem with ``[x]`` (``effective[x]``).
        definition: the canonical URL of the SearchParameter followed.
        targets: the resource types a reference may point to.
        telecom_system: a ``ContactPoint.system`` the parameter is limited to
            (``email``, ``phone``).
        documentation: what it matches, for the CapabilityStatement.
    """

    name: str
    type: ParamType
    paths: tuple[str, ...]
    definition: str
    targets: tuple[str, ...] = ()
    telecom_system: str | None = None
    documentation: str = ""


def _p(
    name: str,
    type_: ParamType,
    paths: str,
    definition: str,
    targets: str = "",
    *,
    telecom: str | None = None,
    doc: str = "",
) -> SearchParam:
    return SearchParam(
        name,
        type_,
        tuple(paths.split()),
        definition,
        tuple(targets.split()),
        telecom,
        doc,
    )


_COMMON = (
    _p("_id", "token", "id", R4 + "Resource-id", doc="the logical id"),
    _p("_lastUpdated", "date", "meta.lastUpdated", R4 + "Resource-lastUpdated"),
)

#: Resource type -> its search parameters (``_id`` and ``_lastUpdated`` on each).
SEARCH_PARAMETERS: dict[str, tuple[SearchParam, ...]] = {
    "Patient": (
        *_COMMON,
        _p("identifier", "token", "identifier", US_CORE + "us-core-patient-identifier"),
        _p(
            "name",
            "string",
            "name",
            US_CORE + "us-core-patient-name",
            doc="any part of a name: family, given, prefix, suffix, text",
        ),
        _p("family", "string", "name.family", US_CORE + "us-core-patient-family"),
        _p("given", "string", "name.given", US_CORE + "us-core-patient-given"),
        _p("birthdate", "date", "birthDate", US_CORE + "us-core-patient-birthdate"),
        _p("gender", "token", "gender", US_CORE + "us-core-patient-gender"),
        _p(
            "telecom",
            "token",
            "telecom",
            R4 + "individual-telecom",
            doc="ContactPoint.value (phone numbers compared on their digits); system|value "
            "limits to ContactPoint.system",
        ),
        _p("email", "token", "telecom", R4 + "individual-email", telecom="email"),
        _p("phone", "token", "telecom", R4 + "individual-phone", telecom="phone"),
        _p("address", "string", "address", R4 + "individual-address"),
        _p("active", "token", "active", R4 + "Patient-active"),
    ),
    "QuestionnaireResponse": (
        *_COMMON,
        _p("identifier", "token", "identifier", R4 + "QuestionnaireResponse-identifier"),
        _p("patient", "reference", "subject", R4 + "QuestionnaireResponse-patient", "Patient"),
        _p("subject", "reference", "subject", R4 + "QuestionnaireResponse-subject", "Patient"),
        _p(
            "questionnaire",
            "reference",
            "questionnaire",
            R4 + "QuestionnaireResponse-questionnaire",
            "Questionnaire",
            doc="the canonical URL, with or without |version",
        ),
        _p("authored", "date", "authored", R4 + "QuestionnaireResponse-authored"),
        _p("status", "token", "status", R4 + "QuestionnaireResponse-status"),
    ),
    "MedicationRequest": (
        *_COMMON,
        _p("identifier", "token", "identifier", R4 + "clinical-identifier"),
        _p(
            "patient",
            "reference",
            "subject",
            US_CORE + "us-core-medicationrequest-patient",
            "Patient",
        ),
        _p("subject", "reference", "subject", R4 + "MedicationRequest-subject", "Patient"),
        _p("status", "token", "status", US_CORE + "us-core-medicationrequest-status"),
        _p("intent", "token", "intent", US_CORE + "us-core-medicationrequest-intent"),
        _p(
            "authoredon",
            "date",
            "authoredOn",
            US_CORE + "us-core-medicationrequest-authoredon",
        ),
    ),
    "Observation": (
        *_COMMON,
        _p("identifier", "token", "identifier", R4 + "clinical-identifier"),
        _p("patient", "reference", "subject", US_CORE + "us-core-observation-patient", "Patient"),
        _p("subject", "reference", "subject", R4 + "Observation-subject", "Patient"),
        _p("code", "token", "code", US_CORE + "us-core-observation-code"),
        _p("category", "token", "category", US_CORE + "us-core-observation-category"),
        _p("date", "date", "effective[x]", US_CORE + "us-core-observation-date"),
        _p("status", "token", "status", US_CORE + "us-core-observation-status"),
    ),
    "Flag": (
        *_COMMON,
        _p("identifier", "token", "identifier", R4 + "Flag-identifier"),
        _p("patient", "reference", "subject", R4 + "clinical-patient", "Patient"),
        _p("subject", "reference", "subject", R4 + "Flag-subject", "Patient"),
        _p("date", "date", "period", R4 + "clinical-date"),
        _p("status", "token", "status", R4 + "Flag-status"),
    ),
    "Consent": (
        *_COMMON,
        _p("identifier", "token", "identifier", R4 + "clinical-identifier"),
        _p("patient", "reference", "patient", R4 + "clinical-patient", "Patient"),
        _p("date", "date", "dateTime", R4 + "clinical-date"),
        _p("status", "token", "status", R4 + "Consent-status"),
        _p("category", "token", "category", R4 + "Consent-category"),
        _p("scope", "token", "scope", R4 + "Consent-scope"),
    ),
    "Provenance": (
        *_COMMON,
        _p(
            "target",
            "reference",
            "target",
            R4 + "Provenance-target",
            "Patient QuestionnaireResponse MedicationRequest Observation Flag Consent",
        ),
        _p("patient", "reference", "target", R4 + "Provenance-patient", "Patient"),
        _p("recorded", "date", "recorded", R4 + "Provenance-recorded"),
        _p("agent", "reference", "agent.who", R4 + "Provenance-agent", "Patient"),
    ),
}

#: The result parameters every search accepts (https://hl7.org/fhir/R4/search.html#all).
RESULT_PARAMETERS = frozenset(
    {
        "_count",
        "_offset",
        "_sort",
        "_summary",
        "_elements",
        "_include",
        "_revinclude",
        "_total",
        "_format",
        "_pretty",
    }
)

#: Token, string and reference modifiers served, per type.
MODIFIERS: dict[str, frozenset[str]] = {
    "token": frozenset({"text", "not", "missing"}),
    "string": frozenset({"exact", "contains", "missing"}),
    "date": frozenset({"missing"}),
    "reference": frozenset({"missing"}),
}

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


class SearchError(ValueError):
    """A search that cannot be run as asked: ``problems`` is ``[(parameter, message)]``
    (the message never holds the searched value)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{n}: {m}" for n, m in problems))
        self.problems = problems


# --------------------------------------------------------------------------- the query


@dataclass(frozen=True)
class Criterion:
    """One ``name[:modifier]=v1,v2`` of the query (the values are OR-ed)."""

    param: SearchParam
    modifier: str | None
    values: tuple[str, ...]

    @property
    def key(self) -> str:
        """The parameter as written back in a link: ``name`` or ``name:modifier``."""
        return f"{self.param.name}:{self.modifier}" if self.modifier else self.param.name


@dataclass(frozen=True)
class Include:
    """``_include`` / ``_revinclude`` = ``source:param[:target]``."""

    source: str
    param: SearchParam
    target: str | None

    def render(self) -> str:
        """Back to the query text."""
        text = f"{self.source}:{self.param.name}"
        return f"{text}:{self.target}" if self.target else text


@dataclass(frozen=True)
class SearchQuery:
    """A search parsed once: the criteria (AND-ed), the result parameters, and what was
    ignored (lenient handling)."""

    resource_type: str
    criteria: tuple[Criterion, ...] = ()
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: tuple[tuple[str, bool], ...] = ()  # (param, descending)
    summary: str | None = None
    elements: tuple[str, ...] = ()
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    total: str | None = None
    ignored: tuple[str, ...] = field(default=())

    def params(self, *, offset: int | None = None) -> list[tuple[str, str]]:
        """The query as ``(name, value)`` pairs, in a fixed order, ignored parameters
        left out (the ``self`` link of https://hl7.org/fhir/R4/search.html#errors);
        ``offset`` replaces the page's."""
        out = [(c.key, ",".join(c.values)) for c in self.criteria]
        if self.sort:
            out.append(("_sort", ",".join(("-" if d else "") + n for n, d in self.sort)))
        if self.summary:
            out.append(("_summary", self.summary))
        if self.elements:
            out.append(("_elements", ",".join(self.elements)))
        out += [("_include", i.render()) for i in self.includes]
        out += [("_revinclude", i.render()) for i in self.revincludes]
        if self.total:
            out.append(("_total", self.total))
        out.append(("_count", str(self.count)))
        page = self.offset if offset is None else offset
        if page:
            out.append(("_offset", str(page)))
        return out


def param_of(resource_type: str, name: str) -> SearchParam | None:
    """The search parameter ``name`` of ``resource_type``, or None."""
    for param in SEARCH_PARAMETERS.get(resource_type, ()):
        if param.name == name:
            return param
    return None


def _whole(value: str, name: str, limit: int, problems: list[tuple[str, str]]) -> int | None:
    # isascii: str.isdigit() is true for "²", which int() refuses
    if not (value.isascii() and value.isdigit()) or len(value) > 7 or int(value) > limit:
        problems.append((name, f"must be a whole number from 0 to {limit}"))
        return None
    return int(value)


def parse_search(
    resource_type: str, items: Sequence[tuple[str, str]], *, strict: bool
) -> SearchQuery:
    """Parse a query string's ``(name, value)`` pairs into a :class:`SearchQuery`.

    Args:
        resource_type: a key of :data:`SEARCH_PARAMETERS`.
        items: the query's pairs, repeated names kept (AND).
        strict: ``Prefer: handling=strict``: an unknown parameter or modifier is an
            error; lenient (False), it is ignored and listed in ``ignored``.

    Raises:
        SearchError: a value that cannot be read (a bad date, prefix, count...), or an
            unknown parameter in strict handling.
    """
    problems: list[tuple[str, str]] = []
    criteria: list[Criterion] = []
    ignored: list[str] = []
    result: dict[str, Any] = {"count": DEFAULT_COUNT, "offset": 0}
    includes: list[Include] = []
    revincludes: list[Include] = []

    def unknown(name: str, why: str) -> None:
        if strict:
            problems.append((name, why))
        else:
            ignored.append(name)

    for raw_name, value in items:
        name, _, modifier = raw_name.partition(":")
        if name in RESULT_PARAMETERS:
            if modifier:
                unknown(raw_name, "a result parameter takes no modifier")
                continue
            _result(resource_type, name, value, result, includes, revincludes, problems, unknown)
            continue
        param = param_of(resource_type, name)
        if param is None:
            why = (
                "chained parameters are not supported"
                if "." in name
                else (f"not a search parameter of {resource_type}")
            )
            unknown(raw_name, why)
            continue
        if (
            modifier
            and modifier not in MODIFIERS[param.type]
            and not (param.type == "reference" and modifier in param.targets)
        ):
            unknown(raw_name, f"the modifier :{modifier} is not supported on {name}")
            continue
        values = tuple(v for v in _split_or(value))
        if not values or any(v == "" for v in values):
            problems.append((raw_name, "an empty value"))
            continue
        for v in values:
            _check_value(param, modifier or None, v, raw_name, problems)
        criteria.append(Criterion(param, modifier or None, values))
    if problems:
        raise SearchError(problems)
    return SearchQuery(
        resource_type,
        tuple(criteria),
        count=result["count"],
        offset=result["offset"],
        sort=tuple(result.get("sort", ())),
        summary=result.get("summary"),
        elements=tuple(result.get("elements", ())),
        includes=tuple(includes),
        revincludes=tuple(revincludes),
        total=result.get("total"),
        ignored=tuple(ignored),
    )


def _split_or(value: str) -> Iterator[str]:
    """Split on commas not escaped with ``\\`` (https://hl7.org/fhir/R4/search.html#escaping)."""
    current = ""
    escaped = False
    for ch in value:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            yield current
            current = ""
        else:
            current += ch
    yield current


def _result(
    resource_type: str,
    name: str,
    value: str,
    result: dict[str, Any],
    includes: list[Include],
    revincludes: list[Include],
    problems: list[tuple[str, str]],
    unknown: Any,
) -> None:
    if name == "_count":
        result["count"] = _whole(value, name, MAX_COUNT, problems) or 0
    elif name == "_offset":
        result["offset"] = _whole(value, name, MAX_OFFSET, problems) or 0
    elif name == "_sort":
        sort: list[tuple[str, bool]] = []
        for item in value.split(","):
            desc = item.startswith("-")
            key = item[1:] if desc else item
            if key in ("_lastUpdated", "_id"):
                sort.append((key, desc))
            else:
                unknown("_sort", "only _lastUpdated and _id sort a search")
        result["sort"] = sort
    elif name == "_summary":
        if value in ("count", "false", "data"):
            result["summary"] = value
        else:
            unknown("_summary", "_summary is count, false or data")
    elif name == "_elements":
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not all(re.fullmatch(r"[a-zA-Z][a-zA-Z0-9]*(\[x\])?", n) for n in names):
            problems.append((name, "a comma-separated list of element names"))
        result["elements"] = names
    elif name == "_total":
        if value in ("none", "estimate", "accurate"):
            result["total"] = value
        else:
            problems.append((name, "_total is none, estimate or accurate"))
    elif name in ("_include", "_revinclude"):
        parts = value.split(":")
        if len(parts) < 2 or len(parts) > 3:
            problems.append((name, "Type:parameter[:targetType]"))
            return
        source, pname = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        param = param_of(source, pname)
        if name == "_include" and source != resource_type:
            unknown(name, f"_include names a parameter of {resource_type}")
        elif param is None or param.type != "reference":
            unknown(name, "not a reference search parameter")
        elif target is not None and target not in param.targets:
            unknown(name, "the target type is not one the parameter references")
        elif name == "_revinclude" and resource_type not in param.targets:
            unknown(name, f"the parameter does not reference {resource_type}")
        else:
            (includes if name == "_include" else revincludes).append(Include(source, param, target))
    # _format and _pretty: content negotiation, handled by the caller


def _check_value(
    param: SearchParam,
    modifier: str | None,
    value: str,
    name: str,
    problems: list[tuple[str, str]],
) -> None:
    if modifier == "missing":
        if value not in ("true", "false"):
            problems.append((name, ":missing is true or false"))
        return
    if param.type == "date":
        try:
            prefix, _ = split_prefix(value)
            if prefix not in PREFIXES:
                raise ValueError
            date_range(value[len(prefix) :] if value[:2] == prefix else value)
        except ValueError:
            problems.append(
                (
                    name,
                    "a FHIR date, dateTime or instant with an optional prefix "
                    "eq|ne|gt|lt|ge|le|sa|eb|ap",
                )
            )


# --------------------------------------------------------------------------- dates


def split_prefix(value: str) -> tuple[str, str]:
    """``"ge2026-01-01"`` -> ``("ge", "2026-01-01")``; no prefix is ``eq``."""
    if value[:2].isalpha():
        return value[:2], value[2:]
    return "eq", value


_DATE = re.compile(
    r"(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)


@functools.lru_cache(maxsize=4096)
def date_range(text: str) -> tuple[datetime, datetime]:
    """The instants ``[start, end)`` a FHIR date/dateTime/instant covers at its precision
    (``2026`` is the whole year; ``2026-11-23T14:00`` a minute), in UTC; no time zone
    means UTC.

    Raises:
        ValueError: not a FHIR date, dateTime or instant.
    """
    m = _DATE.fullmatch(text.strip())
    if m is None:
        raise ValueError("not a FHIR date")
    y, mo, d = int(m["y"]), int(m["m"] or 1), int(m["d"] or 1)
    tz: timezone = UTC
    if m["tz"] and m["tz"] != "Z":
        sign = 1 if m["tz"][0] == "+" else -1
        hh, mm = m["tz"][1:].split(":")
        tz = timezone(timedelta(minutes=sign * (int(hh) * 60 + int(mm))))
    start = datetime(y, mo, d, int(m["H"] or 0), int(m["M"] or 0), int(m["S"] or 0), tzinfo=tz)
    if m["f"]:
        start = start.replace(microsecond=int(float(m["f"]) * 1_000_000))
    if m["S"] is not None:
        end = start + (timedelta(milliseconds=1) if m["f"] else timedelta(seconds=1))
    elif m["M"] is not None:
        end = start + timedelta(minutes=1)
    elif m["d"] is not None:
        end = start + timedelta(days=1)
    elif m["m"] is not None:
        end = start.replace(year=y + 1, month=1) if mo == 12 else start.replace(month=mo + 1)
    else:
        end = start.replace(year=y + 1)
    return start.astimezone(UTC), end.astimezone(UTC)


def _value_range(value: Any) -> tuple[datetime, datetime] | None:
    if isinstance(value, str):
        try:
            return date_range(value)
        except ValueError:
            return None
    if isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        low = (
            date_range(value["start"])[0]
            if value.get("start")
            else datetime.min.replace(tzinfo=UTC)
        )
        high = date_range(value["end"])[1] if value.get("end") else datetime.max.replace(tzinfo=UTC)
        return low, high
    return None


def date_matches(
    prefix: str, query: tuple[datetime, datetime], target: tuple[datetime, datetime]
) -> bool:
    """The R4 prefix rules on ranges (https://hl7.org/fhir/R4/search.html#prefix):
    ``eq`` the target lies within the parameter's range, ``gt``/``lt`` the target reaches
    beyond it, ``ge``/``le`` either, ``sa``/``eb`` starts after / ends before it,
    ``ap`` they overlap.

    >>> day = date_range("2026-11-23")
    >>> date_matches("ge", day, date_range("2026-11-23T14:00:00Z"))
    True
    >>> date_matches("lt", day, date_range("2026-11-23T14:00:00Z"))
    False
    """
    (qlo, qhi), (tlo, thi) = query, target
    eq = qlo <= tlo and thi <= qhi
    if prefix == "eq":
        return eq
    if prefix == "ne":
        return not eq
    if prefix == "gt":
        return thi > qhi
    if prefix == "lt":
        return tlo < qlo
    if prefix == "ge":
        return eq or thi > qhi
    if prefix == "le":
        return eq or tlo < qlo
    if prefix == "sa":
        return tlo >= qhi
    if prefix == "eb":
        return thi <= qlo
    return tlo < qhi and qlo < thi  # ap


# --------------------------------------------------------------------------- matching


def element_values(resource: dict[str, Any], path: str) -> list[Any]:
    """The values at dotted ``path`` (arrays flattened; ``x[x]`` takes any ``xType``)."""
    current: list[Any] = [resource]
    for step in path.split("."):
        nxt: list[Any] = []
        for node in current:
            if not isinstance(node, dict):
                continue
            if step.endswith("[x]"):
                stem = step[:-3]
                found = [
                    v
                    for k, v in node.items()
                    if k.startswith(stem) and k[len(stem) : len(stem) + 1].isupper()
                ]
            else:
                found = [node[step]] if step in node else []
            for value in found:
                nxt.extend(value if isinstance(value, list) else [value])
        current = nxt
    return current


@functools.lru_cache(maxsize=8192)
def normalize_text(text: str) -> str:
    """Case- and accent-insensitive form of ``text`` (NFKD, combining marks dropped,
    casefolded), for string search."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        out: list[str] = []
        for key in (
            "family",
            "given",
            "prefix",
            "suffix",
            "text",
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
        ):
            item = value.get(key)
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, list):
                out.extend(i for i in item if isinstance(i, str))
        return out
    return []


def _string_match(modifier: str | None, wanted: str, value: Any) -> bool:
    for text in _strings(value):
        if modifier == "exact":
            if text == wanted:
                return True
        elif modifier == "contains":
            if normalize_text(wanted) in normalize_text(text):
                return True
        elif normalize_text(text).startswith(normalize_text(wanted)):
            return True
    return False


def _codes(value: Any) -> list[tuple[str | None, str, list[str]]]:
    """``(system, code, texts)`` of a token-typed element."""
    if isinstance(value, bool):
        return [(None, "true" if value else "false", [])]
    if isinstance(value, str):
        return [(None, value, [])]
    if not isinstance(value, dict):
        return []
    if "coding" in value or ("text" in value and "value" not in value):  # CodeableConcept
        texts = [value["text"]] if isinstance(value.get("text"), str) else []
        return [
            (
                c.get("system"),
                str(c.get("code", "")),
                texts + ([c["display"]] if c.get("display") else []),
            )
            for c in value.get("coding", [])
            if isinstance(c, dict)
        ] or [(None, "", texts)]
    if "value" in value:  # Identifier or ContactPoint
        type_text = (value.get("type") or {}).get("text")
        return [(value.get("system"), str(value["value"]), [type_text] if type_text else [])]
    if "code" in value:  # Coding
        return [
            (
                value.get("system"),
                str(value["code"]),
                [value["display"]] if value.get("display") else [],
            )
        ]
    return []


def _digits(text: str) -> str:
    digits = "".join(c for c in text if c.isdigit())
    return digits[1:] if len(digits) == 11 and digits.startswith("1") else digits


def _token_match(param: SearchParam, modifier: str | None, wanted: str, value: Any) -> bool:
    if param.telecom_system is not None and (
        not isinstance(value, dict) or value.get("system") != param.telecom_system
    ):
        return False
    for system, code, texts in _codes(value):
        if modifier == "text":
            if any(normalize_text(t).startswith(normalize_text(wanted)) for t in texts):
                return True
            continue
        if "|" in wanted:
            want_system, want_code = wanted.split("|", 1)
            if want_system == "" and system:
                continue
            if want_system and want_system != system:
                continue
            if want_code == "":
                return True
        else:
            want_code = wanted
        if param.name == "email":
            if code.casefold() == want_code.casefold():
                return True
        elif param.telecom_system == "phone" or (
            param.name == "telecom"
            and isinstance(value, dict)
            and value.get("system") in ("phone", "sms", "fax")
        ):
            if code == want_code or (_digits(code) and _digits(code) == _digits(want_code)):
                return True
        elif code == want_code:
            return True
    return False


def _reference_match(
    param: SearchParam, modifier: str | None, wanted: str, value: Any, base_url: str
) -> bool:
    if isinstance(value, str):  # a canonical
        url = value
        return url == wanted or url.split("|", 1)[0] == wanted
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return False
    ref = value["reference"]
    if wanted.startswith(base_url.rstrip("/") + "/"):
        wanted = wanted[len(base_url.rstrip("/")) + 1 :]
    if "/" not in wanted:
        kinds = [modifier] if modifier else list(param.targets)
        return any(ref == f"{k}/{wanted}" for k in kinds)
    if modifier and not wanted.startswith(modifier + "/"):
        return False
    return bool(ref == wanted or ref.endswith("/" + wanted))


def criterion_matches(
    criterion: Criterion, resource: dict[str, Any], *, base_url: str = ""
) -> bool:
    """True if ``resource`` satisfies ``criterion`` (one of its values, OR).

    ``base_url``: this server's FHIR base (``https://gw.example/fhir``): an absolute
    reference on it compares as a relative one.
    """
    param, modifier = criterion.param, criterion.modifier
    values = [v for path in param.paths for v in element_values(resource, path)]
    if param.telecom_system is not None:
        values = [
            v for v in values if isinstance(v, dict) and v.get("system") == param.telecom_system
        ]
    if modifier == "missing":
        return (not values) == (criterion.values[0] == "true")
    if modifier == "not":
        return not any(_token_match(param, None, w, v) for w in criterion.values for v in values)
    for wanted in criterion.values:
        if param.type == "string":
            if any(_string_match(modifier, wanted, v) for v in values):
                return True
        elif param.type == "token":
            if any(_token_match(param, modifier, wanted, v) for v in values):
                return True
        elif param.type == "reference":
            if any(_reference_match(param, modifier, wanted, v, base_url) for v in values):
                return True
        else:
            prefix, text = split_prefix(wanted)
            query = date_range(text)
            for v in values:
                target = _value_range(v)
                if target is not None and date_matches(prefix, query, target):
                    return True
    return False


def matches(query: SearchQuery, resource: dict[str, Any], *, base_url: str = "") -> bool:
    """True if ``resource`` satisfies every criterion of ``query`` (AND)."""
    return all(criterion_matches(c, resource, base_url=base_url) for c in query.criteria)


def references(resource: dict[str, Any], include: Include) -> list[str]:
    """The ``Type/id`` references ``include``'s parameter holds in ``resource`` (a
    canonical is left out), limited to its target type."""
    out: list[str] = []
    for path in include.param.paths:
        for value in element_values(resource, path):
            ref = value.get("reference") if isinstance(value, dict) else None
            if not isinstance(ref, str) or ref.count("/") != 1:
                continue
            if include.target is None or ref.startswith(include.target + "/"):
                out.append(ref)
    return out


#: Elements ``_elements`` always keeps (https://hl7.org/fhir/R4/search.html#elements).
MANDATORY_ELEMENTS = ("resourceType", "id", "meta")

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}


def subset(
    resource: dict[str, Any], *, elements: Iterable[str] = (), summary: str | None = None
) -> dict[str, Any]:
    """``resource`` with only ``elements`` (plus the mandatory ones) or without ``text``
    (``_summary=data``), tagged ``SUBSETTED``; unchanged when neither applies."""
    names = set(elements)
    if not names and summary != "data":
        return resource
    if names:
        keep = names | set(MANDATORY_ELEMENTS)
        out = {
            k: v
            for k, v in resource.items()
            if k in keep or any(n.endswith("[x]") and k.startswith(n[:-3]) for n in names)
        }
    else:
        out = {k: v for k, v in resource.items() if k != "text"}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return out
