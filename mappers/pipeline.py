"""The whole mapping of one inbound payload, as pure functions over a profile set.

The gateway's ingest (with ids from its database), ``profiles preview`` and the
``/v1/profiles/preview`` endpoint (with placeholder ids, writing nothing), the golden
example runner and the benchmark all call these, so what is previewed and tested is what
is stored.

* :func:`map_intake`: an intake submission -> Patient, QuestionnaireResponse and the
  derived Observations, Flags and Consents;
* :func:`checkout_payload`: a Stripe event or a canonical checkout -> canonical JSON
  (via the profile's processor paths);
* :func:`map_checkout`: canonical JSON -> Patient and MedicationRequest;
* :func:`preview`: any of them -> a ``collection`` Bundle with a Provenance and every
  validation issue.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from mappers.checkout import (
    CanonicalCheckout,
    checkout_to_medication_request,
    checkout_to_patient,
    parse_checkout,
    payment_outcome,
    stripe_session_to_checkout,
)
from mappers.derived import intake_to_derived
from mappers.errors import MappingError, MappingErrors, Problem
from mappers.identifiers import IdentifierSystems
from mappers.intake import (
    ParsedIntake,
    intake_to_patient,
    intake_to_questionnaire_response,
    parse_intake_submission,
)
from mappers.profiles import CheckoutProfile, Plan, ProfileSet
from mappers.profiles.checkout import PAYMENT_EVENTS
from mappers.provenance import provenance_for
from mappers.validation import resource_problems

PayloadKind = Literal["intake", "stripe", "checkout"]

#: The identifier base of previews and golden examples (deployment-independent).
EXAMPLE_SYSTEMS = IdentifierSystems("https://fhir-gateway.example.org/sid")

_PLACEHOLDER_NS = uuid.UUID("0d7c5b1e-3f2a-5e4d-8c6b-a1b2c3d4e5f6")


def placeholder_id(scope: str, name: str) -> str:
    """A stable placeholder id for previews and examples (UUID v5 of ``scope/name``)."""
    return str(uuid.uuid5(_PLACEHOLDER_NS, f"{scope}/{name}"))


@dataclass
class MappedIntake:
    """Everything one intake submission maps to."""

    parsed: ParsedIntake
    patient: dict[str, Any]
    questionnaire_response: dict[str, Any]
    derived: list[dict[str, Any]] = field(default_factory=list)

    @property
    def resources(self) -> list[dict[str, Any]]:
        """Patient, QuestionnaireResponse, then the derived resources."""
        return [self.patient, self.questionnaire_response, *self.derived]


def map_intake(
    data: Any,
    profiles: ProfileSet,
    *,
    systems: IdentifierSystems,
    patient_id: str,
    response_id: str,
    status: Literal["completed", "amended"] = "completed",
) -> MappedIntake:
    """Validate, normalize and map an intake submission (R4 JSON, not yet validated as FHIR).

    Raises:
        MappingErrors: every input problem (see :func:`mappers.intake.parse_intake_submission`).
    """
    parsed = parse_intake_submission(data, profiles.intake_profile, profiles.concept_maps)
    return map_parsed_intake(
        parsed, systems=systems, patient_id=patient_id, response_id=response_id, status=status
    )


def map_parsed_intake(
    parsed: ParsedIntake,
    *,
    systems: IdentifierSystems,
    patient_id: str,
    response_id: str,
    status: Literal["completed", "amended"] = "completed",
) -> MappedIntake:
    """Map an already parsed submission (the gateway parses first to match the patient)."""
    patient = intake_to_patient(
        parsed.submission,
        patient_id=patient_id,
        systems=systems,
        absent=parsed.patient_absent,
        phone_use=parsed.profile.patient.phone_use,
    )
    qr = intake_to_questionnaire_response(
        parsed.submission,
        parsed.profile,
        parsed.items,
        response_id=response_id,
        patient_id=patient_id,
        systems=systems,
        status=status,
    )
    derived = intake_to_derived(parsed, qr, patient_id=patient_id, systems=systems)
    return MappedIntake(parsed, patient, qr, derived)


def payload_kind(data: Any) -> PayloadKind:
    """Guess what a payload is: an intake submission, a Stripe event or a canonical checkout."""
    if isinstance(data, dict):
        if "submission_id" in data or "answers" in data:
            return "intake"
        if data.get("object") == "event" or str(data.get("type", "")).startswith("checkout."):
            return "stripe"
    return "checkout"


def checkout_payload(data: Any, profiles: ProfileSet, *, kind: PayloadKind) -> dict[str, Any]:
    """A Stripe event (via the ``stripe`` processor of the checkout profiles) or a canonical
    checkout -> canonical checkout JSON.

    Raises:
        MappingErrors: ``no_processor`` (no checkout profile declares ``stripe``),
            ``not_a_checkout`` (an event type the processor does not list).
    """
    if kind != "stripe":
        if not isinstance(data, dict):
            raise MappingErrors([Problem("", "type_error", "expected a JSON object")])
        return data
    found = profiles.processor("stripe")
    if found is None:
        raise MappingErrors(
            [Problem("", "no_processor", "no checkout profile declares the stripe processor")]
        )
    processor = found[1]
    if processor.event_types and data.get("type") not in processor.event_types:
        raise MappingErrors(
            [Problem("type", "not_a_checkout", "this event type is not a checkout")]
        )
    return stripe_session_to_checkout(data, processor)


@dataclass
class MappedCheckout:
    """Everything one checkout maps to, and the profiles that mapped it.

    ``payment`` is ``paid`` or ``deferred`` (:func:`mappers.checkout.payment_outcome`; an
    unpaid checkout is mapped as paid, for previews); ``medication_request`` is None for a
    deferred checkout whose plan says ``deferred_payment: no_medication_request``.
    """

    checkout: CanonicalCheckout
    plan: Plan
    plan_profile: CheckoutProfile
    patient: dict[str, Any]
    medication_request: dict[str, Any] | None
    payment: Literal["paid", "deferred"] = "paid"

    @property
    def resources(self) -> list[dict[str, Any]]:
        """Patient, then the MedicationRequest when there is one."""
        return [self.patient, *([self.medication_request] if self.medication_request else [])]

    @property
    def event_type(self) -> str:
        """The case event: ``payment_completed``, or ``payment_deferred``."""
        return PAYMENT_EVENTS[self.payment]


def parse_canonical_checkout(
    data: dict[str, Any], profiles: ProfileSet
) -> tuple[CanonicalCheckout, Plan, CheckoutProfile]:
    """Validate canonical checkout JSON and find its plan and plan profile.

    Raises:
        MappingErrors: every problem (see :func:`mappers.checkout.parse_checkout`).
    """

    def find_plan(plan_id: str) -> Plan | None:
        found = profiles.plan(plan_id)
        return found[1] if found else None

    checkout, plan = parse_checkout(data, find_plan)
    found = profiles.plan(checkout.plan)
    if found is None:  # parse_checkout raised already
        raise MappingErrors([Problem("plan", "unknown_plan", "no checkout profile has this plan")])
    return checkout, plan, found[0]


def map_checkout(
    data: dict[str, Any],
    profiles: ProfileSet,
    *,
    systems: IdentifierSystems,
    patient_id: str,
    request_id: str,
    questionnaire_response_id: str | None = None,
) -> MappedCheckout:
    """Validate a canonical checkout and map it to Patient + MedicationRequest.

    Raises:
        MappingErrors: every input problem.
    """
    checkout, _, plan_profile = parse_canonical_checkout(data, profiles)
    return map_validated_checkout(
        checkout,
        plan_profile,
        systems=systems,
        patient_id=patient_id,
        request_id=request_id,
        questionnaire_response_id=questionnaire_response_id,
    )


def map_validated_checkout(
    checkout: CanonicalCheckout,
    plan_profile: CheckoutProfile,
    *,
    systems: IdentifierSystems,
    patient_id: str,
    request_id: str,
    questionnaire_response_id: str | None = None,
) -> MappedCheckout:
    """Map an already validated checkout whose plan is in ``plan_profile``: the Patient,
    and the MedicationRequest unless the checkout charged nothing and the plan says
    ``deferred_payment: no_medication_request``.

    Raises:
        MappingErrors: ``plan_without_medication`` (prevented by the profile lint).
    """
    plan = plan_profile.plans[checkout.plan]
    payment: Literal["paid", "deferred"] = (
        "deferred" if payment_outcome(checkout) == "deferred" else "paid"
    )
    patient = checkout_to_patient(checkout, patient_id=patient_id, systems=systems)
    if payment == "deferred" and plan.deferred_payment == "no_medication_request":
        return MappedCheckout(checkout, plan, plan_profile, patient, None, payment)
    try:
        mr = checkout_to_medication_request(
            checkout,
            plan,
            request_id=request_id,
            patient_id=patient_id,
            systems=systems,
            questionnaire_response_id=questionnaire_response_id,
        )
    except MappingError as exc:
        raise MappingErrors([exc.at("plan").problem]) from exc
    return MappedCheckout(checkout, plan, plan_profile, patient, mr, payment)


def profile_tag(kind: str, profile_id: str, version: str, content_hash: str) -> str:
    """``<kind>/<id>/<version>#sha256=<hash>``: how Provenance names a mapping profile."""
    return f"{kind}/{profile_id}/{version}#sha256={content_hash}"


@dataclass
class Preview:
    """What the gateway would produce for one payload, without storing anything."""

    kind: PayloadKind
    resources: list[dict[str, Any]]
    problems: list[Problem]
    profile: str | None

    def bundle(self) -> dict[str, Any]:
        """The resources as a ``collection`` Bundle (fullUrl ``urn:uuid:<id>``)."""
        return {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in self.resources],
        }


def preview(
    data: Any,
    profiles: ProfileSet,
    *,
    recorded: datetime,
    organization: str = "Telehealth operator",
    systems: IdentifierSystems = EXAMPLE_SYSTEMS,
    kind: PayloadKind | None = None,
    profile_key: str | None = None,
) -> Preview:
    """Map ``data`` as the gateway would, with placeholder ids, and validate every resource.

    Input problems are returned (no resources); FHIR validation problems are returned with
    the resources (``<Type>.<path>``). Nothing is read from or written to a database: the
    Patient is shown as a new one (no merge with a stored Patient).

    Args:
        profile_key: the intake or checkout profile being previewed
            (:meth:`ProfileSet.key_of_file`: ``intake/<id>/<version>``, ``checkout/<id>``).
            A payload that another profile maps (an intake naming another form version, a
            checkout whose plan another checkout profile holds) is refused with the problem
            ``other_profile`` rather than previewed with that other profile. None, or the
            key of an ``ehr`` or ``workflow`` profile: no such check.
    """
    kind = kind or payload_kind(data)
    scope = "preview"
    refused = _other_profile(data, kind, profile_key)
    if refused is not None:
        return Preview(kind, [], [refused], None)
    patient_id = placeholder_id(scope, "Patient")
    try:
        if kind == "intake":
            mapped_intake = map_intake(
                data,
                profiles,
                systems=systems,
                patient_id=patient_id,
                response_id=placeholder_id(scope, "QuestionnaireResponse"),
            )
            resources = mapped_intake.resources
            p = mapped_intake.parsed.profile
            source = profiles.source_of(f"intake/{p.id}/{p.version}")
            tag = profile_tag("intake", p.id, p.version, source.content_hash if source else "")
            message_id = mapped_intake.parsed.submission.submission_id
            notes = mapped_intake.parsed.notes
        else:
            canonical = checkout_payload(data, profiles, kind=kind)
            mapped = map_checkout(
                canonical,
                profiles,
                systems=systems,
                patient_id=patient_id,
                request_id=placeholder_id(scope, "MedicationRequest"),
            )
            resources = mapped.resources
            cp = mapped.plan_profile
            if _previewing(profile_key, "checkout") and profile_key != f"checkout/{cp.id}":
                return Preview(
                    kind,
                    [],
                    [
                        Problem(
                            "plan_id",
                            "other_profile",
                            f"this checkout's plan is in checkout/{cp.id}, not in the profile "
                            f"previewed ({profile_key}): use a plan of that profile",
                        )
                    ],
                    None,
                )
            source = profiles.source_of(f"checkout/{cp.id}")
            tag = profile_tag("checkout", cp.id, cp.version, source.content_hash if source else "")
            message_id = mapped.checkout.checkout_id
            notes = []
    except MappingErrors as exc:
        return Preview(kind, [], list(exc.problems), None)
    provenance = provenance_for(
        provenance_id=placeholder_id(scope, "Provenance"),
        targets=[f"{r['resourceType']}/{r['id']}" for r in resources],
        recorded=recorded,
        message_id=message_id,
        message_kind=kind,
        systems=systems,
        author=f"Patient/{patient_id}",
        organization=organization,
        profile=tag,
        notes=notes,
    )
    resources = [*resources, provenance]
    problems: list[Problem] = []
    for r in resources:
        problems.extend(resource_problems(r, authoring=True))
    return Preview(kind, resources, problems, tag)


def _previewing(profile_key: str | None, kind: str) -> bool:
    return profile_key is not None and profile_key.startswith(f"{kind}/")


def _other_profile(data: Any, kind: PayloadKind, profile_key: str | None) -> Problem | None:
    """The ``other_profile`` problem when ``data`` is not for the profile previewed (what
    can be told before mapping: the payload's kind, an intake's ``form.id``/``form.version``)."""
    if profile_key is None or not (
        _previewing(profile_key, "intake") or _previewing(profile_key, "checkout")
    ):
        return None
    wanted = "intake" if kind == "intake" else "checkout"
    if not _previewing(profile_key, wanted):
        return Problem(
            "",
            "other_profile",
            f"the input is {'an intake submission' if wanted == 'intake' else 'a checkout'}; "
            f"the profile previewed is {profile_key}",
        )
    if kind != "intake":
        return None
    form = data.get("form") if isinstance(data, dict) else None
    if not isinstance(form, dict):
        return None  # the mapping reports the missing form
    named = f"intake/{form.get('id')}/{form.get('version')}"
    if named != profile_key:
        return Problem(
            "form",
            "other_profile",
            f"the input's form.id and form.version name another profile than the one "
            f"previewed ({profile_key}): set them to that profile's id and version, or "
            "preview the profile the input names",
        )
    return None
