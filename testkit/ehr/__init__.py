"""A local EHR for tests and benchmarks: an OAuth token endpoint plus a real FHIR R4 server.

The FHIR semantics come from Medplum's FHIR server (:mod:`testkit.fhir_server`, one Node
process with a tenant per EHR); :class:`LocalEhr` adds the token endpoint, bearer checks,
scripted faults and request records in front (see :mod:`testkit.ehr.server`)::

    with FhirServer() as fhir:                       # once per test session / benchmark
        ehr = LocalEhr(fhir, client_id="gateway", client_secret="s3cret")
        async with run_ehr_async(ehr) as running:    # this EHR on a local port
            ...  # deliver to running.fhir_base, fetch tokens from running.token_url
            ehr.fail_fhir(2, 503, retry_after=1)     # the next two FHIR requests fail
            assert ehr.count("Patient") == 1         # read from the FHIR server

Standalone (benchmarks, manual tests; starts its own FHIR server)::

    python -m testkit.ehr --port 8900 --delay-ms 50 --client-id gateway --client-secret s3cret
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Final

import uvicorn
from uvicorn.config import LoopFactoryType

from testkit.ehr.server import (
    Fault,
    FhirRequest,
    JsonObject,
    LocalEhr,
    ResourcePredicate,
    TokenRequest,
    operation_outcome,
)
from testkit.fhir_server import FhirServer, FhirServerUnavailableError

__all__ = [
    "Fault",
    "FhirRequest",
    "FhirServer",
    "FhirServerUnavailableError",
    "JsonObject",
    "LocalEhr",
    "ResourcePredicate",
    "RunningEhr",
    "TokenRequest",
    "operation_outcome",
    "run_ehr",
    "run_ehr_async",
]


@dataclass(frozen=True)
class RunningEhr:
    """A local EHR being served on a local port."""

    ehr: LocalEhr
    base_url: str
    """``http://127.0.0.1:PORT``"""

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


_STARTUP_TIMEOUT_S: Final = 10.0
_GRACEFUL_STOP_S: Final = 3.0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free port the OS picks, so no race with other
    tests). Connections wait in its backlog until the server accepts them, so the URL works
    as soon as it is printed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_config(
    ehr: LocalEhr, *, host: str, port: int, loop: LoopFactoryType, standalone: bool = False
) -> uvicorn.Config:
    """How the EHR's ASGI app is served: quiet, no websockets, its lifespan on."""
    return uvicorn.Config(
        ehr.app,
        host=host,
        port=port,
        log_level="warning",
        # In tests, leave the process's logging alone (pytest captures uvicorn's records).
        log_config=uvicorn.config.LOGGING_CONFIG if standalone else None,
        access_log=False,
        lifespan="on",
        ws="none",  # no websockets: avoids importing their deprecated legacy implementation
        loop=loop,
    )


class _ServerThread:
    """uvicorn serving ``ehr.app`` in a daemon thread with its own event loop."""

    def __init__(self, ehr: LocalEhr, *, host: str, port: int) -> None:
        self.ehr = ehr
        self.sock = bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(ehr, host=host, port=self.port, loop="asyncio"))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"local-ehr:{self.port}", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # reported by is_started() in the caller's thread
            self.error = exc

    def start(self) -> None:
        self.ehr._stopping.clear()
        self.thread.start()

    def is_started(self) -> bool:
        if self.error is not None or not self.thread.is_alive():
            raise RuntimeError("The local EHR server failed to start") from self.error
        return bool(self.server.started)

    def request_stop(self, *, force: bool = False) -> None:
        self.ehr._stopping.set()  # cuts injected hangs and delays short
        self.server.should_exit = True
        if force:
            self.server.force_exit = True

    def close(self) -> None:
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError("The local EHR server thread did not stop")


@contextlib.contextmanager
def run_ehr(ehr: LocalEhr, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[RunningEhr]:
    """Serve ``ehr`` over HTTP in a background thread for the duration of the block.

    The block may end and a later one serve the same ``ehr`` again (on the same port, to
    play an EHR that was down): its FHIR data, tokens and records stay.
    """
    server = _ServerThread(ehr, host=host, port=port)
    server.start()
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.is_started():
            if time.monotonic() > deadline:
                raise TimeoutError("The local EHR did not start in time")
            time.sleep(0.005)
        yield RunningEhr(ehr, server.base_url)
    finally:
        server.request_stop()
        server.thread.join(_GRACEFUL_STOP_S)
        if server.thread.is_alive():
            server.request_stop(force=True)
            server.thread.join(_GRACEFUL_STOP_S)
        server.close()


@contextlib.asynccontextmanager
async def run_ehr_async(
    ehr: LocalEhr, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningEhr]:
    """Like :func:`run_ehr` but waits without blocking the caller's event loop."""
    server = _ServerThread(ehr, host=host, port=port)
    server.start()
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.is_started():
            if time.monotonic() > deadline:
                raise TimeoutError("The local EHR did not start in time")
            await asyncio.sleep(0.005)
        yield RunningEhr(ehr, server.base_url)
    finally:
        server.request_stop()
        await asyncio.to_thread(server.thread.join, _GRACEFUL_STOP_S)
        if server.thread.is_alive():
            server.request_stop(force=True)
            await asyncio.to_thread(server.thread.join, _GRACEFUL_STOP_S)
        server.close()
