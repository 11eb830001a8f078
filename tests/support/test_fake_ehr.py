"""The fake EHR behaves like a FHIR R4 server with SMART Backend Services auth, over real HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from tests.support.fake_ehr import (
    FakeEhr,
    Fault,
    FhirRequest,
    RunningEhr,
    run_fake_ehr,
    run_fake_ehr_async,
)

SYSTEM = "https://telehealth.example.org/patient-id"
SUBMISSION_SYSTEM = "https://telehealth.example.org/intake-submission"
TAG_SYSTEM = "https://telehealth.example.org/delivery"
SCOPE = "system/Patient.cu system/QuestionnaireResponse.cu"
FORM = {"grant_type": "client_credentials", "scope": SCOPE}
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def ehr() -> FakeEhr:
    return FakeEhr()


@pytest.fixture
async def running(ehr: FakeEhr) -> AsyncIterator[RunningEhr]:
    async with run_fake_ehr_async(ehr) as running_ehr:
        yield running_ehr


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as http:
        yield http


@pytest.fixture
async def fhir(running: RunningEhr, client: httpx.AsyncClient) -> httpx.AsyncClient:
    """The client, with a bearer token from the fake EHR and its FHIR base as base_url."""
    response = await client.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))
    response.raise_for_status()
    client.base_url = httpx.URL(running.fhir_base + "/")
    client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
    client.headers["Content-Type"] = "application/fhir+json"
    return client


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-384", parameters={"kid": "ec-1"})


# --------------------------------------------------------------------------- helpers


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def patient(value: str = "pt-123") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": value}],
        "name": [{"family": "Testperson", "given": ["Synthetic"]}],
        "birthDate": "1990-04-01",
    }


def questionnaire_response(patient_ref: str, submission: str = "sub-789") -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "identifier": {"system": SUBMISSION_SYSTEM, "value": submission},
        "status": "completed",
        "subject": {"reference": patient_ref},
        "authored": "2024-05-01T12:00:00+00:00",
        "item": [{"linkId": "1", "answer": [{"valueString": "no"}]}],
    }


def intake_bundle(patient_value: str = "pt-123", submission: str = "sub-789") -> dict[str, Any]:
    pt_url, qr_url = urn(), urn()
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": qr_url,
                "resource": questionnaire_response(pt_url, submission),
                "request": {
                    "method": "POST",
                    "url": "QuestionnaireResponse",
                    "ifNoneExist": f"identifier={SUBMISSION_SYSTEM}|{submission}",
                },
            },
            {
                "fullUrl": pt_url,
                "resource": patient(patient_value),
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier={SYSTEM}|{patient_value}",
                },
            },
        ],
    }


def assertion(
    key: RSAKey | ECKey,
    alg: str,
    token_url: str,
    *,
    jti: str | None = None,
    lifetime_s: int = 240,
    claims: dict[str, Any] | None = None,
) -> str:
    now = int(time.time())
    payload = {
        "iss": "gateway",
        "sub": "gateway",
        "aud": token_url,
        "iat": now,
        "exp": now + lifetime_s,
        "jti": jti or str(uuid.uuid4()),
        **(claims or {}),
    }
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, payload, key, algorithms=[alg])


def jwt_form(signed: str) -> dict[str, str]:
    return {**FORM, "client_assertion_type": JWT_BEARER, "client_assertion": signed}


def outcome_of(response: httpx.Response) -> OperationOutcome:
    assert response.headers["content-type"].startswith("application/fhir+json")
    return OperationOutcome.model_validate(response.json())


# --------------------------------------------------------------------------- token endpoint


async def test_token_with_client_secret_basic(
    ehr: FakeEhr, running: RunningEhr, client: httpx.AsyncClient
) -> None:
    response = await client.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == SCOPE
    assert response.headers["cache-control"] == "no-store"
    assert [(r.method, r.scope, r.status) for r in ehr.token_requests] == [
        ("client_secret_basic", SCOPE, 200)
    ]


async def test_token_with_client_secret_post(
    ehr: FakeEhr, running: RunningEhr, client: httpx.AsyncClient
) -> None:
    form = {**FORM, "client_id": "gateway", "client_secret": "s3cret"}

    response = await client.post(running.token_url, data=form)

    assert response.status_code == 200
    assert response.json()["access_token"]
    assert ehr.token_requests[0].method == "client_secret_post"


async def test_token_with_wrong_secret_is_401_invalid_client(
    ehr: FakeEhr, running: RunningEhr, client: httpx.AsyncClient
) -> None:
    response = await client.post(running.token_url, data=FORM, auth=("gateway", "wrong"))

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic")
    assert ehr.token_requests[0].status == 401


async def test_token_with_other_grant_type_is_400_unsupported(
    running: RunningEhr, client: httpx.AsyncClient
) -> None:
    form = {**FORM, "grant_type": "password"}

    response = await client.post(running.token_url, data=form, auth=("gateway", "s3cret"))

    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


async def test_token_with_missing_required_scope_is_invalid_scope(
    client: httpx.AsyncClient,
) -> None:
    ehr = FakeEhr(required_scopes={"system/MedicationRequest.c"})
    async with run_fake_ehr_async(ehr) as running:
        response = await client.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


@pytest.mark.parametrize("key_name, alg", [("rsa_key", "RS384"), ("ec_key", "ES384")])
async def test_private_key_jwt_assertion_gets_a_token(
    request: pytest.FixtureRequest, client: httpx.AsyncClient, key_name: str, alg: str
) -> None:
    key = request.getfixturevalue(key_name)
    ehr = FakeEhr(jwks={"keys": [key.as_dict(private=False)]})
    async with run_fake_ehr_async(ehr) as running:
        signed = assertion(key, alg, running.token_url)
        response = await client.post(running.token_url, data=jwt_form(signed))

    assert response.status_code == 200, ehr.token_errors
    assert response.json()["scope"] == SCOPE
    assert ehr.token_requests[0].method == "private_key_jwt"


async def test_private_key_jwt_with_reused_jti_is_rejected(
    rsa_key: RSAKey, client: httpx.AsyncClient
) -> None:
    ehr = FakeEhr(jwks={"keys": [rsa_key.as_dict(private=False)]})
    async with run_fake_ehr_async(ehr) as running:
        first = await client.post(
            running.token_url,
            data=jwt_form(assertion(rsa_key, "RS384", running.token_url, jti="j1")),
        )
        replay = await client.post(
            running.token_url,
            data=jwt_form(assertion(rsa_key, "RS384", running.token_url, jti="j1")),
        )

    assert first.status_code == 200
    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"
    assert ehr.token_errors == [
        "invalid_client: client_assertion rejected: jti has already been used"
    ]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"lifetime_s": 600}, "exp is more than 5 minutes in the future"),
        (
            {"claims": {"aud": "https://ehr.example.org/token"}},
            "aud must be the token endpoint URL",
        ),
        ({"claims": {"iss": "someone-else"}}, "iss and sub must both equal the client_id"),
        ({"claims": {"exp": int(time.time()) - 60}}, "assertion has expired"),
    ],
)
async def test_private_key_jwt_with_bad_claims_is_rejected(
    rsa_key: RSAKey, client: httpx.AsyncClient, change: dict[str, Any], reason: str
) -> None:
    ehr = FakeEhr(jwks={"keys": [rsa_key.as_dict(private=False)]})
    async with run_fake_ehr_async(ehr) as running:
        signed = assertion(rsa_key, "RS384", running.token_url, **change)
        response = await client.post(running.token_url, data=jwt_form(signed))

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert ehr.token_errors == [f"invalid_client: client_assertion rejected: {reason}"]


async def test_private_key_jwt_with_rs256_or_unknown_kid_is_rejected(
    rsa_key: RSAKey, client: httpx.AsyncClient
) -> None:
    other = RSAKey.generate_key(2048, parameters={"kid": "not-registered"})
    ehr = FakeEhr(jwks={"keys": [rsa_key.as_dict(private=False)]})
    async with run_fake_ehr_async(ehr) as running:
        rs256 = await client.post(
            running.token_url, data=jwt_form(assertion(rsa_key, "RS256", running.token_url))
        )
        unknown = await client.post(
            running.token_url, data=jwt_form(assertion(other, "RS384", running.token_url))
        )

    assert (rs256.status_code, unknown.status_code) == (401, 401)
    assert "alg 'RS256' not accepted" in ehr.token_errors[0]
    assert "kid 'not-registered' is not in the registered JWKS" in ehr.token_errors[1]


async def test_scripted_token_faults_then_outage(
    ehr: FakeEhr, running: RunningEhr, client: httpx.AsyncClient
) -> None:
    ehr.fail_token(1, status=503, retry_after=7)

    faulted = await client.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))
    recovered = await client.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))
    ehr.token_outage(30)
    outage = await client.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))

    assert (faulted.status_code, faulted.headers["retry-after"]) == (503, "7")
    assert recovered.status_code == 200
    assert outage.status_code == 504
    assert [r.status for r in ehr.token_requests] == [503, 200, 504]


# --------------------------------------------------------------------------- bearer tokens


async def test_fhir_without_token_is_401(running: RunningEhr, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{running.fhir_base}/Patient/1")

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert outcome_of(response).issue[0].code == "login"


async def test_fhir_with_revoked_token_is_401_invalid_token(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    assert (await fhir.get("Patient", params={"_id": "1"})).status_code == 200
    ehr.revoke_all_tokens()

    response = await fhir.get("Patient", params={"_id": "1"})

    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_fhir_with_expired_token_is_401_invalid_token(client: httpx.AsyncClient) -> None:
    ehr = FakeEhr(token_lifetime_s=0)
    async with run_fake_ehr_async(ehr) as running:
        token = (
            await client.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))
        ).json()["access_token"]
        response = await client.get(
            f"{running.fhir_base}/Patient", headers={"Authorization": f"Bearer {token}"}
        )

    assert response.status_code == 401
    assert "expired" in response.headers["www-authenticate"]


async def test_metadata_needs_no_token_and_is_a_valid_capability_statement(
    running: RunningEhr, client: httpx.AsyncClient
) -> None:
    response = await client.get(f"{running.fhir_base}/metadata")

    assert response.status_code == 200
    statement = CapabilityStatement.model_validate(response.json())
    assert statement.fhirVersion == "4.0.1"
    assert statement.rest[0].interaction[0].code == "transaction"


# --------------------------------------------------------------------------- transactions


async def test_transaction_assigns_ids_and_resolves_urn_uuid_references(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    response = await fhir.post("", json=intake_bundle())

    assert response.status_code == 200
    result = Bundle.model_validate(response.json())
    assert result.type == "transaction-response"
    qr_response, pt_response = (e.response for e in result.entry)
    assert (qr_response.status, pt_response.status) == ("201 Created", "201 Created")
    assert pt_response.etag == 'W/"1"'
    assert pt_response.lastModified is not None
    [stored_patient] = ehr.resources("Patient")
    [stored_qr] = ehr.resources("QuestionnaireResponse")
    assert pt_response.location == f"Patient/{stored_patient['id']}/_history/1"
    assert stored_qr["subject"]["reference"] == f"Patient/{stored_patient['id']}"


async def test_same_bundle_twice_matches_existing_resources_and_stores_nothing_new(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    first = await fhir.post("", json=intake_bundle())
    second_bundle = intake_bundle()
    # A new observation in the retry references the patient that already exists.
    second_bundle["entry"].append(
        {
            "fullUrl": urn(),
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "weight"},
                "subject": {"reference": second_bundle["entry"][1]["fullUrl"]},
            },
            "request": {"method": "POST", "url": "Observation"},
        }
    )

    second = await fhir.post("", json=second_bundle)

    assert second.status_code == 200
    entries = second.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["200 OK", "200 OK", "201 Created"]
    assert entries[1]["response"]["location"] == first.json()["entry"][1]["response"]["location"]
    [stored_patient] = ehr.resources("Patient")
    assert ehr.count("QuestionnaireResponse") == 1
    [observation] = ehr.resources("Observation")
    assert observation["subject"]["reference"] == f"Patient/{stored_patient['id']}"
    assert stored_patient["meta"]["versionId"] == "1"


async def test_if_none_exist_with_two_matches_fails_whole_transaction_with_412(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    ehr.seed(patient("dup"), patient("dup"))

    response = await fhir.post("", json=intake_bundle(patient_value="dup"))

    assert response.status_code == 412
    issue = outcome_of(response).issue[0]
    assert issue.code == "duplicate"
    assert "Patient/1" in issue.diagnostics and "Patient/2" in issue.diagnostics
    assert ehr.count("QuestionnaireResponse") == 0
    assert ehr.count("Patient") == 2


async def test_invalid_second_entry_fails_transaction_and_stores_nothing(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    bundle = intake_bundle()
    bundle["entry"][1]["resource"]["birthDate"] = "04/01/1990"

    response = await fhir.post("", json=bundle)

    assert response.status_code == 400
    issue = outcome_of(response).issue[0]
    assert issue.code == "invalid"
    assert issue.expression == ["Bundle.entry[1].resource.birthDate"]
    assert "04/01/1990" not in response.text
    assert ehr.count("Patient") == 0
    assert ehr.count("QuestionnaireResponse") == 0


async def test_reference_to_unknown_placeholder_fails_transaction(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    bundle = intake_bundle()
    bundle["entry"][0]["resource"]["subject"]["reference"] = urn()

    response = await fhir.post("", json=bundle)

    assert response.status_code == 400
    assert "placeholder" in outcome_of(response).issue[0].diagnostics
    assert ehr.count("Patient") == 0


async def test_reference_to_missing_resource_fails_referential_integrity(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    bundle = intake_bundle()
    bundle["entry"][0]["resource"]["subject"]["reference"] = "Patient/nope"

    response = await fhir.post("", json=bundle)

    assert response.status_code == 400
    assert outcome_of(response).issue[0].code == "not-found"
    assert ehr.count("QuestionnaireResponse") == 0


async def test_r4b_only_resource_type_is_rejected(ehr: FakeEhr, fhir: httpx.AsyncClient) -> None:
    status = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": "heartbeat",
        "subscription": {"reference": "Subscription/1"},
    }

    response = await fhir.post("SubscriptionStatus", json=status)

    assert response.status_code == 404
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": status, "request": {"method": "POST", "url": "SubscriptionStatus"}}],
    }
    in_bundle = await fhir.post("", json=bundle)
    assert in_bundle.status_code == 400
    assert outcome_of(in_bundle).issue[0].code == "not-supported"


async def test_transaction_processes_post_before_get_and_returns_request_order(
    fhir: httpx.AsyncClient,
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient?identifier={SYSTEM}|pt-9"}},
            {
                "fullUrl": urn(),
                "resource": patient("pt-9"),
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }

    response = await fhir.post("", json=bundle)

    assert response.status_code == 200, response.text
    search, created = response.json()["entry"]
    assert search["resource"]["total"] == 1
    assert created["response"]["status"] == "201 Created"


async def test_conditional_reference_resolves_to_the_single_match(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    [existing] = ehr.seed(patient("pt-5"))
    qr = questionnaire_response(f"Patient?identifier={SYSTEM}|pt-5")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": qr, "request": {"method": "POST", "url": "QuestionnaireResponse"}}],
    }

    response = await fhir.post("", json=bundle)

    assert response.status_code == 200
    [stored] = ehr.resources("QuestionnaireResponse")
    assert stored["subject"]["reference"] == f"Patient/{existing['id']}"


async def test_tag_if_none_exist_matches_meta_tag(ehr: FakeEhr, fhir: httpx.AsyncClient) -> None:
    [pt] = ehr.seed(patient())
    qr = questionnaire_response(f"Patient/{pt['id']}")
    del qr["identifier"]
    qr["meta"] = {"tag": [{"system": TAG_SYSTEM, "code": "delivery-42"}]}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": urn(),
                "resource": qr,
                "request": {
                    "method": "POST",
                    "url": "QuestionnaireResponse",
                    "ifNoneExist": f"_tag={TAG_SYSTEM}|delivery-42",
                },
            }
        ],
    }

    first = await fhir.post("", json=bundle)
    second = await fhir.post("", json=bundle)

    assert first.json()["entry"][0]["response"]["status"] == "201 Created"
    assert second.json()["entry"][0]["response"]["status"] == "200 OK"
    assert ehr.count("QuestionnaireResponse") == 1


async def test_if_none_exist_with_type_prefix_is_rejected(fhir: httpx.AsyncClient) -> None:
    bundle = intake_bundle()
    bundle["entry"][1]["request"]["ifNoneExist"] = f"Patient?identifier={SYSTEM}|pt-123"

    response = await fhir.post("", json=bundle)

    assert response.status_code == 400
    assert outcome_of(response).issue[0].expression == ["Bundle.entry[1].request.ifNoneExist"]


async def test_batch_processes_entries_independently(ehr: FakeEhr, fhir: httpx.AsyncClient) -> None:
    invalid = patient("pt-2")
    invalid["gender"] = 7
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient("pt-1"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": invalid, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/404"}},
        ],
    }

    response = await fhir.post("", json=bundle)

    assert response.status_code == 200
    result = Bundle.model_validate(response.json())
    assert result.type == "batch-response"
    assert [e.response.status for e in result.entry] == [
        "201 Created",
        "400 Bad Request",
        "404 Not Found",
    ]
    assert result.entry[1].response.outcome is not None
    assert [p["identifier"][0]["value"] for p in ehr.resources("Patient")] == ["pt-1"]


async def test_transaction_larger_than_limit_is_too_costly(client: httpx.AsyncClient) -> None:
    ehr = FakeEhr(max_bundle_entries=1)
    async with run_fake_ehr_async(ehr) as running:
        headers = {"Authorization": f"Bearer {ehr.issue_token()}"}
        response = await client.post(running.fhir_base, json=intake_bundle(), headers=headers)

    assert response.status_code == 400
    assert outcome_of(response).issue[0].code == "too-costly"
    assert ehr.count("Patient") == 0


async def test_server_without_transactions_answers_405(client: httpx.AsyncClient) -> None:
    ehr = FakeEhr(supports_transactions=False)
    async with run_fake_ehr_async(ehr) as running:
        headers = {"Authorization": f"Bearer {ehr.issue_token()}"}
        response = await client.post(running.fhir_base, json=intake_bundle(), headers=headers)
        metadata = (await client.get(f"{running.fhir_base}/metadata")).json()

    assert response.status_code == 405
    assert outcome_of(response).issue[0].code == "not-supported"
    assert "interaction" not in metadata["rest"][0]


# --------------------------------------------------------------------------- single resources


async def test_conditional_create_with_if_none_exist_header(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    headers = {"If-None-Exist": f"identifier={SYSTEM}|pt-123"}

    created = await fhir.post("Patient", json=patient(), headers=headers)
    matched = await fhir.post("Patient", json=patient(), headers=headers)

    assert created.status_code == 201
    assert created.headers["location"].endswith("/_history/1")
    assert created.headers["etag"] == 'W/"1"'
    assert matched.status_code == 200
    assert matched.headers["location"] == created.headers["location"]
    assert ehr.count("Patient") == 1


async def test_conditional_update_creates_then_updates(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    params = {"identifier": f"{SYSTEM}|pt-123"}

    created = await fhir.put("Patient", params=params, json=patient())
    changed = patient()
    changed["gender"] = "female"
    updated = await fhir.put("Patient", params=params, json=changed)

    assert (created.status_code, updated.status_code) == (201, 200)
    assert updated.headers["etag"] == 'W/"2"'
    [stored] = ehr.resources("Patient")
    assert stored["gender"] == "female"
    assert stored["meta"]["versionId"] == "2"


async def test_conditional_update_with_two_matches_is_412(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    ehr.seed(patient(), patient())

    response = await fhir.put("Patient", params={"identifier": f"{SYSTEM}|pt-123"}, json=patient())

    assert response.status_code == 412


async def test_update_with_stale_if_match_is_412(ehr: FakeEhr, fhir: httpx.AsyncClient) -> None:
    [stored] = ehr.seed({**patient(), "id": "abc"})

    fresh = await fhir.put("Patient/abc", json=stored, headers={"If-Match": 'W/"1"'})
    stale = await fhir.put("Patient/abc", json=stored, headers={"If-Match": 'W/"1"'})

    assert fresh.status_code == 200
    assert stale.status_code == 412
    assert outcome_of(stale).issue[0].code == "conflict"


async def test_read_search_and_not_found(ehr: FakeEhr, fhir: httpx.AsyncClient) -> None:
    [stored] = ehr.seed(patient())

    read = await fhir.get(f"Patient/{stored['id']}")
    search = await fhir.get("Patient", params={"identifier": f"{SYSTEM}|pt-123"})
    missing = await fhir.get("Patient/nope")
    unknown_param = await fhir.get("Patient", params={"name": "x"})

    assert read.json() == stored
    assert read.headers["etag"] == 'W/"1"'
    assert Bundle.model_validate(search.json()).total == 1
    assert missing.status_code == 404
    assert outcome_of(missing).issue[0].code == "not-found"
    assert unknown_param.status_code == 400


async def test_enforced_scopes_forbid_interactions_not_granted(client: httpx.AsyncClient) -> None:
    ehr = FakeEhr(enforce_scopes=True)
    async with run_fake_ehr_async(ehr) as running:
        headers = {"Authorization": f"Bearer {ehr.issue_token('system/Patient.c')}"}
        created = await client.post(f"{running.fhir_base}/Patient", json=patient(), headers=headers)
        searched = await client.get(f"{running.fhir_base}/Patient", headers=headers)

    assert created.status_code == 201
    assert searched.status_code == 403


# --------------------------------------------------------------------------- FHIR faults


async def test_scripted_503_with_retry_after_then_success(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    ehr.fail_fhir(1, 503, retry_after=2)

    faulted = await fhir.post("", json=intake_bundle())
    retried = await fhir.post("", json=intake_bundle())

    assert faulted.status_code == 503
    assert faulted.headers["retry-after"] == "2"
    assert outcome_of(faulted).issue[0].code == "transient"
    assert retried.status_code == 200
    assert [r.status for r in ehr.requests] == [503, 200]


async def test_custom_fault_body_is_sent_verbatim(ehr: FakeEhr, fhir: httpx.AsyncClient) -> None:
    ehr.fhir_faults.append(Fault(502, body="<html>Bad gateway</html>", content_type="text/html"))

    response = await fhir.get("Patient")

    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == "<html>Bad gateway</html>"


async def test_hang_makes_the_client_time_out_but_the_ehr_still_commits(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    ehr.hang_fhir(1, seconds=0.6)

    with pytest.raises(httpx.ReadTimeout):
        await fhir.post("", json=intake_bundle(), timeout=0.2)
    # The hung request is still processed (and committed) after the client gave up.
    assert await asyncio.to_thread(ehr.wait_for_requests, 1)
    retried = await fhir.post("", json=intake_bundle())

    assert retried.json()["entry"][1]["response"]["status"] == "200 OK"
    assert ehr.count("Patient") == 1
    assert ehr.requests[0] == FhirRequest("POST", "/fhir/", 200)


async def test_reject_when_rule_rejects_until_cleared(
    ehr: FakeEhr, fhir: httpx.AsyncClient
) -> None:
    ehr.reject_when(lambda r: r["resourceType"] == "QuestionnaireResponse", status=422)

    rejected = await fhir.post("", json=intake_bundle())
    ehr.clear_rules()
    accepted = await fhir.post("", json=intake_bundle())

    assert rejected.status_code == 422
    assert outcome_of(rejected).issue[0].code == "processing"
    assert accepted.status_code == 200
    assert ehr.count("Patient") == 1


async def test_concurrent_requests_are_tracked(client: httpx.AsyncClient) -> None:
    ehr = FakeEhr(response_delay_s=0.2)
    async with run_fake_ehr_async(ehr) as running:
        headers = {"Authorization": f"Bearer {ehr.issue_token()}"}
        responses = await asyncio.gather(
            *(client.get(f"{running.fhir_base}/Patient", headers=headers) for _ in range(5))
        )

    assert [r.status_code for r in responses] == [200] * 5
    assert ehr.max_concurrent_requests == 5
    assert len(ehr.request_times) == 5
    assert ehr.in_flight == 0


# --------------------------------------------------------------------------- sync runner


def test_sync_runner_serves_and_stops() -> None:
    ehr = FakeEhr()
    with run_fake_ehr(ehr) as running, httpx.Client(timeout=5.0) as http:
        response = http.get(f"{running.fhir_base}/metadata")
        port = running.port

    assert response.status_code == 200
    with pytest.raises(httpx.ConnectError), httpx.Client(timeout=1.0) as http:
        http.get(f"http://127.0.0.1:{port}/fhir/metadata")
