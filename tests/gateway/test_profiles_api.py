"""Profile routes: preview (writes nothing), reload (API and SIGHUP), Questionnaires."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import func, select

from gateway.db.models import AuditEntry, FhirResource, InboundMessage
from gateway.profiles.service import install_sighup_reload
from gateway.runtime import Runtime
from tests import samples
from tests.conftest import ApiKeyFactory
from tests.support.profiles import GLP1_V1, copy_profiles, edit_yaml

QUESTIONNAIRE_URL = "https://fhir-gateway.example.org/fhir/Questionnaire/glp1-weight-management"


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    return copy_profiles(tmp_path / "profiles")


async def _rows(runtime: Runtime) -> int:
    async with runtime.sessionmaker() as session:
        total = 0
        for model in (FhirResource, InboundMessage):
            total += int(await session.scalar(select(func.count()).select_from(model)) or 0)
        return total


async def _headers(make_api_key: ApiKeyFactory, *scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {await make_api_key(*scopes)}"}


async def test_preview_returns_the_bundle_and_writes_nothing(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key, "profiles:write")
    before = await _rows(runtime)
    r = await client.post("/v1/profiles/preview", json={"input": samples.intake()}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] is True and body["issues"] == []
    assert body["kind"] == "intake"
    assert body["profile"].startswith("intake/glp1-weight-management/1#sha256=")
    Bundle.model_validate(body["bundle"])
    types = [e["resource"]["resourceType"] for e in body["bundle"]["entry"]]
    assert types[:2] == ["Patient", "QuestionnaireResponse"] and types[-1] == "Provenance"
    assert await _rows(runtime) == before
    async with runtime.sessionmaker() as session:  # only its audit entry (PHI went in)
        (entry,) = (await session.scalars(select(AuditEntry))).all()
    assert (entry.action, entry.entity_type, entry.patient_id) == ("preview", "Profile", None)


async def test_preview_of_invalid_input_lists_issues_without_values(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key, "profiles:write")
    intake = samples.intake()
    intake["answers"]["weight_lb"] = "Jordan-heavy"
    r = await client.post("/v1/profiles/preview", json={"input": intake}, headers=headers)
    assert r.status_code == 200
    body = r.json()
    assert body["valid"] is False
    assert body["issues"] == [
        {
            "location": "answers.weight_lb",
            "code": "invalid_answer",
            "message": "expected a number in lb",
        }
    ]
    assert "Jordan-heavy" not in r.text
    assert body["bundle"]["entry"] == []


async def test_preview_with_a_draft_profile(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory, profiles_dir: Path
) -> None:
    headers = await _headers(make_api_key, "profiles:write")
    draft = (
        (profiles_dir / GLP1_V1)
        .read_text()
        .replace("What is your current weight?", "How much do you weigh today?")
    )
    r = await client.post(
        "/v1/profiles/preview", json={"input": samples.intake(), "profile": draft}, headers=headers
    )
    assert r.status_code == 200, r.text
    qr = r.json()["bundle"]["entry"][1]["resource"]
    assert qr["item"][0]["text"] == "How much do you weigh today?"
    # the deployed profile is unchanged
    assert runtime.profiles.current.intake[("glp1-weight-management", "1")].items[0].text == (
        "What is your current weight?"
    )


async def test_preview_with_a_draft_of_another_version_refuses_the_input(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, profiles_dir: Path
) -> None:
    """Issue 15: the v2 draft with a v1 input is refused, not previewed with deployed v1."""
    headers = await _headers(make_api_key, "profiles:write")
    draft = (profiles_dir / "intake/glp1-weight-management-v2.yaml").read_text()
    r = await client.post(
        "/v1/profiles/preview", json={"input": samples.intake(), "profile": draft}, headers=headers
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] is False
    assert body["bundle"]["entry"] == []
    [issue] = body["issues"]
    assert (issue["location"], issue["code"]) == ("form", "other_profile")
    assert "intake/glp1-weight-management/2" in issue["message"]


async def test_preview_with_an_invalid_draft_names_file_line_and_path(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory, profiles_dir: Path
) -> None:
    headers = await _headers(make_api_key, "profiles:write")
    draft = (profiles_dir / GLP1_V1).read_text().replace("type: integer", "type: number")
    r = await client.post(
        "/v1/profiles/preview", json={"input": samples.intake(), "profile": draft}, headers=headers
    )
    assert r.status_code == 422
    (error,) = r.json()["errors"]
    assert error["field"].startswith("intake/_draft.yaml:")
    assert error["field"].endswith(".type")
    assert error["pointer"] == "#/profile"  # the body member holding the draft


async def test_preview_of_a_stripe_event(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key, "profiles:write")
    r = await client.post(
        "/v1/profiles/preview", json={"input": samples.stripe_event()}, headers=headers
    )
    body = r.json()
    assert body["kind"] == "stripe" and body["valid"] is True
    assert [e["resource"]["resourceType"] for e in body["bundle"]["entry"]] == [
        "Patient",
        "MedicationRequest",
        "Provenance",
    ]


async def test_preview_needs_profiles_write(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key, "intake:write")
    r = await client.post("/v1/profiles/preview", json={"input": {}}, headers=headers)
    assert r.status_code == 403
    r = await client.post("/v1/profiles/preview", json={"input": {}})
    assert r.status_code == 401


async def test_reload_picks_up_a_new_form_version(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory, profiles_dir: Path
) -> None:
    headers = await _headers(make_api_key, "ops:admin")
    text = (profiles_dir / GLP1_V1).read_text().replace('version: "1"', 'version: "1.1"')
    (profiles_dir / "intake/glp1-weight-management-v1.1.yaml").write_text(text)
    r = await client.post("/v1/ops/profiles/reload", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == ["intake/glp1-weight-management/1.1"]
    assert ("glp1-weight-management", "1.1") in runtime.profiles.current.intake


async def test_invalid_set_is_refused_and_the_running_set_stays(
    client: httpx.AsyncClient, runtime: Runtime, make_api_key: ApiKeyFactory, profiles_dir: Path
) -> None:
    headers = await _headers(make_api_key, "ops:admin", "intake:write")
    running = runtime.profiles.current
    edit_yaml(profiles_dir / GLP1_V1, lambda d: d["derived"]["flags"][0].update(when="item.where("))
    r = await client.post("/v1/ops/profiles/reload", headers=headers)
    assert r.status_code == 422
    (error,) = r.json()["errors"]
    assert error["code"] == "fhirpath-syntax"
    assert error["field"].startswith(f"{GLP1_V1}:")
    assert "pointer" not in error  # a file's problem, not one in the (empty) request body
    assert runtime.profiles.current is running
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=headers)
    assert r.status_code == 202


async def test_reload_needs_ops_admin(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key, "profiles:write")
    assert (await client.post("/v1/ops/profiles/reload", headers=headers)).status_code == 403


async def test_sighup_reloads(
    runtime: Runtime, profiles_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert install_sighup_reload(runtime)
    try:
        before = runtime.profiles.current
        edit_yaml(profiles_dir / GLP1_V1, lambda d: d.update(title="Retitled by SIGHUP"))
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if runtime.profiles.current is not before:
                break
        assert runtime.profiles.current.intake[("glp1-weight-management", "1")].title == (
            "Retitled by SIGHUP"
        )
        # an invalid set on SIGHUP: refused, the running set stays
        current = runtime.profiles.current
        edit_yaml(profiles_dir / GLP1_V1, lambda d: d.update(status="live"))
        capsys.readouterr()
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.1)
        assert runtime.profiles.current is current
        # the log says what is wrong (file, line, path, rule), not only how many problems
        [line] = [x for x in capsys.readouterr().out.splitlines() if "reload_refused" in x]
        # key=value (structlog's default) or JSON (after configure_logging in this process)
        assert re.search(r'count"?[=:] ?1\b', line), line
        assert "intake/glp1-weight-management-v1.yaml:5: status" in line
        assert "literal_error" in line
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


async def test_questionnaire_search_by_url_and_version(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key, "fhir:read")
    r = await client.get(
        "/fhir/Questionnaire", params={"url": QUESTIONNAIRE_URL, "version": "2"}, headers=headers
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = r.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset" and bundle["total"] == 1
    q = bundle["entry"][0]["resource"]
    assert (q["url"], q["version"]) == (QUESTIONNAIRE_URL, "2")
    all_versions = (
        await client.get("/fhir/Questionnaire", params={"url": QUESTIONNAIRE_URL}, headers=headers)
    ).json()
    assert sorted(e["resource"]["version"] for e in all_versions["entry"]) == ["1", "2"]
    canonical = (
        await client.get(
            "/fhir/Questionnaire", params={"url": f"{QUESTIONNAIRE_URL}|1"}, headers=headers
        )
    ).json()
    assert [e["resource"]["version"] for e in canonical["entry"]] == ["1"]
    none = (
        await client.get("/fhir/Questionnaire", params={"url": "urn:x"}, headers=headers)
    ).json()
    assert none["total"] == 0 and none["entry"] == []


async def test_questionnaire_of_a_stored_response_resolves(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key, "fhir:read", "intake:write")
    r = await client.post("/v1/intake-submissions", json=samples.intake(), headers=headers)
    qr_ref = next(
        x["reference"]
        for x in r.json()["resources"]
        if x["resourceType"] == "QuestionnaireResponse"
    )
    qr: dict[str, Any] = (await client.get(f"/fhir/{qr_ref}", headers=headers)).json()
    url, version = qr["questionnaire"].split("|")
    found = (
        await client.get(
            "/fhir/Questionnaire", params={"url": url, "version": version}, headers=headers
        )
    ).json()
    (entry,) = found["entry"]
    linkids = {i["linkId"] for i in entry["resource"]["item"]}
    assert {i["linkId"] for i in qr["item"]} <= linkids
    read = await client.get(f"/fhir/Questionnaire/{entry['resource']['id']}", headers=headers)
    assert read.json() == entry["resource"]
    missing = await client.get("/fhir/Questionnaire/nope-9", headers=headers)
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"


async def test_questionnaire_needs_fhir_read(
    client: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    headers = await _headers(make_api_key, "intake:write")
    assert (await client.get("/fhir/Questionnaire", headers=headers)).status_code == 403
    assert (
        json.loads((await client.get("/fhir/Questionnaire")).text)["resourceType"]
        == "OperationOutcome"
    )
