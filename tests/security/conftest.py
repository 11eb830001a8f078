"""Fixtures of the security tests (``tests/security/``): the app as an attacker meets it.

Generic on purpose: each ``test_*`` file of this folder (auth matrix, fuzzing, HL7
senders, egress, client scoping, audit trail, secrets) builds on these and on the shared
fixtures of ``tests/conftest.py`` (``settings``, ``runtime``, ``make_api_key``,
``admin_headers``; ``database_url`` runs a test on SQLite and PostgreSQL).

* ``app``: the FastAPI app wired to the test's runtime (no worker);
* ``client``: an ``httpx.AsyncClient`` talking to ``app`` in-process, lifespan run;
* ``openapi``: the OpenAPI document the app serves at ``/openapi.json``;
* :func:`operations`: every (method, path, operation) of a document.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.runtime import Runtime
from gateway.settings import Settings

#: The HTTP methods an OpenAPI path item may hold operations for.
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every operation of an OpenAPI document: ``(METHOD, path, operation object)``."""
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method.upper(), path, operation


@pytest.fixture
def app(settings: Settings, runtime: Runtime) -> FastAPI:
    """The gateway app on the test's runtime (no worker in the process)."""
    return create_app(settings, runtime=runtime, run_worker=False)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to ``app`` in-process (lifespan run)."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
        ) as http,
    ):
        yield http


@pytest.fixture
def openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app`` (what ``GET /openapi.json`` serves)."""
    return app.openapi()
