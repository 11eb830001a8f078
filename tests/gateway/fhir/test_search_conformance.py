"""FHIR R4 search against the gateway with plain httpx, case by case from the spec's
search rules (https://hl7.org/fhir/R4/search.html), and every search parameter the
CapabilityStatement lists exercised at least once."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from sqlalchemy import select

from gateway.db.models import AuditEntry
from gateway.runtime import Runtime
from tests.gateway.fhir.conftest import FHIR_JSON, Stored

pytestmark = pytest.mark.usefixtures("stored")


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == mode
    ]


async def search(
    client: httpx.AsyncClient, headers: dict[str, str], path: str, **params: Any
) -> dict[str, Any]:
    r = await client.get(f"/fhir/{path}", params=params, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    body: dict[str, Any] = r.json()
    Bundle.model_validate(body)
    assert body["type"] == "searchset"
    return body


def cases(s: Stored) -> list[tuple[str, dict[str, str], int]]:
    """(type, params, expected total): each search parameter of the CapabilityStatement."""
    pid, other = s.patient_id, s.other_out["patient"]["id"]
    ext = s.intake["patient"]["external_id"]
    email = s.intake["patient"]["email"]
    return [
        ("Patient", {"_id": pid}, 1),
        ("Patient", {"_lastUpdated": "gt2000-01-01"}, 3),
        (
            "Patient",
            {"identifier": f"https://fhir-gateway.example.org/sid/external-patient-id|{ext}"},
            1,
        ),
        ("Patient", {"identifier": ext}, 1),
        ("Patient", {"name": "jor"}, 2),
        ("Patient", {"name": "ELODIE"}, 1),  # accents and case ignored
        ("Patient", {"family": "Bronte"}, 1),
        ("Patient", {"family:exact": "Bronte"}, 0),
        ("Patient", {"family:exact": "Brontë"}, 1),
        ("Patient", {"family:contains": "ont"}, 1),
        ("Patient", {"given": "Jordan"}, 2),
        ("Patient", {"birthdate": "1988-04-12"}, 1),
        ("Patient", {"birthdate": "lt1980"}, 1),
        ("Patient", {"birthdate": "ge1975-02"}, 2),
        ("Patient", {"gender": "female"}, 2),
        ("Patient", {"telecom": "+14155552671"}, 2),
        ("Patient", {"telecom": "phone|4155552671"}, 2),
        ("Patient", {"email": email.upper()}, 1),
        ("Patient", {"phone": "(212) 555-0142"}, 1),
        ("Patient", {"address": "san fran"}, 3),
        ("Patient", {"active:missing": "true"}, 3),
        ("QuestionnaireResponse", {"patient": pid}, 1),
        ("QuestionnaireResponse", {"subject": f"Patient/{other}"}, 1),
        (
            "QuestionnaireResponse",
            {
                "questionnaire": "https://fhir-gateway.example.org/fhir/Questionnaire/glp1-weight-management"
            },
            2,
        ),
        ("QuestionnaireResponse", {"authored": "ge2026-11-23T00:00:00-05:00"}, 2),
        ("QuestionnaireResponse", {"authored": "lt2026-11-23"}, 0),
        ("QuestionnaireResponse", {"status": "completed"}, 2),
        (
            "QuestionnaireResponse",
            {
                "identifier": f"https://fhir-gateway.example.org/sid/intake-submission|{s.intake['submission_id']}"
            },
            1,
        ),
        ("QuestionnaireResponse", {"_id": "no-such-id"}, 0),
        ("QuestionnaireResponse", {"_lastUpdated": "ge2000"}, 2),
        ("MedicationRequest", {"status": "draft"}, 1),
        ("MedicationRequest", {"intent": "proposal,order"}, 1),
        ("MedicationRequest", {"authoredon": "2026-11-23"}, 1),
        ("MedicationRequest", {"authoredon": "ne2026-11-23"}, 0),
        ("MedicationRequest", {"patient": s.checkout_out["patient"]["id"]}, 1),
        ("MedicationRequest", {"subject": f"Patient/{pid}"}, 0),
        (
            "MedicationRequest",
            {"identifier": "https://fhir-gateway.example.org/sid/checkout-session|"},
            1,
        ),
        ("MedicationRequest", {"_id": "x"}, 0),
        ("MedicationRequest", {"_lastUpdated": "le2000"}, 0),
        ("Observation", {"patient": pid}, 3),
        ("Observation", {"subject": f"Patient/{pid}"}, 3),
        ("Observation", {"code": "http://loinc.org|29463-7"}, 2),
        ("Observation", {"code:text": "body w"}, 2),
        ("Observation", {"code:not": "http://loinc.org|29463-7"}, 4),
        ("Observation", {"category": "vital-signs"}, 6),
        ("Observation", {"date": "sa2026-11-23"}, 0),
        ("Observation", {"date": "eb2026-11-24"}, 6),
        ("Observation", {"status": "final"}, 6),
        ("Observation", {"identifier": "|x"}, 0),
        ("Observation", {"_id": "x"}, 0),
        ("Observation", {"_lastUpdated": "ap2026"}, 6),
        ("Consent", {"patient": pid}, 2),
        ("Consent", {"date": "2026-11-23"}, 4),
        ("Consent", {"status": "active"}, 4),
        ("Consent", {"category": "http://loinc.org|59284-0"}, 4),
        ("Consent", {"scope": "treatment"}, 2),
        ("Consent", {"identifier": "x"}, 0),
        ("Consent", {"_id": "x"}, 0),
        ("Consent", {"_lastUpdated": "gt2000"}, 4),
        ("Provenance", {"target": f"Patient/{pid}"}, 1),
        ("Provenance", {"patient": pid}, 1),
        ("Provenance", {"recorded": "gt2000-01-01T00:00:00Z"}, 3),
        ("Provenance", {"agent": f"Patient/{pid}"}, 1),
        ("Provenance", {"_id": "x"}, 0),
        ("Provenance", {"_lastUpdated": "gt2000"}, 3),
        ("Flag", {"patient": pid}, 0),
        ("Flag", {"subject": pid}, 0),
        ("Flag", {"date": "ge2000"}, 0),
        ("Flag", {"status": "active"}, 0),
        ("Flag", {"identifier": "x"}, 0),
        ("Flag", {"_id": "x"}, 0),
        ("Flag", {"_lastUpdated": "gt2000"}, 0),
    ]


async def test_every_capability_search_parameter_is_exercised(
    client: httpx.AsyncClient, admin_headers: dict[str, str], stored: Stored
) -> None:
    r = await client.get("/fhir/metadata")
    assert r.status_code == 200
    statement = r.json()
    CapabilityStatement.model_validate(statement)
    table = cases(stored)
    exercised = {(t, name.split(":")[0]) for t, params, _ in table for name in params}
    listed = {
        (res["type"], p["name"])
        for res in statement["rest"][0]["resource"]
        if res["type"] not in ("AuditEvent", "Questionnaire")  # tested in their own modules
        for p in res.get("searchParam", [])
    }
    assert len(listed) > 40
    assert listed - exercised == set()
    for rtype, params, total in table:
        body = await search(client, admin_headers, rtype, **params)
        assert body["total"] == total, (rtype, params, ids(body))
        assert len(ids(body)) == total


async def test_paging_links_walk_every_match_once(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = await search(client, admin_headers, "Observation", _count="4", _sort="-_lastUpdated")
    assert body["total"] == 6
    seen = ids(body)
    relations = {link["relation"]: link["url"] for link in body["link"]}
    assert set(relations) == {"self", "first", "next", "last"}
    nxt = urlsplit(relations["next"])
    page2 = await search(client, admin_headers, "Observation", **dict(parse_qsl(nxt.query)))
    assert "next" not in {link["relation"] for link in page2["link"]}
    assert "previous" in {link["relation"] for link in page2["link"]}
    seen += ids(page2)
    assert len(seen) == len(set(seen)) == 6


async def test_summary_count_has_a_total_and_no_entries(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = await search(client, admin_headers, "Patient", _summary="count")
    assert body["total"] == 3
    assert "entry" not in body


async def test_elements_keeps_the_named_elements_and_tags_subsetted(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = await search(client, admin_headers, "Patient", _elements="name,birthDate")
    for entry in body["entry"]:
        assert set(entry["resource"]) <= {"resourceType", "id", "meta", "name", "birthDate"}
        assert "SUBSETTED" in {t["code"] for t in entry["resource"]["meta"]["tag"]}


async def test_include_and_revinclude_add_entries_in_include_mode(
    client: httpx.AsyncClient, admin_headers: dict[str, str], stored: Stored
) -> None:
    body = await search(
        client,
        admin_headers,
        "QuestionnaireResponse",
        patient=stored.patient_id,
        _include="QuestionnaireResponse:patient",
        _revinclude="Provenance:target",
    )
    assert body["total"] == 1
    included = ids(body, "include")
    assert f"Patient/{stored.patient_id}" in included
    assert any(ref.startswith("Provenance/") for ref in included)


async def test_unknown_parameter_is_ignored_and_left_out_of_the_self_link(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = await search(client, admin_headers, "Patient", family="Rivera", shoe_size="9")
    assert body["total"] == 2
    self_link = next(link["url"] for link in body["link"] if link["relation"] == "self")
    assert "shoe_size" not in self_link and "family=Rivera" in self_link


async def test_unknown_parameter_with_strict_handling_is_an_operation_outcome(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.get(
        "/fhir/Patient",
        params={"family": "Rivera", "shoe_size": "9"},
        headers={**admin_headers, "Prefer": "handling=strict"},
    )
    assert r.status_code == 400
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["shoe_size"]


@pytest.mark.parametrize(
    "params",
    [
        {"birthdate": "yesterday"},
        {"birthdate": "xx2020"},
        {"_count": "-1"},
        {"_count": "501"},
        {"_total": "maybe"},
        {"name": ""},
    ],
)
async def test_a_value_that_cannot_be_read_is_a_400_outcome(
    client: httpx.AsyncClient, admin_headers: dict[str, str], params: dict[str, str]
) -> None:
    r = await client.get("/fhir/Patient", params=params, headers=admin_headers)
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.headers["content-type"].startswith(FHIR_JSON)


async def test_sort_by_last_updated_descending(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    up = await search(client, admin_headers, "Patient", _sort="_lastUpdated")
    down = await search(client, admin_headers, "Patient", _sort="-_lastUpdated")
    assert ids(up) == list(reversed(ids(down)))


async def test_search_is_audited_with_each_patient_returned(
    client: httpx.AsyncClient, admin_headers: dict[str, str], stored: Stored, runtime: Runtime
) -> None:
    await search(client, admin_headers, "Observation", patient=stored.patient_id)
    async with runtime.sessionmaker() as session:
        rows = list(
            await session.scalars(
                select(AuditEntry).where(
                    AuditEntry.action == "search", AuditEntry.entity_type == "Observation"
                )
            )
        )
    assert [(r.patient_id, r.code) for r in rows] == [(stored.patient_id, "E")]
    assert rows[0].query is not None and rows[0].query.startswith("Observation?patient=")


async def test_a_key_without_fhir_read_is_refused(
    client: httpx.AsyncClient, make_api_key: Any
) -> None:
    key = await make_api_key("intake:write")
    r = await client.get("/fhir/Patient", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_audit_event_and_questionnaire_search_parameters_listed_are_served(
    client: httpx.AsyncClient, make_api_key: Any, stored: Stored
) -> None:
    from gateway.clients.service import SCOPES

    admin_headers = {"Authorization": f"Bearer {await make_api_key(*SCOPES, name='auditor')}"}
    await search(client, admin_headers, "Patient")  # audited as the agent "auditor"
    statement = (await client.get("/fhir/metadata")).json()
    values = {
        ("AuditEvent", "patient"): f"Patient/{stored.patient_id}",
        ("AuditEvent", "agent"): "auditor",
        ("AuditEvent", "date"): "ge2000-01-01",
        ("AuditEvent", "action"): "C",
        ("Questionnaire", "url"): "https://fhir-gateway.example.org/fhir/Questionnaire/"
        "glp1-weight-management",
        ("Questionnaire", "version"): "1",
    }
    listed = [
        (res["type"], p["name"])
        for res in statement["rest"][0]["resource"]
        if res["type"] in ("AuditEvent", "Questionnaire")
        for p in res.get("searchParam", [])
    ]
    assert sorted(listed) == sorted(values)
    for (rtype, name), value in values.items():
        body = await search(client, admin_headers, rtype, **{name: value})
        assert body.get("entry"), (rtype, name)


async def test_a_client_limited_to_other_programs_finds_nothing(
    client: httpx.AsyncClient, make_api_key: Any, stored: Stored
) -> None:
    key = await make_api_key("fhir:read", programs=["dermatology"])
    headers = {"Authorization": f"Bearer {key}"}
    for rtype in ("Patient", "Observation", "QuestionnaireResponse", "Provenance"):
        body = await search(client, headers, rtype)
        assert body["total"] == 0, rtype
    everything = await client.get(f"/fhir/Patient/{stored.patient_id}/$everything", headers=headers)
    assert everything.status_code == 404
    glp1 = await make_api_key("fhir:read", programs=["glp1-weight-management"])
    body = await search(client, {"Authorization": f"Bearer {glp1}"}, "Patient")
    assert body["total"] == 3  # each has a case in the program (intake or paid checkout)


async def test_search_with_post_and_a_form_body(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    r = await client.post(
        "/fhir/Patient/_search", data={"family": "rivera", "_count": "1"}, headers=admin_headers
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 2 and len(body["entry"]) == 1
    wrong = await client.post("/fhir/Patient/_search", json={"family": "x"}, headers=admin_headers)
    assert wrong.status_code == 415
    assert wrong.json()["resourceType"] == "OperationOutcome"
