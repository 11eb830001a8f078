"""The FHIR face as third-party FHIR clients see it, over a real socket on loopback:

* ``fhirpy`` (async): search, paging through ``next`` links, ``_include``, counts;
* ``fhirclient`` (SMART's Python client): the CapabilityStatement's token URL, the SMART
  Backend Services token request with a signed client assertion, then a search.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fhirclient import client as smart_client
from fhirclient.models.patient import Patient as SmartPatient
from fhirpy import AsyncFHIRClient
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.app import create_app
from gateway.clients.service import SCOPES, create_client
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests import samples
from tests.support.profiles import shared_profiles
from tests.support.served import free_socket, serve_app


@dataclass
class Served:
    """The gateway on loopback: its base URL, an admin key, the runtime."""

    base: str
    key: str
    runtime: Runtime


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Served]:
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    here = settings.model_copy(update={"public_base_url": base})
    runtime = Runtime.create(here, profiles=shared_profiles(here.profiles_dir))
    try:
        async with runtime.sessionmaker() as session:
            _, key = await create_client(session, name="admin", scopes=list(SCOPES))
            await session.commit()
        app = create_app(here, runtime=runtime, run_worker=False)
        async with serve_app(app, sock=sock, lifespan="on") as url:
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=url, headers=headers) as http:
                for _ in range(3):
                    r = await http.post("/v1/intake-submissions", json=samples.intake())
                    assert r.status_code == 202, r.text
            yield Served(url, key, runtime)
    finally:
        await runtime.close()


async def test_fhirpy_searches_pages_and_includes(served: Served) -> None:
    fhir = AsyncFHIRClient(f"{served.base}/fhir", authorization=f"Bearer {served.key}")
    patients = await fhir.resources("Patient").search(family="rivera").fetch_all()
    assert len(patients) == 3
    assert await fhir.resources("Observation").count() == 9
    # paging: 2 per page, fhirpy follows the next links
    observations = await fhir.resources("Observation").limit(2).fetch_all()
    assert len({o.id for o in observations}) == 9
    pid = patients[0].id
    raw = await (
        fhir.resources("QuestionnaireResponse")
        .search(patient=pid)
        .include("QuestionnaireResponse", "patient")
        .fetch_raw()
    )
    modes = sorted(e["search"]["mode"] for e in raw["entry"])
    assert modes == ["include", "match"]
    first = await fhir.resources("Patient").search(_id=pid).first()
    assert first is not None and first.id == pid
    vital = await (
        fhir.resources("Observation")
        .search(patient=pid, code="http://loinc.org|29463-7", date__ge="2026-01-01")
        .fetch()
    )
    assert len(vital) == 1


async def test_fhirclient_gets_a_smart_backend_token_and_searches(served: Served) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "backend-1", "alg": "RS384"})
    async with served.runtime.sessionmaker() as session:
        await create_client(
            session,
            name="network-backend",
            scopes=["fhir:read"],
            jwks={"keys": [key.as_dict(private=False)]},
        )
        await session.commit()
    now = int(time.time())
    assertion = jwt.encode(
        {"alg": "RS384", "kid": "backend-1", "typ": "JWT"},
        {
            "iss": "network-backend",
            "sub": "network-backend",
            "aud": f"{served.base}/oauth/token",
            "exp": now + 240,
            "jti": uuid.uuid4().hex,
        },
        key,
        algorithms=["RS384"],
    )

    def run() -> list[Any]:
        client = smart_client.FHIRClient(
            settings={
                "app_id": "network-backend",
                "api_base": f"{served.base}/fhir/",
                "jwt_token": assertion,
                "scope": "system/Patient.rs",
            },
            save_func=lambda _state: None,
        )
        client.wants_patient = False
        client.prepare()
        client.authorize()
        assert client.ready
        search = SmartPatient.where(struct={"family": "Rivera"})
        return list(search.perform_resources_iter(client.server))

    patients = await asyncio.to_thread(run)
    assert len(patients) == 3
