"""Checkout profiles (``profiles/checkout/*.yaml``): plan id -> requested treatment."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from mappers.profiles.common import FHIR_ID, SLUG, Coding, Quantity, Strict


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
    """One purchasable plan and the treatment it requests (awaiting provider review)."""

    program: Annotated[str, Field(pattern=SLUG)]
    medication: Coding
    medication_text: str | None = None
    dosage: DosageSpec | None = None
    quantity: Quantity | None = None
    refills: int | None = Field(default=None, ge=0)
    supply_days: int | None = Field(default=None, gt=0)


class CheckoutProfile(Strict):
    """Plan ids (Stripe ``metadata.plan`` or canonical ``plan``) to requested treatment."""

    kind: Literal["checkout"] = "checkout"
    id: Annotated[str, Field(pattern=FHIR_ID)]
    version: str
    plans: dict[str, Plan]
