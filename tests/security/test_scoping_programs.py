"""API clients limited to programs (``clients create --program``): a limited client sees
only its programs' cases, the FHIR resources of their patients, and the messages that
reached them; others answer 404 (as if absent). Ops scopes cannot be combined with it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gateway.clients.service import ClientLimitError, create_client
from gateway.runtime import Runtime
from tests.conftest import ApiKeyFactory
from tests.support.events_env import Patient, new_patient

GLP1 = "glp1-weight-management"  # the program of the sample intake
READ = ("cases:read", "fhir:read", "intake:write")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def patient(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> Patient:
    return await new_patient(client, admin_headers)


async def _message_id(client: httpx.AsyncClient, headers: dict[str, str], case_id: str) -> str:
    case = (await client.get(f"/v1/cases/{case_id}", headers=headers)).json()
    return str(case["history"][0]["message_id"])


async def test_a_client_of_the_program_sees_its_case_patient_and_message(
    client: httpx.AsyncClient,
    make_api_key: ApiKeyFactory,
    admin_headers: dict[str, str],
    patient: Patient,
) -> None:
    headers = _auth(await make_api_key(*READ, programs=[GLP1]))
    assert (await client.get(f"/v1/cases/{patient.case_id}", headers=headers)).status_code == 200
    listed = (await client.get("/v1/cases", headers=headers)).json()
    assert [c["id"] for c in listed] == [patient.case_id]
    r = await client.get(f"/fhir/Patient/{patient.patient_id}", headers=headers)
    assert r.status_code == 200
    message_id = await _message_id(client, admin_headers, patient.case_id)
    assert (await client.get(f"/v1/messages/{message_id}", headers=headers)).status_code == 200


async def test_a_client_of_another_program_sees_none_of_it(
    client: httpx.AsyncClient,
    make_api_key: ApiKeyFactory,
    admin_headers: dict[str, str],
    patient: Patient,
) -> None:
    headers = _auth(await make_api_key(*READ, programs=["dermatology"]))
    r = await client.get(f"/v1/cases/{patient.case_id}", headers=headers)
    assert r.status_code == 404
    assert (await client.get("/v1/cases", headers=headers)).json() == []
    assert (
        await client.get(f"/v1/cases?program={GLP1}", headers=headers)
    ).json() == []  # asking for the program does not widen the limit
    r = await client.get(f"/fhir/Patient/{patient.patient_id}", headers=headers)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/fhir+json")
    message_id = await _message_id(client, admin_headers, patient.case_id)
    assert (await client.get(f"/v1/messages/{message_id}", headers=headers)).status_code == 404
    # control: an unlimited client sees all of it
    assert (
        await client.get(f"/fhir/Patient/{patient.patient_id}", headers=admin_headers)
    ).status_code == 200


async def test_other_resources_of_the_patient_follow_the_patient(
    client: httpx.AsyncClient,
    runtime: Runtime,
    make_api_key: ApiKeyFactory,
    patient: Patient,
) -> None:
    from sqlalchemy import select

    from gateway.db.models import FhirResource

    async with runtime.sessionmaker() as session:
        rows = (
            await session.execute(
                select(FhirResource.resource_type, FhirResource.id).where(
                    FhirResource.patient_id == patient.patient_id,
                    FhirResource.resource_type != "Patient",
                )
            )
        ).all()
    assert rows
    mine = _auth(await make_api_key(*READ, programs=[GLP1]))
    other = _auth(await make_api_key(*READ, programs=["dermatology"]))
    for rtype, rid in rows:
        assert (await client.get(f"/fhir/{rtype}/{rid}", headers=mine)).status_code == 200
        assert (await client.get(f"/fhir/{rtype}/{rid}", headers=other)).status_code == 404


async def test_a_limited_client_cannot_hold_ops_scopes(runtime: Runtime) -> None:
    async with runtime.sessionmaker() as session:
        with pytest.raises(ClientLimitError):
            await create_client(session, name="x", scopes=["ops:read"], programs=[GLP1])


def test_the_cli_creates_and_lists_a_limited_client(tmp_path: Path) -> None:
    from gateway.cli import app
    from gateway.db.migrate import upgrade

    database_url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    upgrade(database_url)
    env = {"GATEWAY_DATABASE_URL": database_url}
    runner = CliRunner()
    created = runner.invoke(
        app,
        ["clients", "create", "derm-portal", "-s", "cases:read", "--program", "dermatology"],
        env=env,
    )
    assert created.exit_code == 0, created.output
    assert "sees only the programs: dermatology" in created.output
    refused = runner.invoke(
        app, ["clients", "create", "bad", "-s", "ops:read", "--program", "dermatology"], env=env
    )
    assert refused.exit_code == 2
    assert "cannot hold" in refused.output
    listed = runner.invoke(app, ["clients", "list"], env=env)
    assert "program=dermatology" in listed.output
