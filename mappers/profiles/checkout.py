"""Checkout profiles (``profiles/checkout/*.yaml``).

Two things live here, in one file or several:

* ``processors``: where each canonical checkout field is found in a payment processor's
  payload (Stripe ``checkout.session.completed`` today), as dotted paths (``data.object.id``,
  ``data.object.metadata.plan``, list indexes as ``items[0]``), plus which attribution
  fields to keep and which Patient elements a checkout owns;
* ``plans``: plan id -> the treatment it requests (RxNorm coding, dose form, dosage
  instruction, quantity, refills, supply), the "medication table".

The canonical checkout JSON (``POST /v1/checkouts``) is our own contract
(:class:`mappers.checkout.CanonicalCheckout`) and needs no paths.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from mappers.profiles.common import FHIR_ID, SLUG, Coding, Quantity, Strict
from mappers.profiles.intake import PatientElement

#: Canonical checkout fields a processor mapping can fill.
CheckoutField = Literal[
    "checkout_id",
    "completed_at",
    "plan",
    "patient_external_id",
    "intake_submission_id",
    "customer_id",
    "customer.name",
    "customer.email",
    "customer.phone",
    "customer.address.line1",
    "customer.address.line2",
    "customer.address.city",
    "customer.address.state",
    "customer.address.postal_code",
    "customer.address.country",
    "amount_total",
    "currency",
    "mode",
    "payment_status",
]

AttributionField = Literal["utm_source", "utm_medium", "utm_campaign", "gclid", "fbclid"]

#: The case event a checkout sends, by what it means for payment
#: (:func:`mappers.checkout.payment_outcome`): the workflow profile must let ``checkout``
#: send both (lint ``checkout-event-not-in-workflow``).
PAYMENT_EVENTS: dict[Literal["paid", "deferred"], str] = {
    "paid": "payment_completed",
    "deferred": "payment_deferred",
}


_PATH_PATTERN = r"^[A-Za-z0-9_\-]+(\[\d+\])?(\.[A-Za-z0-9_\-]+(\[\d+\])?)*$"


class FieldPath(Strict):
    """A path into the processor payload and how to read the value there."""

    path: str = Field(pattern=_PATH_PATTERN)
    fallback: list[Annotated[str, Field(pattern=_PATH_PATTERN)]] = Field(
        default_factory=list,
        description="Paths read in order when the value at `path` is absent, null or empty "
        "(Stripe: `individual_name`, then `name`, which holds the business name when one "
        "was collected).",
    )
    format: Literal["as_is", "unix_seconds"] = Field(
        default="as_is", description="unix_seconds: an integer Unix time -> ISO 8601 UTC"
    )

    @property
    def paths(self) -> list[str]:
        """``path`` and then the fallbacks, in the order they are tried."""
        return [self.path, *self.fallback]


@lru_cache(maxsize=1024)
def _plain_path(path: str) -> FieldPath:
    """A path written as a plain string, as a (frozen, shared) :class:`FieldPath`."""
    return FieldPath(path=path)


class Processor(Strict):
    """How to read one processor's checkout events."""

    event_types: list[str] = Field(
        default_factory=list, description="Event ``type`` values that are checkouts."
    )
    fields: dict[CheckoutField, str | FieldPath]
    attribution: dict[AttributionField, str] = Field(
        default_factory=dict,
        description="Attribution fields to keep with the message (never sent to an EHR).",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="Payload paths (or path prefixes) deliberately not mapped; "
        "`profiles check` reports other unmapped fields of the examples.",
    )

    def path_of(self, name: str) -> FieldPath | None:
        """The path of canonical field ``name``, or None."""
        value = self.fields.get(name)  # type: ignore[call-overload]
        if value is None:
            return None
        return value if isinstance(value, FieldPath) else _plain_path(value)

    @model_validator(mode="after")
    def _required(self) -> Processor:
        missing = [
            f
            for f in (
                "checkout_id",
                "completed_at",
                "plan",
                "amount_total",
                "currency",
                "payment_status",
            )
            if f not in self.fields
        ]
        if missing:
            raise ValueError(f"fields needs {', '.join(missing)}")
        return self


class DosageSpec(Strict):
    """A dosage instruction (https://hl7.org/fhir/R4/dosage.html)."""

    text: str
    route: Coding | None = None
    dose: Quantity | None = None
    frequency: int | None = None
    period: float | None = None
    period_unit: Literal["s", "min", "h", "d", "wk", "mo", "a"] | None = None

    def to_fhir(self) -> dict[str, Any]:
        """The Dosage as FHIR JSON."""
        out: dict[str, Any] = {"text": self.text}
        if self.frequency and self.period and self.period_unit:
            period: float | int = int(self.period) if self.period.is_integer() else self.period
            out["timing"] = {
                "repeat": {
                    "frequency": self.frequency,
                    "period": period,
                    "periodUnit": self.period_unit,
                }
            }
        if self.route:
            out["route"] = {"coding": [self.route.to_fhir()], "text": self.route.display}
        if self.dose:
            out["doseAndRate"] = [{"doseQuantity": self.dose.to_fhir()}]
        return out


class Plan(Strict):
    """One purchasable plan and the treatment it requests (awaiting provider review).

    ``medication`` is optional in the schema so that the lint can name a plan without one
    (``plan-without-medication``) instead of a bare schema error.
    """

    program: Annotated[str, Field(pattern=SLUG)]
    medication: Coding | None = None
    medication_text: str | None = None
    dose_form: Coding | None = Field(
        default=None, description="SNOMED CT / RxNorm dose form; sent as a contained Medication."
    )
    dosage: DosageSpec | None = None
    quantity: Quantity | None = None
    refills: int | None = Field(default=None, ge=0)
    supply_days: int | None = Field(default=None, gt=0)
    deferred_payment: Literal["medication_request", "no_medication_request"] = Field(
        default="medication_request",
        description="A checkout that charges nothing now (Stripe setup mode: a payment "
        "method saved; or a subscription whose first charge is later): medication_request "
        "sends the plan's MedicationRequest as for a paid checkout (a subscription billed "
        "later); no_medication_request sends the Patient only. Either way the case event is "
        "payment_deferred.",
    )


class CheckoutPatientRules(Strict):
    """Which Patient elements a checkout owns when it disagrees with another source."""

    owns: list[PatientElement] = Field(default_factory=list)


class CheckoutProfile(Strict):
    """Processor field paths and/or a plan table."""

    kind: Literal["checkout"] = "checkout"
    id: Annotated[str, Field(pattern=FHIR_ID)]
    version: str
    processors: dict[Annotated[str, Field(pattern=SLUG)], Processor] = Field(default_factory=dict)
    patient: CheckoutPatientRules = Field(default_factory=CheckoutPatientRules)
    plans: dict[str, Plan] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _not_empty(self) -> CheckoutProfile:
        if not self.processors and not self.plans:
            raise ValueError("a checkout profile needs processors or plans")
        return self
