"""The validation memo (``mappers.fastvalidate``) keeps no PHI: after real intakes and
checkouts, none of the patients' names, contact details, dates, identifiers or free-text
answers is in any memo key or entry (memoized subtrees are profile codings, local
references and closed answers only)."""

from __future__ import annotations

import httpx

from mappers import fastvalidate
from tests import samples

PHI = {
    "first_name": "Zyxwquorth",
    "last_name": "Plimbertonsky",
    "email": "zyx.plimb@example.org",
    "phone": "(415) 555-0199",
    "birth_date": "07/19/1979",
    "line1": "742 Evergreen Terrace",
    "external_id": "app-user-phi-4242",
    "medications": "Qwertizumab 5 mg weekly",
    "allergies": "Fnordillin",
}


def _needles() -> list[str]:
    return [
        PHI["first_name"],
        PHI["last_name"],
        PHI["email"],
        "555-0199",
        "5550199",
        "1979-07-19",
        "Evergreen",
        PHI["external_id"],
        "Qwertizumab",
        "Fnordillin",
    ]


async def test_the_validation_memo_keeps_no_phi(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    intake = samples.intake()
    patient = intake["patient"]
    patient.update(
        first_name=PHI["first_name"],
        last_name=PHI["last_name"],
        email=PHI["email"],
        phone=PHI["phone"],
        birth_date=PHI["birth_date"],
        external_id=PHI["external_id"],
    )
    patient["address"]["line1"] = PHI["line1"]
    intake["answers"].update(current_medications=PHI["medications"], allergies=PHI["allergies"])
    r = await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
    assert r.status_code == 202, r.text
    checkout = samples.canonical_checkout(patient_external_id=PHI["external_id"])
    checkout["customer"].update(
        name=f"{PHI['first_name']} {PHI['last_name']}", email=PHI["email"], phone=PHI["phone"]
    )
    checkout["customer"]["address"]["line1"] = PHI["line1"]
    r = await client.post("/v1/checkouts", json=checkout, headers=admin_headers)
    assert r.status_code == 202, r.text

    assert fastvalidate._memo, "the requests went through the memoized validation"
    kept = repr(list(fastvalidate._memo.items()))
    for needle in _needles():
        assert needle not in kept, needle
