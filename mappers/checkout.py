"""Checkouts (Stripe Checkout Sessions or our canonical JSON) -> Patient + MedicationRequest.

Two inbound forms carry the same facts:

* Stripe's ``checkout.session.completed`` event (https://docs.stripe.com/api/checkout/sessions/object):
  ``customer_details`` (name, email, phone, address), ``metadata`` (``plan``,
  ``patient_external_id``, ``intake_submission_id``), ``amount_total`` (minor units),
  ``currency``, ``mode``, ``payment_status``; :func:`stripe_session_to_checkout` turns it into
* :class:`CanonicalCheckout`, the body of ``POST /v1/checkouts`` for other processors.

What a checkout means for payment (:func:`payment_outcome`; Stripe's ``mode`` and
``payment_status``):

============  ======================  ==================  =================================
mode          payment_status          outcome             resources, case event
============  ======================  ==================  =================================
payment,      paid                    ``paid``            Patient + MedicationRequest,
subscription                                              ``payment_completed``
payment       no_payment_required     ``paid``            as paid (nothing is owed, e.g. a
                                                          100% discount)
subscription  no_payment_required     ``deferred``        per the plan's ``deferred_payment``
                                                          (a trial: the first charge is later)
setup         no_payment_required     ``deferred``        per the plan's ``deferred_payment``
                                                          (a payment method saved, no charge)
any           unpaid                  ``awaiting_payment``  nothing yet: the
                                                          ``async_payment_succeeded`` event
                                                          brings the resources
============  ======================  ==================  =================================

A ``deferred`` checkout maps by its plan's ``deferred_payment``: ``medication_request`` (the
default: the same draft proposal as a paid one, a subscription billed later) or
``no_medication_request`` (the Patient only); either way the case event is
``payment_deferred``.

Where each canonical field is in a processor's payload is profile data (a checkout
profile's ``processors.<name>.fields``, dotted paths); :func:`processor_payload_to_checkout`
reads a payload with those paths. :data:`DEFAULT_STRIPE_PROCESSOR` is the Stripe mapping the
bundled ``profiles/checkout/processors.yaml`` starts from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from mappers import normalize
from mappers.errors import MappingError, MappingErrors, Problem
from mappers.identifiers import IdentifierSystems
from mappers.intake import (
    ID_PATTERN,
    US_CORE_PATIENT,
    Attribution,
    Email,
    Name,
    Phone,
    pydantic_problems,
    refuse_numeric_zip,
)
from mappers.patient import phone_contact_point
from mappers.profiles import FieldPath, Plan, Processor

US_CORE_MEDICATIONREQUEST = (
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-medicationrequest"
)

PaymentStatus = Literal["paid", "unpaid", "no_payment_required"]
#: Stripe Checkout Session ``mode``: one charge, recurring charges, or a payment method saved
#: for later charges (https://docs.stripe.com/api/checkout/sessions/object#checkout_session_object-mode).
CheckoutMode = Literal["payment", "subscription", "setup"]
#: What a checkout means for payment (:func:`payment_outcome`).
PaymentOutcome = Literal["paid", "deferred", "awaiting_payment"]


class CheckoutAddress(BaseModel):
    """A billing/shipping address; ``state`` is normalized to USPS when ``country`` is US."""

    model_config = ConfigDict(extra="forbid")

    line1: str | None = Field(default=None, max_length=200)
    line2: str | None = Field(default=None, max_length=200)
    city: str | None = Field(default=None, max_length=100)
    state: str | None = Field(default=None, max_length=100)
    postal_code: Annotated[str, BeforeValidator(refuse_numeric_zip)] | None = Field(
        default=None, max_length=20
    )
    country: str = Field(default="US", pattern=r"^[A-Z]{2}$")


class CheckoutCustomer(BaseModel):
    """The buyer as the processor collected them (a single ``name`` string, as Stripe)."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    email: Email | None = None
    phone: Phone | None = None
    address: CheckoutAddress | None = None


class CanonicalCheckout(BaseModel):
    """A completed checkout (``POST /v1/checkouts``), processor-neutral."""

    model_config = ConfigDict(extra="forbid")

    checkout_id: str = Field(
        pattern=ID_PATTERN, description="The processor's checkout/session id; idempotency key."
    )
    processor: str = Field(default="canonical", pattern=r"^[a-z0-9_-]{1,32}$")
    completed_at: AwareDatetime
    plan: str = Field(min_length=1, max_length=128)
    patient_external_id: str | None = Field(default=None, pattern=ID_PATTERN)
    intake_submission_id: str | None = Field(default=None, pattern=ID_PATTERN)
    customer_id: str | None = Field(default=None, max_length=128)
    customer: CheckoutCustomer = Field(default_factory=CheckoutCustomer)
    mode: CheckoutMode = Field(
        default="payment",
        description="payment (one charge), subscription (recurring charges) or setup (a "
        "payment method saved, nothing charged), as Stripe's Checkout Session mode.",
    )
    amount_total: int | None = Field(
        default=None,
        ge=0,
        description="Minor currency units (cents); required unless mode is setup.",
    )
    currency: Annotated[str, AfterValidator(str.lower)] | None = Field(
        default=None,
        pattern=r"^[A-Za-z]{3}$",
        description="ISO 4217 code; required unless mode is setup.",
    )
    payment_status: PaymentStatus = Field(
        description="paid; unpaid (an asynchronous payment still clearing); "
        "no_payment_required (nothing owed, a trial, or setup mode)."
    )
    attribution: Attribution | None = Field(
        default=None,
        description="Marketing attribution; kept with the message, never sent to EHRs.",
    )


def parse_checkout(
    data: Any, find_plan: Callable[[str], Plan | None]
) -> tuple[CanonicalCheckout, Plan]:
    """Validate a canonical checkout and find its plan.

    Raises:
        MappingErrors: every problem (contract, normalization, unknown plan, a US address
        with an invalid state or ZIP, no way to identify the patient).
    """
    problems: list[Problem] = []
    checkout: CanonicalCheckout | None = None
    try:
        checkout = CanonicalCheckout.model_validate(data)
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc))
    plan_id = data.get("plan") if isinstance(data, dict) else None
    plan = find_plan(plan_id) if isinstance(plan_id, str) else None
    if isinstance(plan_id, str) and plan is None:
        problems.append(Problem("plan", "unknown_plan", "no checkout profile has this plan"))
    if checkout is not None:
        problems.extend(_payment_problems(checkout))
        problems.extend(_address_problems(checkout))
        c = checkout.customer
        if not (checkout.patient_external_id or checkout.intake_submission_id or c.email):
            problems.append(
                Problem(
                    "customer.email",
                    "unidentified_patient",
                    "need patient_external_id, intake_submission_id or a customer email",
                )
            )
    if problems:
        raise MappingErrors(problems)
    assert checkout is not None and plan is not None
    return checkout, plan


def payment_outcome(checkout: CanonicalCheckout) -> PaymentOutcome:
    """What a checkout means for payment, from its ``mode`` and ``payment_status`` (table in
    the module docstring; Stripe: "no_payment_required: the payment is delayed to a future
    date, or the Checkout Session is in setup mode and doesn't require a payment at this
    time").

    Returns:
        ``paid``, ``deferred`` (nothing charged now: setup mode, or a subscription whose
        first charge is later) or ``awaiting_payment`` (``unpaid``).
    """
    if checkout.payment_status == "unpaid":
        return "awaiting_payment"
    if checkout.payment_status == "paid" or checkout.mode == "payment":
        return "paid"
    return "deferred"


def _payment_problems(checkout: CanonicalCheckout) -> list[Problem]:
    problems: list[Problem] = []
    if checkout.mode == "setup":
        if checkout.payment_status != "no_payment_required":
            problems.append(
                Problem(
                    "payment_status",
                    "invalid_for_mode",
                    "a setup-mode checkout charges nothing: payment_status must be "
                    "no_payment_required",
                )
            )
        return problems
    for name in ("amount_total", "currency"):
        if getattr(checkout, name) is None:
            problems.append(Problem(name, "missing", "Field required (unless mode is setup)"))
    return problems


def _address_problems(checkout: CanonicalCheckout) -> list[Problem]:
    address = checkout.customer.address
    problems: list[Problem] = []
    if address is None or address.country != "US":
        return problems
    if address.state:
        try:
            address.state = normalize.normalize_state(address.state)
        except MappingError as exc:
            problems.append(Problem("customer.address.state", exc.code, str(exc)))
    if address.postal_code:
        try:
            address.postal_code = normalize.normalize_postal_code(address.postal_code)
        except MappingError as exc:
            problems.append(Problem("customer.address.postal_code", exc.code, str(exc)))
    return problems


#: The Stripe ``checkout.session.completed`` mapping
#: (https://docs.stripe.com/api/checkout/sessions/object).
DEFAULT_STRIPE_PROCESSOR = Processor(
    event_types=["checkout.session.completed", "checkout.session.async_payment_succeeded"],
    fields={
        "checkout_id": "data.object.id",
        "completed_at": FieldPath(path="created", format="unix_seconds"),
        "plan": "data.object.metadata.plan",
        "patient_external_id": "data.object.metadata.patient_external_id",
        "intake_submission_id": "data.object.metadata.intake_submission_id",
        "customer_id": "data.object.customer",
        # individual_name (name collection, API 2025-09-30.clover) is the person; name
        # holds the business name when one was collected.
        "customer.name": FieldPath(
            path="data.object.customer_details.individual_name",
            fallback=["data.object.customer_details.name"],
        ),
        "customer.email": "data.object.customer_details.email",
        "customer.phone": "data.object.customer_details.phone",
        "customer.address.line1": "data.object.customer_details.address.line1",
        "customer.address.line2": "data.object.customer_details.address.line2",
        "customer.address.city": "data.object.customer_details.address.city",
        "customer.address.state": "data.object.customer_details.address.state",
        "customer.address.postal_code": "data.object.customer_details.address.postal_code",
        "customer.address.country": "data.object.customer_details.address.country",
        "amount_total": "data.object.amount_total",
        "currency": "data.object.currency",
        "mode": "data.object.mode",
        "payment_status": "data.object.payment_status",
    },
)

_SEGMENT = re.compile(r"^([A-Za-z0-9_\-]+)(?:\[(\d+)\])?$")


@lru_cache(maxsize=1024)
def _segments(path: str) -> tuple[tuple[str, int | None], ...] | None:
    """A profile's dotted path, parsed once: ``(key, list index or None)`` per segment."""
    out = []
    for segment in path.split("."):
        match = _SEGMENT.match(segment)
        if match is None:
            return None
        index = match.group(2)
        out.append((match.group(1), None if index is None else int(index)))
    return tuple(out)


def read_path(payload: Any, path: str) -> Any:
    """The value at a dotted path (``data.object.items[0].price``), or None when absent."""
    segments = _segments(path)
    if segments is None:
        return None
    node = payload
    for key, index in segments:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
        if index is not None:
            if not isinstance(node, list) or index >= len(node):
                return None
            node = node[index]
    return node


def processor_payload_to_checkout(
    payload: dict[str, Any], processor: Processor, *, processor_name: str
) -> dict[str, Any]:
    """A processor's event -> the canonical checkout JSON (not yet validated: pass it to
    :func:`parse_checkout`).

    Each canonical field is read at its profile path (then its ``fallback`` paths, while
    the value is absent, null or empty); ``unix_seconds`` turns an integer
    Unix time into ISO 8601 UTC; empty strings (Stripe sends ``""`` for absent address
    parts) become absent. Attribution fields are copied under ``attribution``.
    """
    out: dict[str, Any] = {"processor": processor_name}
    for name in processor.fields:
        spec = processor.path_of(name)
        if spec is None:
            continue
        value = None
        for path in spec.paths:
            value = read_path(payload, path)
            if value not in ("", None):
                break
        if spec.format == "unix_seconds":
            value = (
                datetime.fromtimestamp(value, UTC).isoformat()
                if isinstance(value, int) and not isinstance(value, bool)
                else None
            )
        if value in ("", None):
            continue
        target = out
        parts = name.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    attribution = {
        k: v
        for k, path in processor.attribution.items()
        if isinstance(v := read_path(payload, path), str) and v
    }
    if attribution:
        out["attribution"] = attribution
    out.setdefault("customer", {})
    return out


def processor_paths(processor: Processor) -> list[str]:
    """Every payload path the processor mapping reads (for unmapped-field coverage)."""
    paths = [
        path
        for n in processor.fields
        if (p := processor.path_of(n)) is not None
        for path in p.paths
    ]
    return [*paths, *processor.attribution.values()]


def stripe_session_to_checkout(
    event: dict[str, Any], processor: Processor | None = None
) -> dict[str, Any]:
    """A Stripe ``checkout.session.completed`` (or ``async_payment_succeeded``) event ->
    the canonical checkout JSON, with ``processor`` (a profile's ``processors.stripe``) or
    :data:`DEFAULT_STRIPE_PROCESSOR`.

    ``completed_at`` is the event's ``created`` (Unix seconds, UTC). Empty strings Stripe
    sends for absent address parts become absent.
    """
    return processor_payload_to_checkout(
        event, processor or DEFAULT_STRIPE_PROCESSOR, processor_name="stripe"
    )


def split_name(full: str) -> dict[str, Any]:
    """``"Jane Q. Doe"`` -> ``{"text": ..., "family": "Doe", "given": ["Jane", "Q."]}``.

    A processor's single name field has no structure; the last word is taken as the
    family name and ``text`` keeps the name as given. One word becomes ``given`` only.
    """
    parts = full.split()
    name: dict[str, Any] = {"use": "official", "text": full}
    if len(parts) == 1:
        name["given"] = parts
    elif parts:
        name["family"] = parts[-1]
        name["given"] = parts[:-1]
    return name


def checkout_to_patient(
    checkout: CanonicalCheckout, *, patient_id: str, systems: IdentifierSystems
) -> dict[str, Any]:
    """Checkout customer details -> a US Core Patient (R4 JSON).

    A checkout carries no sex or birth date: ``gender`` is ``unknown`` (US Core requires
    it), ``birthDate`` absent, until an intake brings them. The Stripe customer id, when
    present, is kept as an identifier.
    """
    c = checkout.customer
    identifiers = [{"system": systems.patient, "value": patient_id}]
    if checkout.patient_external_id:
        identifiers.append(
            {"system": systems.external_patient, "value": checkout.patient_external_id}
        )
    if checkout.customer_id and checkout.processor == "stripe":
        identifiers.append({"system": systems.stripe_customer, "value": checkout.customer_id})
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient_id,
        "meta": {"profile": [US_CORE_PATIENT]},
        "identifier": identifiers,
        "name": [split_name(c.name)]
        if c.name
        else [
            # us-core-6: a name is required; without one, say why it is absent.
            {"extension": [_data_absent("unknown")]}
        ],
        "gender": "unknown",
    }
    telecom = []
    if c.phone:
        telecom.append(phone_contact_point(c.phone))
    if c.email:
        telecom.append({"system": "email", "value": c.email})
    if telecom:
        patient["telecom"] = telecom
    if c.address and (c.address.line1 or c.address.city or c.address.postal_code):
        address: dict[str, Any] = {"use": "billing", "type": "both"}
        lines = [x for x in (c.address.line1, c.address.line2) if x]
        if lines:
            address["line"] = lines
        if c.address.city:
            address["city"] = c.address.city
        if c.address.state:
            address["state"] = c.address.state
        if c.address.postal_code:
            address["postalCode"] = c.address.postal_code
        address["country"] = c.address.country
        patient["address"] = [address]
    return patient


def _data_absent(reason: str) -> dict[str, str]:
    return {
        "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
        "valueCode": reason,
    }


def checkout_to_medication_request(
    checkout: CanonicalCheckout,
    plan: Plan,
    *,
    request_id: str,
    patient_id: str,
    systems: IdentifierSystems,
    questionnaire_response_id: str | None = None,
) -> dict[str, Any]:
    """The plan the patient paid for -> a MedicationRequest awaiting provider review.

    ``status = draft`` and ``intent = proposal`` (FHIR R4 medicationrequest-status /
    -intent): the patient *selected* a treatment; no prescriber has authorised it.
    ``proposal`` is "a suggestion made by someone/something that doesn't have an intention
    to ensure it occurs and without providing an authorization to act", and ``draft`` is
    "not yet actionable ... requires sign-off". An ``order`` would need a prescriber as
    ``requester`` (US Core us-core-21); here the requester is the Patient, as US Core
    advises for patient-selected medications. When the provider signs, the EHR creates
    its own ``order`` (``basedOn`` this proposal).

    ``identifier`` is ``<base>/checkout-session|<checkout_id>``; ``authoredOn`` the
    checkout's completion time; ``medicationCodeableConcept`` the plan's RxNorm coding;
    ``supportingInformation`` the intake's QuestionnaireResponse when it is known.
    """
    patient_ref = {"reference": f"Patient/{patient_id}"}
    if plan.medication is None:  # refused by the profile lint (plan-without-medication)
        raise MappingError("plan_without_medication", "the plan has no medication")
    med = plan.medication.to_fhir()
    mr: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": request_id,
        "meta": {"profile": [US_CORE_MEDICATIONREQUEST]},
        "identifier": [{"system": systems.checkout, "value": checkout.checkout_id}],
        "status": "draft",
        "intent": "proposal",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                        "code": "community",
                        "display": "Community",
                    }
                ]
            }
        ],
        "reportedBoolean": False,
        "subject": patient_ref,
        "authoredOn": normalize.to_fhir_instant(checkout.completed_at),
        "requester": patient_ref,
    }
    concept = {"coding": [med], "text": plan.medication_text or med.get("display", med["code"])}
    if plan.dose_form is not None:
        # R4 keeps the dose form on Medication.form: a contained Medication carries it.
        mr["contained"] = [
            {
                "resourceType": "Medication",
                "id": "med",
                "code": concept,
                "form": {"coding": [plan.dose_form.to_fhir()], "text": plan.dose_form.display},
            }
        ]
        mr["medicationReference"] = {"reference": "#med", "display": concept["text"]}
    else:
        mr["medicationCodeableConcept"] = concept
    if questionnaire_response_id:
        mr["supportingInformation"] = [
            {"reference": f"QuestionnaireResponse/{questionnaire_response_id}"}
        ]
    if plan.dosage:
        mr["dosageInstruction"] = [plan.dosage.to_fhir()]
    dispense: dict[str, Any] = {}
    if plan.refills is not None:
        dispense["numberOfRepeatsAllowed"] = plan.refills
    if plan.quantity:
        dispense["quantity"] = plan.quantity.to_fhir()
    if plan.supply_days:
        dispense["expectedSupplyDuration"] = {
            "value": plan.supply_days,
            "unit": "days",
            "system": "http://unitsofmeasure.org",
            "code": "d",
        }
    if dispense:
        mr["dispenseRequest"] = dispense
    return mr
