"""FHIR Bulk Data export lines -> the resources the gateway stores (issue 16, pure).

A Bulk Data export (https://hl7.org/fhir/uv/bulkdata/export.html, "Bulk Data Output File
Format") is one NDJSON file per resource type, one resource per line, with the exporting
server's logical ids and references between them (``subject: {"reference":
"Patient/123"}``). The gateway imports Patient, QuestionnaireResponse and
MedicationRequest (:data:`IMPORTED_TYPES`) from such files and gives each its own id;
what ties the files together is kept as identifiers:

* the exporting system's logical id becomes an identifier of the stored resource, system
  :func:`legacy_system` (``<identifier base>/migrated-id/<source>/<resource type>``,
  the source percent-encoded), so a re-run, a later file or a search finds it;
* a reference to an exported Patient is rewritten to the gateway's Patient for that id
  (looked up by the caller through the identifier above, :func:`rewrite_references`);
  any other reference (a Practitioner, a Medication, an Encounter of the old system,
  which the gateway does not import) becomes a logical reference: ``type`` and
  ``identifier`` (:func:`legacy_system` of its type | its old id), keeping ``display``
  (https://hl7.org/fhir/R4/references.html#logical). Contained references (``#x``) stay.

Phones, emails and US states of a Patient are normalized as live intake normalizes them
(:func:`normalize_patient`); names and dates are not changed (they are FHIR already, and
the validator checks their form).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

from mappers import normalize
from mappers.errors import MappingError, MappingErrors, Problem, ProblemCollector
from mappers.identifiers import IdentifierSystems
from mappers.patient import CONTACTPOINT_EXTENSION

#: The resource types a FHIR Bulk Data import takes; Patients first.
IMPORTED_TYPES = ("Patient", "QuestionnaireResponse", "MedicationRequest")

#: ``meta`` elements kept from the exporting server (versionId, lastUpdated and source
#: are that server's, not ours).
_KEPT_META = ("profile", "security", "tag")

#: A FHIR ``date`` with day precision.
_FULL_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

#: ``[base/]Type/id[/_history/vid]``: https://hl7.org/fhir/R4/references.html#literal
_LITERAL = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$"
)


def legacy_system(systems: IdentifierSystems, source: str, resource_type: str) -> str:
    """The identifier system of the logical ids of ``resource_type`` in the system
    ``source`` (the import job's ``--source``).

    >>> legacy_system(IdentifierSystems("https://gw.example/sid"), "old emr", "Patient")
    'https://gw.example/sid/migrated-id/old%20emr/Patient'
    """
    return f"{systems.base}/migrated-id/{quote(source, safe='')}/{resource_type}"


def unsupported_type_problem(data: Mapping[str, Any]) -> Problem | None:
    """The problem of a line whose ``resourceType`` is not imported (it is named: a type
    is not PHI), or None."""
    rtype = data.get("resourceType")
    if isinstance(rtype, str) and rtype in IMPORTED_TYPES:
        return None
    shown = str(rtype)[:64]
    return Problem(
        "resourceType",
        "unsupported_resource_type",
        f"resourceType {shown!r} is not imported: a FHIR Bulk Data import takes "
        + ", ".join(IMPORTED_TYPES),
    )


def business_id(data: Mapping[str, Any], source: str) -> str | None:
    """A resource's idempotency key: its first identifier (``system|value``), else
    ``<source>/<resourceType>/<id>``; None when it has neither."""
    idents = data.get("identifier")
    first = idents[0] if isinstance(idents, list) and idents else idents
    if isinstance(first, dict):
        system, value = first.get("system"), first.get("value")
        if isinstance(system, str) and isinstance(value, str) and system and value:
            return f"{system}|{value}"[:256]
    rid = data.get("id")
    if isinstance(rid, str) and rid:
        return f"{source}/{data.get('resourceType')}/{rid}"[:256]
    return None


def original_time(resource: Mapping[str, Any]) -> datetime | None:
    """When the record happened in the old system: ``authored`` (QuestionnaireResponse)
    or ``authoredOn`` (MedicationRequest) when it is a full date-time, else
    ``meta.lastUpdated``; None when neither is (a date alone has no instant)."""
    meta = resource.get("meta")
    candidates = [
        resource.get("authored"),
        resource.get("authoredOn"),
        meta.get("lastUpdated") if isinstance(meta, dict) else None,
    ]
    for value in candidates:
        if isinstance(value, str) and "T" in value:
            try:
                return normalize.parse_datetime(value)
            except (MappingError, MappingErrors):
                continue
    return None


def parse_reference(reference: str) -> tuple[str, str] | None:
    """``(type, id)`` of a literal reference, relative or absolute, with or without
    ``_history``; None for anything else (``urn:uuid:``, a contained ``#id``)."""
    if reference.startswith(("#", "urn:")):
        return None
    found = _LITERAL.search(reference)
    return (found["type"], found["id"]) if found else None


def _references(node: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every Reference (a dict with a string ``reference``) in a resource, with its
    FHIRPath-like location."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            out.append((path, node))
        for key, value in node.items():
            if key != "contained":  # contained resources keep their own references
                out.extend(_references(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            out.extend(_references(item, f"{path}[{i}]"))
    return out


def referenced_patients(resource: Mapping[str, Any]) -> set[str]:
    """The old ids of the Patients a resource references."""
    found = set()
    for _, ref in _references(dict(resource), str(resource.get("resourceType"))):
        parsed = parse_reference(ref["reference"])
        if parsed is not None and parsed[0] == "Patient":
            found.add(parsed[1])
    return found


def subject_problems(resource: Mapping[str, Any], known: Mapping[str, str]) -> list[Problem]:
    """Why a QuestionnaireResponse or MedicationRequest has no gateway patient: no
    ``subject``, a subject that is not a Patient, or a Patient not imported yet.

    Args:
        resource: the resource as exported.
        known: old Patient id -> the gateway's Patient id (the Patients imported).
    """
    rtype = resource.get("resourceType")
    subject = resource.get("subject")
    where = f"{rtype}.subject"
    if not isinstance(subject, dict) or not isinstance(subject.get("reference"), str):
        return [Problem(where, "missing_subject", "a reference to the Patient is required")]
    parsed = parse_reference(subject["reference"])
    if parsed is None or parsed[0] != "Patient":
        return [Problem(f"{where}.reference", "subject_not_patient", "must be Patient/<id>")]
    if parsed[1] not in known:
        return [
            Problem(
                f"{where}.reference",
                "unknown_patient",
                "this Patient has not been imported: import the Patient file of the export "
                "first (the same command with all files does), then import this record again",
            )
        ]
    return []


def rewrite_references(
    resource: dict[str, Any],
    known: Mapping[str, str],
    *,
    systems: IdentifierSystems,
    source: str,
) -> list[Problem]:
    """Rewrite the references of ``resource`` in place: ``Patient/<old id>`` of an
    imported Patient -> ``Patient/<gateway id>``; any other literal reference -> a
    logical one (``type`` + ``identifier``, :func:`legacy_system`), ``display`` kept.

    Returns:
        The problems: references that are neither literal nor contained (``urn:uuid:``
        only means something inside one Bundle).
    """
    problems: list[Problem] = []
    for path, ref in _references(resource, str(resource.get("resourceType"))):
        text = ref["reference"]
        if text.startswith("#"):
            continue
        parsed = parse_reference(text)
        if parsed is None:
            problems.append(
                Problem(
                    f"{path}.reference",
                    "unresolvable_reference",
                    "a reference in an export must be Type/id (or #contained)",
                )
            )
            continue
        rtype, old_id = parsed
        if rtype == "Patient" and old_id in known:
            ref["reference"] = f"Patient/{known[old_id]}"
            continue
        del ref["reference"]
        ref.setdefault("type", rtype)
        ref.setdefault(
            "identifier", {"system": legacy_system(systems, source, rtype), "value": old_id}
        )
    return problems


def _kept_meta(resource: dict[str, Any]) -> None:
    meta = resource.pop("meta", None)
    if isinstance(meta, dict):
        kept = {k: meta[k] for k in _KEPT_META if k in meta}
        if kept:
            resource["meta"] = kept


def prepare_resource(
    resource: Mapping[str, Any],
    *,
    new_id: str,
    known: Mapping[str, str],
    systems: IdentifierSystems,
    source: str,
) -> dict[str, Any]:
    """An exported QuestionnaireResponse or MedicationRequest as the gateway stores it:
    its own ``id``, the old id as an identifier (QuestionnaireResponse has one
    ``identifier``, 0..1: set only when absent), references rewritten
    (:func:`rewrite_references`), the old server's ``meta.versionId``/``lastUpdated``/
    ``source`` dropped.

    Raises:
        MappingErrors: a reference that cannot be rewritten.
    """
    out = copy.deepcopy(dict(resource))
    rtype = str(out.get("resourceType"))
    old_id = out.get("id")
    out["id"] = new_id
    _kept_meta(out)
    if isinstance(old_id, str) and old_id:
        legacy = {"system": legacy_system(systems, source, rtype), "value": old_id}
        if rtype == "QuestionnaireResponse":
            out.setdefault("identifier", legacy)
        elif isinstance(out.get("identifier"), list):
            out["identifier"] = [*out["identifier"], legacy]
        elif "identifier" not in out:
            out["identifier"] = [legacy]
    problems = rewrite_references(out, known, systems=systems, source=source)
    if problems:
        raise MappingErrors(problems)
    return out


def patient_identifiers(
    patient: Mapping[str, Any], *, systems: IdentifierSystems, source: str
) -> list[tuple[str, str]]:
    """How an exported Patient is found, in priority order: its old id
    (:func:`legacy_system`), then each of its identifiers (``system``, ``value``)."""
    found: list[tuple[str, str]] = []
    old_id = patient.get("id")
    if isinstance(old_id, str) and old_id:
        found.append((legacy_system(systems, source, "Patient"), old_id))
    for ident in patient.get("identifier") or []:
        system = ident.get("system") if isinstance(ident, dict) else None
        value = ident.get("value") if isinstance(ident, dict) else None
        if not (isinstance(system, str) and isinstance(value, str) and system and value):
            continue
        if (system, value) not in found:
            found.append((system, value))
    return found


def normalize_patient(
    patient: Mapping[str, Any], *, patient_id: str, systems: IdentifierSystems, source: str
) -> tuple[dict[str, Any], list[Problem]]:
    """An exported Patient as the gateway stores it, ``id`` ``patient_id``.

    * identifiers: the gateway's own (``<base>/patient-id``), the old id
      (:func:`legacy_system`), then the exported ones;
    * ``telecom``: phones to E.164 (an extension in the core ``contactpoint-extension``,
      as :func:`mappers.patient.phone_contact_point`), emails trimmed and lower-cased
      (:func:`mappers.normalize.normalize_email`): the forms patient matching and the EHRs
      compare. A phone or an email that cannot be normalized is kept as exported, not
      refused: the old system of record held it, ``ContactPoint.value`` is free text, and
      refusing the Patient would refuse its whole history with it (Synthea, the usual
      test export, gives every patient a ``555`` number, which is not in service); such an
      email is not used to match patients (:func:`patient_emails`);
    * ``address.state`` of a US address to its USPS code when it is spelled otherwise
      (``Texas`` -> ``TX``); a state that is no US state is left for the validator;
    * ``birthDate`` with day precision checked as live intake checks it (not in the
      future, not more than 130 years ago); ``YYYY`` and ``YYYY-MM``, valid in FHIR, are
      kept;
    * ``meta``: the old server's versionId, lastUpdated and source dropped.

    Returns:
        The Patient, and the problems of a birth date that cannot be right (at
        ``Patient.birthDate``: live intake refuses it too, and matching relies on it).
    """
    out = copy.deepcopy(dict(patient))
    _kept_meta(out)
    out["id"] = patient_id
    own = [(systems.patient, patient_id)]
    old_id = patient.get("id")
    if isinstance(old_id, str) and old_id:
        own.append((legacy_system(systems, source, "Patient"), old_id))
    exported = [i for i in out.get("identifier") or [] if isinstance(i, dict)]
    keyed = {(i.get("system"), i.get("value")) for i in exported}
    out["identifier"] = [
        *({"system": s, "value": v} for s, v in own if (s, v) not in keyed),
        *exported,
    ]
    problems = ProblemCollector()
    telecom = out.get("telecom")
    for point in telecom if isinstance(telecom, list) else []:
        if not isinstance(point, dict) or not isinstance(point.get("value"), str):
            continue
        with contextlib.suppress(MappingError, MappingErrors):  # kept as exported
            if point.get("system") == "phone":
                _set_phone(point, normalize.normalize_phone(point["value"]))
            elif point.get("system") == "email":
                point["value"] = normalize.normalize_email(point["value"])
    address = out.get("address")
    for a in address if isinstance(address, list) else []:
        if isinstance(a, dict) and isinstance(a.get("state"), str) and _is_us(a):
            # a state that is none is left as sent: the validator names it (USPS code)
            with contextlib.suppress(MappingError, MappingErrors):
                a["state"] = normalize.normalize_state(a["state"])
    birth = out.get("birthDate")
    if isinstance(birth, str) and _FULL_DATE.match(birth):
        problems.run("Patient.birthDate", normalize.normalize_birth_date, birth)
    return out, problems.problems


def _is_us(address: Mapping[str, Any]) -> bool:
    country = address.get("country")
    return country is None or str(country).strip().upper() in ("US", "USA", "UNITED STATES")


def _set_phone(point: dict[str, Any], text: str) -> None:
    e164, _, extension = text.partition(";ext=")
    point["value"] = e164
    if extension and not any(
        isinstance(e, dict) and e.get("url") == CONTACTPOINT_EXTENSION
        for e in point.get("extension") or []
    ):
        point["extension"] = [
            *(point.get("extension") or []),
            {"url": CONTACTPOINT_EXTENSION, "valueString": extension},
        ]


def patient_emails(patient: Mapping[str, Any]) -> list[str]:
    """The valid emails of a Patient (normalized by :func:`normalize_patient`): the
    matching keys. An email kept as exported because it is not one (``n/a``, ``none``,
    shared by many records of an old system) would join unrelated patients."""
    emails = []
    for point in patient.get("telecom") or []:
        if isinstance(point, dict) and point.get("system") == "email":
            value = point.get("value")
            try:
                if isinstance(value, str) and normalize.normalize_email(value) == value:
                    emails.append(value)
            except (MappingError, MappingErrors):
                continue
    return emails
