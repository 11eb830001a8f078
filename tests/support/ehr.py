"""Fixtures for the local EHR (:mod:`testkit.ehr`) over the local FHIR server.

The FHIR server (Node) starts once per test session, the first time a test asks for it,
and every EHR a test makes gets its own tenant: tests never see each other's data. Without
Node or its npm packages (``make fhir-server``) the tests that need it skip with the
reason, except under ``CI=true``, where they fail (as PostgreSQL tests do).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from testkit.ehr import LocalEhr
from testkit.fhir_server import FhirServer, FhirServerUnavailableError, unavailable_reason

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

EhrFactory = Callable[..., LocalEhr]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but the local FHIR server cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    """The session's FHIR server (Medplum under Node), started on first use."""
    reason = unavailable_reason()
    if reason is not None:
        _unavailable(reason)
    server = FhirServer(log_path=tmp_path_factory.mktemp("fhir-server") / "node.log")
    try:
        server.start()
    except FhirServerUnavailableError as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_ehr(fhir_server: FhirServer) -> Iterator[EhrFactory]:
    """``make_ehr(**options)``: a :class:`LocalEhr` with its own tenant (dropped afterwards)."""
    made: list[LocalEhr] = []

    def make(**options: Any) -> LocalEhr:
        ehr = LocalEhr(fhir_server, **options)
        made.append(ehr)
        return ehr

    yield make
    for ehr in made:
        ehr.close()
