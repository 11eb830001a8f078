"""Building blocks shared by every profile kind (FHIR datatypes as profile data)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

FHIR_ID = r"^[A-Za-z0-9\-\.]{1,64}$"
KEY = r"^[a-z][a-z0-9_]*$"
SLUG = r"^[a-z0-9][a-z0-9_-]*$"


class Strict(BaseModel):
    """A frozen model that refuses unknown keys (typos in YAML surface as errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Coding(Strict):
    """A FHIR Coding (https://hl7.org/fhir/R4/datatypes.html#Coding)."""

    system: str
    code: str
    display: str | None = None

    def to_fhir(self) -> dict[str, str]:
        """The Coding as FHIR JSON."""
        out = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


class Quantity(Strict):
    """A UCUM quantity (https://hl7.org/fhir/R4/datatypes.html#Quantity)."""

    value: float
    unit: str
    code: str
    system: str = "http://unitsofmeasure.org"

    def to_fhir(self) -> dict[str, Any]:
        """The Quantity as FHIR JSON (integral values as integers)."""
        value: float | int = int(self.value) if float(self.value).is_integer() else self.value
        return {"value": value, "unit": self.unit, "system": self.system, "code": self.code}
