"""Data for the FHIR face's tests: two intakes and a checkout stored through the API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests import samples

FHIR_JSON = "application/fhir+json"


@dataclass
class Stored:
    """What the fixture stored: the intakes' answers and the checkout's."""

    intake: dict[str, Any]
    intake_out: dict[str, Any]
    other: dict[str, Any]
    other_out: dict[str, Any]
    checkout_out: dict[str, Any]

    @property
    def patient_id(self) -> str:
        """The first intake's Patient id."""
        return str(self.intake_out["patient"]["id"])


@pytest.fixture
async def stored(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> Stored:
    """Two intakes (two people) and a canonical checkout (a third Patient record)."""
    first = samples.intake()
    r = await client.post("/v1/intake-submissions", json=first, headers=admin_headers)
    assert r.status_code == 202, r.text
    second = samples.intake()
    second["patient"]["first_name"] = "Élodie"
    second["patient"]["last_name"] = "Brontë"
    second["patient"]["birth_date"] = "02/03/1975"
    second["patient"]["phone"] = "(212) 555-0142"
    r2 = await client.post("/v1/intake-submissions", json=second, headers=admin_headers)
    assert r2.status_code == 202, r2.text
    r3 = await client.post(
        "/v1/checkouts", json=samples.canonical_checkout(), headers=admin_headers
    )
    assert r3.status_code in (200, 202), r3.text
    return Stored(first, r.json(), second, r2.json(), r3.json())
