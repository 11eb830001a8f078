"""Proof: a second intake form (dermatology) and a second EHR target with overrides,
both added as YAML only, work end to end against the local test EHR. The test writes
no Python: it only points the bundled ``acme-clinic-ehr`` profile at the test EHR."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.cli import stripe_signature_header
from gateway.runtime import Runtime
from gateway.settings import BUNDLED_PROFILES_DIR
from gateway.worker import delivery_worker
from testkit.ehr import LocalEhr, RunningEhr, run_ehr_async
from tests import samples
from tests.support.delivery import drain
from tests.support.ehr import EhrFactory
from tests.support.profiles import ACME, copy_profiles, edit_yaml

DERM_INPUT = BUNDLED_PROFILES_DIR / "intake/dermatology-v1.examples/acne.input.json"
ACME_SID = "https://ehr.acme-clinic.example/fhir/sid/telehealth-member-id"
DERM_Q = "https://fhir-gateway.example.org/fhir/Questionnaire/dermatology-intake|1"


@pytest.fixture
async def ehr(make_ehr: EhrFactory) -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    fake = make_ehr(client_id="fhir-gateway", client_secret="acme-s3cret")
    async with run_ehr_async(fake) as running:
        yield fake, running


@pytest.fixture
def profiles_dir(
    tmp_path: Path, ehr: tuple[LocalEhr, RunningEhr], monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.setenv("ACME_EHR_CLIENT_SECRET", "acme-s3cret")
    root = copy_profiles(tmp_path / "profiles")
    running = ehr[1]

    def point_at_test_ehr(d: dict[str, object]) -> None:
        d["enabled"] = True
        d["base_url"] = running.fhir_base
        d["auth"]["token_url"] = running.token_url  # type: ignore[index]
        d["retry"] = {"base_delay_s": 0.01, "max_delay_s": 0.05, "max_attempts": 4}

    edit_yaml(root / ACME, point_at_test_ehr)
    return root


@pytest.mark.slow
async def test_dermatology_form_and_acme_target_need_no_code(
    client: httpx.AsyncClient,
    runtime: Runtime,
    ehr: tuple[LocalEhr, RunningEhr],
    admin_headers: dict[str, str],
) -> None:
    fake, _ = ehr
    worker = delivery_worker(runtime)
    try:
        derm = json.loads(DERM_INPUT.read_text())
        r = await client.post("/v1/intake-submissions", json=derm, headers=admin_headers)
        assert r.status_code == 202, r.text
        assert [d["target"] for d in r.json()["deliveries"]] == ["acme-clinic-ehr"]
        await drain(runtime, worker)

        (qr,) = fake.resources("QuestionnaireResponse")
        assert qr["questionnaire"] == DERM_Q
        (patient,) = fake.resources("Patient")
        member_ids = [i["value"] for i in patient["identifier"] if i["system"] == ACME_SID]
        assert member_ids == [derm["patient"]["external_id"]]
        assert any(e["url"].endswith("/source-system") for e in patient["extension"])
        (flag,) = fake.resources("Flag")  # pregnancy + retinoids rule of the derm profile
        assert flag["code"]["coding"][0]["code"] == "pregnancy-retinoids"
        assert fake.count("Consent") == 0  # skipped by this target's overrides
        (prov,) = fake.resources("Provenance")
        assert all(not t["reference"].startswith("Consent") for t in prov["target"])

        intake = samples.intake()
        r = await client.post("/v1/intake-submissions", json=intake, headers=admin_headers)
        assert r.status_code == 202
        event = samples.stripe_event()
        event["data"]["object"]["metadata"].update(
            patient_external_id=intake["patient"]["external_id"],
            intake_submission_id=intake["submission_id"],
        )
        payload = json.dumps(event).encode()
        signature = stripe_signature_header("whsec_test_secret_for_tests_only", payload)
        r = await client.post(
            "/v1/webhooks/stripe",
            content=payload,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        await drain(runtime, worker)
        assert fake.count("Patient") == 2
        assert fake.count("Observation") == 3  # the GLP-1 vitals
        (mr,) = fake.resources("MedicationRequest")
        codes = [c["code"] for c in mr["medicationCodeableConcept"]["coding"]]
        assert codes == ["1991306", "ACME-SEMA-025"]  # RxNorm + the EHR's formulary code
        assert mr["extension"][0]["valueCode"] == "telehealth-checkout"
    finally:
        await worker.aclose()
