"""Per-EHR overrides applied through build_transaction_bundle's transform hook."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers.bundle import build_transaction_bundle
from mappers.ehr_overrides import received_types, target_transform
from mappers.pipeline import EXAMPLE_SYSTEMS, checkout_payload, map_checkout, map_intake
from mappers.profiles import EhrTargetProfile, ProfileSet, load_profiles


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_profiles(BUNDLED_PROFILES_DIR)


def _resources(profiles: ProfileSet) -> list[dict[str, Any]]:
    intake = json.loads(
        (
            BUNDLED_PROFILES_DIR
            / "intake/glp1-weight-management-v1.examples/contraindications.input.json"
        ).read_text()
    )
    mapped = map_intake(
        intake, profiles, systems=EXAMPLE_SYSTEMS, patient_id="p1", response_id="q1"
    )
    event = json.loads(
        (BUNDLED_PROFILES_DIR / "checkout/glp1-plans.examples/stripe.input.json").read_text()
    )
    checkout = map_checkout(
        checkout_payload(event, profiles, kind="stripe"),
        profiles,
        systems=EXAMPLE_SYSTEMS,
        patient_id="p1",
        request_id="m1",
    )
    provenance = {
        "resourceType": "Provenance",
        "id": "v1",
        "target": [{"reference": f"{r['resourceType']}/{r['id']}"} for r in mapped.resources],
        "recorded": "2026-01-01T00:00:00Z",
        "agent": [{"who": {"display": "gw"}}],
    }
    return [*mapped.resources, checkout.medication_request, provenance]


def _bundle(
    profiles: ProfileSet, target: EhrTargetProfile, sent: list[dict[str, Any]]
) -> dict[str, Any]:
    refs = {f"{r['resourceType']}/{r['id']}" for r in sent}
    return build_transaction_bundle(
        sent,
        remote_ids={},
        outside_identifiers={"Consent/x": ("s", "v")},
        provenance_tag_system="urn:tag",
        transform=target_transform(target, profiles.concept_maps),
    ) | {"_refs": sorted(refs)}


def test_acme_overrides(profiles: ProfileSet) -> None:
    target = profiles.ehr["acme-clinic-ehr"]
    assert "Consent" not in received_types(target)
    resources = _resources(profiles)
    sent = [r for r in resources if r["resourceType"] in received_types(target)]
    bundle = _bundle(profiles, target, sent)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in bundle["entry"]:
        by_type.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    patient = by_type["Patient"][0]
    # our identifier first (ifNoneExist dedupes on it), the EHR's system added
    assert [i["system"] for i in patient["identifier"]] == [
        "https://fhir-gateway.example.org/sid/patient-id",
        "https://fhir-gateway.example.org/sid/external-patient-id",
        "https://ehr.acme-clinic.example/fhir/sid/telehealth-member-id",
    ]
    assert patient["identifier"][2]["value"] == patient["identifier"][1]["value"]
    assert {
        "url": "https://ehr.acme-clinic.example/fhir/StructureDefinition/source-system",
        "valueString": "fhir-gateway",
    } in patient["extension"]
    mr = by_type["MedicationRequest"][0]
    codes = [c["code"] for c in mr["medicationCodeableConcept"]["coding"]]
    assert codes == ["1991306", "ACME-SEMA-025"]
    assert mr["extension"][0]["valueCode"] == "telehealth-checkout"
    # the Provenance no longer points at the Consents this EHR does not receive
    prov = by_type["Provenance"][0]
    assert not any(t["reference"].startswith("Consent") for t in prov["target"])
    assert len(prov["target"]) == len(sent) - 2  # minus the MedicationRequest and itself
    assert bundle["entry"][0]["request"]["ifNoneExist"].startswith(
        "identifier=https://fhir-gateway.example.org/sid/patient-id|"
    )


def test_replace_mode_and_element_paths(profiles: ProfileSet, tmp_path: Any) -> None:
    from tests.support.profiles import ACME, copy_profiles, edit_yaml

    root = copy_profiles(tmp_path / "p")

    def change(d: dict[str, Any]) -> None:
        d["overrides"]["code_translations"] = [
            {
                "concept_map": "acme-formulary",
                "mode": "replace",
                "elements": ["MedicationRequest.medicationCodeableConcept"],
            }
        ]

    edit_yaml(root / ACME, change)
    profiles = load_profiles(root)
    transform = target_transform(profiles.ehr["acme-clinic-ehr"], profiles.concept_maps)
    mr = next(r for r in _resources(profiles) if r["resourceType"] == "MedicationRequest")
    out = transform(json.loads(json.dumps(mr)))
    assert [c["code"] for c in out["medicationCodeableConcept"]["coding"]] == ["ACME-SEMA-025"]


def test_no_overrides_changes_nothing(profiles: ProfileSet) -> None:
    target = profiles.ehr["example-ehr"]
    resources = [r for r in _resources(profiles) if r["resourceType"] in received_types(target)]
    with_hook = build_transaction_bundle(
        resources,
        remote_ids={},
        outside_identifiers={},
        provenance_tag_system="t",
        transform=target_transform(target, profiles.concept_maps),
    )
    plain = build_transaction_bundle(
        resources, remote_ids={}, outside_identifiers={}, provenance_tag_system="t"
    )
    prov_hook = with_hook["entry"][-1]["resource"]
    prov_plain = plain["entry"][-1]["resource"]
    # only references to types this target does not receive (Observation, Consent) go
    kept = [
        t
        for t in prov_plain["target"]
        if t["reference"].split("/")[0] in received_types(target)
        or t["reference"].startswith("urn:")
    ]
    assert prov_hook["target"] == kept
    assert with_hook["entry"][:-1] == plain["entry"][:-1]
