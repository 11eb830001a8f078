"""The local EHR (testkit.ehr) over real HTTP: its token endpoint, bearer checks, faults and
records, and the FHIR semantics it passes through from Medplum (with the shims of
testkit/fhir_server/server.mjs)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from testkit.ehr import LocalEhr, RunningEhr, run_ehr, run_ehr_async
from testkit.fhir_server import unavailable_reason
from tests.support.ehr import EhrFactory

SYSTEM = "https://telehealth.example.org/patient-id"
TAG_SYSTEM = "https://telehealth.example.org/delivery"
FORM = {"grant_type": "client_credentials", "scope": "system/*.cruds"}
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
REPO = Path(__file__).resolve().parents[2]


def patient(value: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": value}], **extra}


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def create(
    resource: dict[str, Any], *, if_none_exist: str | None = None, full_url: str | None = None
) -> dict[str, Any]:
    request = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": full_url or urn(), "resource": resource, "request": request}


def bundle(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


@pytest.fixture
async def served(make_ehr: EhrFactory) -> AsyncIterator[tuple[LocalEhr, RunningEhr]]:
    ehr = make_ehr()
    async with run_ehr_async(ehr) as running:
        yield ehr, running


@pytest.fixture
async def fhir(served: tuple[LocalEhr, RunningEhr]) -> AsyncIterator[httpx.AsyncClient]:
    """A client with a valid token, on the EHR's FHIR base."""
    ehr, running = served
    headers = {"Authorization": f"Bearer {ehr.issue_token()}", **FHIR_JSON}
    async with httpx.AsyncClient(base_url=running.fhir_base, headers=headers, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1"})


def assertion(key: RSAKey, token_url: str, **claims: Any) -> str:
    now = int(time.time())
    header = {"alg": claims.pop("alg", "RS384"), "kid": claims.pop("kid", "k1"), "typ": "JWT"}
    body = {
        "iss": "gateway",
        "sub": "gateway",
        "aud": token_url,
        "exp": now + 240,
        "iat": now,
        "jti": uuid.uuid4().hex,
        **claims,
    }
    return jwt.encode(header, body, key, algorithms=[header["alg"]])


# --------------------------------------------------------------------------- token endpoint


async def test_client_secrets_get_tokens_and_a_wrong_secret_is_invalid_client() -> None:
    ehr = LocalEhr()  # a token endpoint only: no FHIR server needed
    async with run_ehr_async(ehr) as running, httpx.AsyncClient() as http:
        basic = await http.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))
        post = await http.post(
            running.token_url, data={**FORM, "client_id": "gateway", "client_secret": "s3cret"}
        )
        wrong = await http.post(running.token_url, data=FORM, auth=("gateway", "nope"))
        no_fhir = await http.get(
            f"{running.fhir_base}/Patient",
            headers={"Authorization": f"Bearer {basic.json()['access_token']}"},
        )

    assert basic.status_code == post.status_code == 200
    assert basic.json()["token_type"] == "bearer" and basic.json()["expires_in"] == 300
    assert basic.headers["cache-control"] == "no-store"
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    assert wrong.headers["www-authenticate"].startswith("Basic")
    assert [(r.method, r.status) for r in ehr.token_requests] == [
        ("client_secret_basic", 200),
        ("client_secret_post", 200),
        ("client_secret_basic", 401),
    ]
    assert ehr.token_errors == ["invalid_client: Unknown client or wrong secret"]
    assert no_fhir.status_code == 503


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({}, None),
        ({"alg": "RS256"}, "alg 'RS256' not accepted"),
        ({"kid": "other"}, "kid 'other' is not in the registered JWKS"),
        ({"aud": "https://elsewhere.example/token"}, "aud must be the token endpoint URL"),
        ({"exp": int(time.time()) + 3600}, "more than 5 minutes"),
        ({"sub": "someone-else"}, "iss and sub must both equal the client_id"),
        ({"jti": ""}, "jti is required"),
    ],
)
async def test_smart_backend_services_assertions_are_checked(
    rsa_key: RSAKey, claims: dict[str, Any], reason: str | None
) -> None:
    ehr = LocalEhr(jwks={"keys": [rsa_key.as_dict(private=False)]})
    async with run_ehr_async(ehr) as running, httpx.AsyncClient() as http:
        signed = assertion(rsa_key, running.token_url, **claims)
        form = {**FORM, "client_assertion_type": JWT_BEARER, "client_assertion": signed}
        first = await http.post(running.token_url, data=form)
        replay = await http.post(running.token_url, data=form)

    if reason is None:
        assert first.status_code == 200
        assert replay.json()["error_description"].endswith("jti has already been used")
    else:
        assert (first.status_code, first.json()["error"]) == (401, "invalid_client")
        assert reason in first.json()["error_description"]
    assert {r.method for r in ehr.token_requests} == {"private_key_jwt"}


async def test_scopes_grant_type_and_scripted_token_faults() -> None:
    ehr = LocalEhr(required_scopes={"system/MedicationRequest.c"})
    async with run_ehr_async(ehr) as running, httpx.AsyncClient() as http:
        scope = await http.post(running.token_url, data=FORM, auth=("gateway", "s3cret"))
        grant = await http.post(
            running.token_url, data={**FORM, "grant_type": "password"}, auth=("gateway", "s3cret")
        )
        ehr.fail_token(1, 503, retry_after=2)
        ehr.token_outage(0.3, status=504)
        faulted = [
            await http.post(running.token_url, data=FORM, auth=("gateway", "nope"))
            for _ in range(2)
        ]
        await asyncio.sleep(0.35)
        after = await http.post(running.token_url, data=FORM, auth=("gateway", "nope"))

    assert (scope.status_code, scope.json()["error"]) == (400, "invalid_scope")
    assert (grant.status_code, grant.json()["error"]) == (400, "unsupported_grant_type")
    # faults answer before the credentials are even looked at
    assert [r.status_code for r in faulted] == [503, 504]
    assert faulted[0].headers["retry-after"] == "2"
    assert faulted[1].json()["error"] == "temporarily_unavailable"
    assert after.status_code == 401


# --------------------------------------------------------------------------- bearer tokens


async def test_fhir_needs_a_valid_unrevoked_unexpired_bearer_token(make_ehr: EhrFactory) -> None:
    ehr = make_ehr(token_lifetime_s=0)
    expired = ehr.issue_token()
    async with run_ehr_async(ehr) as running, httpx.AsyncClient(base_url=running.fhir_base) as http:
        missing = await http.get("/Patient")
        old = await http.get("/Patient", headers={"Authorization": f"Bearer {expired}"})
        ehr.tokens.token_lifetime_s = 300
        token = ehr.issue_token()
        fine = await http.get("/Patient", headers={"Authorization": f"Bearer {token}"})
        ehr.revoke_all_tokens()
        revoked = await http.get("/Patient", headers={"Authorization": f"Bearer {token}"})

    assert (missing.status_code, missing.headers["www-authenticate"]) == (
        401,
        'Bearer realm="local-ehr"',
    )
    assert 'error="invalid_token"' in old.headers["www-authenticate"]
    assert old.json()["issue"][0]["diagnostics"] == "The access token has expired"
    assert fine.status_code == 200
    assert revoked.json()["issue"][0]["diagnostics"] == "The access token has been revoked"
    assert [r.status for r in ehr.requests] == [401, 401, 200, 401]


async def test_metadata_needs_no_token_and_names_the_token_endpoint(
    served: tuple[LocalEhr, RunningEhr],
) -> None:
    ehr, running = served
    ehr.fail_fhir(1, 503)  # faults never hit metadata: it is the circuit breaker's probe
    async with httpx.AsyncClient() as http:
        statement = (await http.get(f"{running.fhir_base}/metadata")).json()
        smart = (await http.get(f"{running.fhir_base}/.well-known/smart-configuration")).json()

    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert "Medplum" in statement["software"]["name"]
    [rest] = statement["rest"]
    assert {"transaction", "batch"} <= {i["code"] for i in rest["interaction"]}
    [oauth] = rest["security"]["extension"]
    assert oauth["extension"] == [{"url": "token", "valueUri": running.token_url}]
    assert smart["token_endpoint"] == running.token_url
    assert len(ehr.fhir_faults) == 1


# --------------------------------------------------------------------------- FHIR semantics


async def test_a_transaction_rewrites_references_and_its_replay_creates_nothing(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, _ = served
    pt_url = urn()
    sent = bundle(
        create(patient("p-1"), if_none_exist=f"identifier={SYSTEM}|p-1", full_url=pt_url),
        create(
            {
                "resourceType": "Provenance",
                "meta": {"tag": [{"system": TAG_SYSTEM, "code": "prov-1"}]},
                "target": [{"reference": pt_url}],
                "recorded": "2026-01-01T00:00:00Z",
                "agent": [{"who": {"display": "gateway"}}],
            },
            if_none_exist=f"_tag={TAG_SYSTEM}|prov-1",
        ),
    )
    first = await fhir.post("", json=sent)
    again = await fhir.post("", json=sent)

    assert first.status_code == again.status_code == 200
    assert [e["response"]["status"] for e in first.json()["entry"]] == ["201", "201"]
    assert [e["response"]["status"] for e in again.json()["entry"]] == ["200", "200"]
    [stored_patient] = ehr.resources("Patient")
    [provenance] = ehr.resources("Provenance")
    assert provenance["target"] == [{"reference": f"Patient/{stored_patient['id']}"}]
    assert first.json()["entry"][0]["response"]["location"] == f"Patient/{stored_patient['id']}"


async def test_an_invalid_entry_fails_the_whole_transaction_with_an_operation_outcome(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, _ = served
    response = await fhir.post(
        "",
        json=bundle(
            create(patient("p-2"), if_none_exist=f"identifier={SYSTEM}|p-2"),
            create({"resourceType": "Observation", "status": "final"}),  # no code: invalid
        ),
    )

    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Observation.code"]
    assert ehr.count("Patient") == 0  # rolled back
    retry = await fhir.post(
        "", json=bundle(create(patient("p-2"), if_none_exist=f"identifier={SYSTEM}|p-2"))
    )
    assert retry.json()["entry"][0]["response"]["status"] == "201"
    assert len(ehr.find("Patient", SYSTEM, "p-2")) == 1


async def test_conditional_references_resolve_to_one_match_or_fail_the_transaction(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, _ = served
    [existing] = ehr.seed(patient("p-3"))

    def observation(reference: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "weight"},
            "subject": {"reference": reference},
        }

    resolved = await fhir.post(
        "", json=bundle(create(observation(f"Patient?identifier={SYSTEM}|p-3")))
    )
    unknown = await fhir.post(
        "", json=bundle(create(observation(f"Patient?identifier={SYSTEM}|none")))
    )

    assert resolved.status_code == 200
    [obs] = ehr.resources("Observation")
    assert obs["subject"] == {"reference": f"Patient/{existing['id']}"}
    assert unknown.status_code == 400
    assert "matched no resource" in unknown.json()["issue"][0]["diagnostics"]


async def test_a_conditional_create_matching_two_resources_is_412(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, _ = served
    ehr.seed(patient("dup"), patient("dup"))
    in_transaction = await fhir.post(
        "", json=bundle(create(patient("dup"), if_none_exist=f"identifier={SYSTEM}|dup"))
    )
    alone = await fhir.post(
        "/Patient", json=patient("dup"), headers={"If-None-Exist": f"identifier={SYSTEM}|dup"}
    )

    assert in_transaction.status_code == alone.status_code == 412
    assert ehr.count("Patient") == 2


async def test_update_vread_conditional_update_and_http_headers(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, running = served
    created = await fhir.post("/Patient", json=patient("p-4", gender="female"))
    body = created.json()
    updated = await fhir.put(f"/Patient/{body['id']}", json={**body, "gender": "male"})
    old = await fhir.get(f"/Patient/{body['id']}/_history/{body['meta']['versionId']}")
    upsert = await fhir.put(
        f"/Patient?identifier={SYSTEM}|p-4", json=patient("p-4", gender="other")
    )
    fresh = await fhir.put(f"/Patient?identifier={SYSTEM}|p-5", json=patient("p-5"))

    version = body["meta"]["versionId"]
    assert created.status_code == 201
    assert (
        created.headers["location"]
        == f"{running.fhir_base}/Patient/{body['id']}/_history/{version}"
    )
    assert created.headers["etag"] == f'W/"{version}"'
    assert updated.status_code == 200 and updated.json()["meta"]["versionId"] != version
    assert old.json()["gender"] == "female"
    assert (upsert.status_code, upsert.json()["id"]) == (200, body["id"])
    assert fresh.status_code == 201
    history = [v["gender"] for v in ehr.versions("Patient", body["id"])]
    assert history == ["other", "male", "female"]  # newest first
    assert [v["gender"] for v in ehr.versions("Patient", body["id"])] == history  # stays so
    assert ehr.get("Patient", body["id"])["gender"] == "other"  # type: ignore[index]


async def test_token_searches_follow_medplum_and_see_updates(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    """The identifier/_tag/_id index picks the same resources as Medplum's matcher:
    case-insensitive tokens, and a changed identifier is found under its new value only."""
    ehr, _ = served
    [a, b] = ehr.seed(
        patient("Case-A"), patient("b", meta={"tag": [{"system": TAG_SYSTEM, "code": "t"}]})
    )
    ehr.seed({**a, "identifier": [{"system": SYSTEM, "value": "renamed"}]})

    async def ids(query: str) -> list[str]:
        found = (await fhir.get(f"/Patient?{query}")).json()
        return [e["resource"]["id"] for e in found.get("entry") or []]

    assert await ids(f"identifier={SYSTEM}|case-a") == []
    assert await ids(f"identifier={SYSTEM.upper()}|RENAMED") == [a["id"]]
    assert await ids(f"_tag={TAG_SYSTEM}|t") == [b["id"]]
    assert await ids(f"_id={b['id']}") == [b["id"]]
    assert await ids(f"identifier={SYSTEM}|") == [a["id"], b["id"]]  # not indexable: a scan


async def test_unknown_types_are_404_and_each_ehr_has_its_own_data(
    make_ehr: EhrFactory, served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, _ = served
    other = make_ehr()
    other.seed(patient("elsewhere"))
    unknown = await fhir.get("/Spaceship")

    assert unknown.status_code == 404
    assert unknown.json()["resourceType"] == "OperationOutcome"
    assert (ehr.count("Patient"), other.count("Patient")) == (0, 1)


# --------------------------------------------------------------------------- faults


async def test_scripted_fhir_faults_answer_in_order_before_the_token_check(
    served: tuple[LocalEhr, RunningEhr],
) -> None:
    ehr, running = served
    ehr.fail_fhir(2, 503, retry_after=1)
    async with httpx.AsyncClient(base_url=running.fhir_base) as http:
        answers = [await http.get("/Patient") for _ in range(3)]  # no token at all

    assert [r.status_code for r in answers] == [503, 503, 401]
    assert answers[0].headers["retry-after"] == "1"
    assert answers[0].json()["issue"][0]["code"] == "transient"


async def test_an_outage_fails_everything_and_a_partial_one_a_share_but_not_metadata(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, _ = served
    ehr.fhir_outage(0.3, 503, retry_after=1)
    down = [(await fhir.get("/metadata")).status_code, (await fhir.get("/Patient")).status_code]
    await asyncio.sleep(0.35)
    up = (await fhir.get("/Patient")).status_code
    ehr.fhir_outage(10, 500, fraction=0.5, seed=7)
    partial = [(await fhir.get("/Patient")).status_code for _ in range(40)]
    probe = (await fhir.get("/metadata")).status_code
    ehr.clear_faults()
    after = (await fhir.get("/Patient")).status_code

    assert down == [503, 503] and up == 200
    assert 5 <= partial.count(500) <= 35 and set(partial) == {200, 500}
    assert probe == after == 200


async def test_a_5xx_after_commit_and_a_hang_still_store_the_write(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, _ = served
    ehr.fail_fhir(1, 502, after_commit=True)
    after_commit = await fhir.post("/Patient", json=patient("p-6"))
    ehr.hang_fhir(1, 0.3)
    with pytest.raises(httpx.ReadTimeout):
        await fhir.post("/Patient", json=patient("p-7"), timeout=0.1)
    assert await asyncio.to_thread(ehr.wait_for_requests, 2, 5.0)

    assert after_commit.status_code == 502
    assert len(ehr.find("Patient", SYSTEM, "p-6")) == 1  # committed before the 502
    assert len(ehr.find("Patient", SYSTEM, "p-7")) == 1  # the client gave up; the EHR did not
    assert [r.status for r in ehr.requests] == [502, 201]


async def test_reject_rules_fail_a_transaction_whole_a_batch_entry_alone_and_a_create(
    served: tuple[LocalEhr, RunningEhr], fhir: httpx.AsyncClient
) -> None:
    ehr, _ = served
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "business-rule", "diagnostics": "no"}],
    }
    ehr.reject_when(lambda r: r.get("gender") == "unknown", 422, outcome)
    entries = [create(patient("p-8")), create(patient("p-9", gender="unknown"))]
    transaction = await fhir.post("", json=bundle(*entries))
    batch = await fhir.post("", json=bundle(*entries, kind="batch"))
    single = await fhir.post("/Patient", json=patient("p-10", gender="unknown"))
    ehr.clear_rules()
    cleared = await fhir.post("/Patient", json=patient("p-10", gender="unknown"))

    assert (transaction.status_code, transaction.json()) == (422, outcome)
    assert batch.status_code == 200
    assert [e["response"]["status"] for e in batch.json()["entry"]] == [
        "201",
        "422 Unprocessable Entity",
    ]
    assert single.status_code == 422 and cleared.status_code == 201
    assert sorted(p["identifier"][0]["value"] for p in ehr.resources("Patient")) == ["p-10", "p-8"]


async def test_deployment_limits_too_costly_and_no_transactions(make_ehr: EhrFactory) -> None:
    small, plain = make_ehr(max_bundle_entries=1), make_ehr(supports_transactions=False)
    two = bundle(create(patient("a")), create(patient("b")))
    async with run_ehr_async(small) as s, run_ehr_async(plain) as p, httpx.AsyncClient() as http:
        too_big = await http.post(
            s.fhir_base, json=two, headers={"Authorization": f"Bearer {small.issue_token()}"}
        )
        refused = await http.post(
            p.fhir_base, json=two, headers={"Authorization": f"Bearer {plain.issue_token()}"}
        )
        statement = (await http.get(f"{p.fhir_base}/metadata")).json()

    assert (too_big.status_code, too_big.json()["issue"][0]["code"]) == (400, "too-costly")
    assert (refused.status_code, refused.json()["issue"][0]["code"]) == (405, "not-supported")
    assert "transaction" not in {i["code"] for i in statement["rest"][0]["interaction"]}
    assert small.count("Patient") == plain.count("Patient") == 0


async def test_requests_times_and_concurrency_are_recorded(make_ehr: EhrFactory) -> None:
    ehr = make_ehr(response_delay_s=0.2)
    headers = {"Authorization": f"Bearer {ehr.issue_token()}"}
    async with run_ehr_async(ehr) as running, httpx.AsyncClient(headers=headers) as http:
        started = time.monotonic()
        answers = await asyncio.gather(
            *[http.get(f"{running.fhir_base}/Patient") for _ in range(3)]
        )
        elapsed = time.monotonic() - started

    assert [r.status_code for r in answers] == [200] * 3
    assert elapsed >= 0.2
    assert ehr.max_concurrent_requests == 3 and ehr.in_flight == 0
    assert ehr.requests == [("GET", "/fhir/Patient", 200)] * 3
    assert all(started <= t <= started + elapsed for t in ehr.request_times)


def test_the_sync_runner_serves_and_a_restart_keeps_the_data(make_ehr: EhrFactory) -> None:
    ehr = make_ehr()
    token = ehr.issue_token()
    with run_ehr(ehr) as running:
        port = running.port
        created = httpx.post(
            f"{running.fhir_base}/Patient",
            json=patient("p-11"),
            headers={"Authorization": f"Bearer {token}", **FHIR_JSON},
        )
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{running.fhir_base}/metadata")
    with run_ehr(ehr, port=port) as again:
        found = httpx.get(
            f"{again.fhir_base}/Patient?identifier={SYSTEM}|p-11",
            headers={"Authorization": f"Bearer {token}"},
        )

    assert created.status_code == 201
    assert found.json()["total"] == 1


# --------------------------------------------------------------------------- the processes


def test_without_node_the_reason_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_SERVER_NODE", "/nonexistent/node")
    reason = unavailable_reason()
    assert reason is not None and "/nonexistent/node --version failed" in reason


@pytest.mark.slow
def test_the_cli_serves_an_ehr_and_its_fhir_server_dies_with_it(fhir_server: object) -> None:
    """``python -m testkit.ehr``: a token, a write; then SIGKILL, and its Node child exits
    too (its stdin closes) instead of outliving the benchmark that started it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "testkit.ehr", "--port", "0", "--client-secret", "cli-s3cret"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().decode().strip()
        node_pid = int(proc.stdout.readline().decode().rsplit("(pid ", 1)[1].split(")")[0])
        token = httpx.post(f"{base}/token", data=FORM, auth=("gateway", "cli-s3cret")).json()
        created = httpx.post(
            f"{base}/fhir/Patient",
            json=patient("cli"),
            headers={"Authorization": f"Bearer {token['access_token']}", **FHIR_JSON},
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert created.status_code == 201
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(node_pid):
        time.sleep(0.05)
    assert not _alive(node_pid)


def _alive(pid: int) -> bool:
    """The process runs (an exited child nobody reaped yet is a zombie, state Z)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
