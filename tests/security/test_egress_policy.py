"""Egress control (gateway/egress.py): the URL checks, and the check on the resolved
address at connect time, against real local servers (plain HTTP and TLS with a test CA)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.egress import EgressPolicy, EgressRefusedError, egress_transport
from tests.support.tls_certs import Authority

OPEN = EgressPolicy()
LOOPBACK = EgressPolicy(allow_loopback=True)


@pytest.mark.parametrize(
    ("url", "policy", "allowed"),
    [
        ("https://ehr.example.com/fhir", OPEN, True),
        ("https://93.184.215.14/fhir", OPEN, True),
        ("http://ehr.example.com/fhir", OPEN, False),  # https only
        ("ftp://ehr.example.com/fhir", OPEN, False),
        ("https://user:secret@ehr.example.com/fhir", OPEN, False),  # credentials
        ("https://token@ehr.example.com/fhir", OPEN, False),
        ("https://169.254.169.254/latest/meta-data/", OPEN, False),  # cloud metadata
        ("https://[fd00:ec2::254]/", OPEN, False),  # AWS metadata over IPv6
        ("https://100.100.100.200/", OPEN, False),  # Alibaba metadata (shared space)
        ("https://[fe80::1]/", OPEN, False),  # link-local
        ("https://10.1.2.3/hooks", OPEN, False),  # private
        ("https://192.168.0.10/hooks", OPEN, False),
        ("https://0.0.0.0/", OPEN, False),  # unspecified
        ("https://224.0.0.1/", OPEN, False),  # multicast
        ("https://127.0.0.1/", OPEN, False),  # loopback
        ("https://[::ffff:127.0.0.1]/", OPEN, False),  # IPv4-mapped loopback
        ("https://localhost/", OPEN, False),
        ("http://127.0.0.1:8900/fhir", OPEN, False),
        ("http://127.0.0.1:8900/fhir", LOOPBACK, True),  # development, tests
        ("http://localhost:8900/fhir", LOOPBACK, True),
        ("http://[::1]:8900/fhir", LOOPBACK, True),
        ("http://ehr.example.com/fhir", LOOPBACK, False),  # http only to loopback
        ("http://169.254.169.254/", LOOPBACK, False),
        (
            "https://10.1.2.3/hooks",
            EgressPolicy.from_allowlist(["10.0.0.0/8"], allow_loopback=False),
            True,
        ),
        (
            "https://10.1.2.3/hooks",
            EgressPolicy.from_allowlist(["10.9.0.0/16"], allow_loopback=False),
            False,
        ),
    ],
)
def test_urls(url: str, policy: EgressPolicy, allowed: bool) -> None:
    if allowed:
        policy.check_url(url)
    else:
        with pytest.raises(EgressRefusedError) as refused:
            policy.check_url(url)
        assert "secret" not in str(refused.value)


def test_an_allowlist_entry_that_is_neither_a_network_nor_a_host_is_refused() -> None:
    with pytest.raises(ValueError, match="neither"):
        EgressPolicy.from_allowlist(["ehr internal/fhir"], allow_loopback=False)


# --------------------------------------------------------------------------- connect time


class Hits:
    """Requests a local server got."""

    def __init__(self) -> None:
        self.count = 0

    async def endpoint(self, request: Request) -> PlainTextResponse:
        self.count += 1
        return PlainTextResponse("ok")


@contextlib.contextmanager
def serve(hits: Hits, *, tls: tuple[Path, Path] | None = None) -> Iterator[int]:
    """A Starlette app on 127.0.0.1 (uvicorn in a thread, TLS with ``(cert, key)``)."""
    app = Starlette(routes=[Route("/", hits.endpoint)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        loop="asyncio",
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(2000):
            if server.started:
                break
            threading.Event().wait(0.005)
        yield port
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


@pytest.fixture
def hits() -> Hits:
    return Hits()


@pytest.fixture
def plain_port(hits: Hits) -> Iterator[int]:
    with serve(hits) as port:
        yield port


async def _get(policy: EgressPolicy, url: str, **kw: object) -> httpx.Response:
    async with httpx.AsyncClient(transport=egress_transport(policy, **kw)) as client:  # type: ignore[arg-type]
        return await client.get(url)


async def test_a_loopback_address_is_refused_at_connect_time(hits: Hits, plain_port: int) -> None:
    with pytest.raises(httpx.ConnectError, match="refused"):
        await _get(OPEN, f"http://127.0.0.1:{plain_port}/")
    assert hits.count == 0
    # control: the same request where loopback is allowed reaches the server
    assert (await _get(LOOPBACK, f"http://127.0.0.1:{plain_port}/")).text == "ok"
    assert hits.count == 1


async def test_the_resolved_address_is_checked_not_the_name(hits: Hits, plain_port: int) -> None:
    """``localhost`` is a name: the URL text says nothing of its address; the connection
    is refused because it resolves to 127.0.0.1 (as a name that rebinds to an internal
    address would be)."""
    with pytest.raises(httpx.ConnectError, match="refused"):
        await _get(OPEN, f"http://localhost:{plain_port}/")
    assert hits.count == 0


async def test_an_allowlisted_network_or_host_is_reached(hits: Hits, plain_port: int) -> None:
    by_network = EgressPolicy.from_allowlist(["127.0.0.0/8"], allow_loopback=False)
    by_host = EgressPolicy.from_allowlist(["localhost"], allow_loopback=False)
    assert (await _get(by_network, f"http://127.0.0.1:{plain_port}/")).status_code == 200
    assert (await _get(by_host, f"http://localhost:{plain_port}/")).status_code == 200
    assert hits.count == 2


@pytest.fixture
def tls_server(tmp_path: Path, hits: Hits) -> Iterator[tuple[int, ssl.SSLContext]]:
    ca = Authority.create(tmp_path / "pki", "egress")
    server = ca.issue("localhost", server=True)
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    with serve(hits, tls=(server.cert, server.key)) as port:
        yield port, context


async def test_tls_still_verifies_the_host_name_after_the_address_is_pinned(
    hits: Hits, tls_server: tuple[int, ssl.SSLContext]
) -> None:
    """The connection goes to the checked address, the TLS handshake still names the
    host: the certificate for ``localhost`` verifies, and without the CA it does not."""
    port, context = tls_server
    allowed = EgressPolicy.from_allowlist(["localhost"], allow_loopback=False)
    r = await _get(allowed, f"https://localhost:{port}/", ssl_context=context)
    assert r.text == "ok"
    with pytest.raises(httpx.ConnectError):
        await _get(allowed, f"https://localhost:{port}/")  # the certifi CAs only
    assert hits.count == 1
