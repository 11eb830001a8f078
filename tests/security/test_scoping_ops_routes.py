"""``/metrics`` and the API documentation behind authentication when the settings ask
for it (``GATEWAY_METRICS_AUTH``, ``GATEWAY_DOCS``); open by default, as before."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import create_app
from gateway.runtime import Runtime
from gateway.settings import Settings
from tests.conftest import ApiKeyFactory

DOCS = ("/openapi.json", "/docs", "/redoc")


async def _client(settings: Settings, runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, runtime=runtime, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        yield http


@pytest.fixture
async def guarded(settings: Settings, runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    strict = settings.model_copy(update={"metrics_auth": True, "docs": "authenticated"})
    async for http in _client(strict, dataclasses.replace(runtime, settings=strict)):
        yield http


async def test_metrics_need_ops_read_when_asked(
    guarded: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    assert (await guarded.get("/metrics")).status_code == 401
    other = await make_api_key("cases:read")
    r = await guarded.get("/metrics", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 403
    ops = await make_api_key("ops:read")
    r = await guarded.get("/metrics", headers={"Authorization": f"Bearer {ops}"})
    assert r.status_code == 200
    assert "# TYPE" in r.text


async def test_docs_need_a_key_when_asked(
    guarded: httpx.AsyncClient, make_api_key: ApiKeyFactory
) -> None:
    key = await make_api_key("cases:read")
    for path in DOCS:
        assert (await guarded.get(path)).status_code == 401, path
        r = await guarded.get(path, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, path
    document = (
        await guarded.get("/openapi.json", headers={"Authorization": f"Bearer {key}"})
    ).json()
    assert "/v1/hl7v2" in document["paths"]


async def test_docs_can_be_turned_off(settings: Settings, runtime: Runtime) -> None:
    off = settings.model_copy(update={"docs": "off"})
    async for http in _client(off, runtime):
        for path in DOCS:
            assert (await http.get(path)).status_code == 404, path


async def test_by_default_metrics_and_docs_stay_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/metrics")).status_code == 200
    for path in DOCS:
        assert (await client.get(path)).status_code == 200, path
