"""The MLLP listener's connection limits: a cap on open connections, one per peer
address, and an idle timeout between messages (the issue's 19,000 held connections)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.hl7.mllp import MllpServer
from gateway.runtime import Runtime

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def make_server(runtime: Runtime) -> AsyncIterator[Callable[..., MllpServer]]:
    servers: list[MllpServer] = []

    def make(**kw: object) -> MllpServer:
        server = MllpServer(runtime, port=0, allow_plaintext=True, **kw)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


async def _closed_by_server(streams: Streams, timeout_s: float = 5) -> bool:
    """True when the server closed the connection (EOF) within ``timeout_s``."""
    reader, _ = streams
    try:
        return await asyncio.wait_for(reader.read(1), timeout_s) == b""
    except (ConnectionError, TimeoutError):
        return False


async def _open(server: MllpServer, n: int) -> list[Streams]:
    return [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(n)]


async def _close(conns: list[Streams]) -> None:
    for _, writer in conns:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_connections_over_the_per_peer_cap_are_closed_at_once(
    make_server: Callable[..., MllpServer],
) -> None:
    server = make_server(max_connections_per_peer=2, idle_timeout_s=None)
    await server.start()
    held = await _open(server, 2)
    try:
        await asyncio.sleep(0.05)  # both handlers are running
        [extra] = await _open(server, 1)
        assert await _closed_by_server(extra)
        # the held ones stay open
        assert not await _closed_by_server(held[0], timeout_s=0.2)
        await _close(held[:1])
        await asyncio.sleep(0.05)
        [again] = await _open(server, 1)  # a slot is free again
        assert not await _closed_by_server(again, timeout_s=0.2)
        await _close([extra, again])
    finally:
        await _close(held)


async def test_connections_over_the_global_cap_are_closed_at_once(
    make_server: Callable[..., MllpServer],
) -> None:
    server = make_server(max_connections=3, max_connections_per_peer=10, idle_timeout_s=None)
    await server.start()
    held = await _open(server, 3)
    try:
        await asyncio.sleep(0.05)
        [extra] = await _open(server, 1)
        assert await _closed_by_server(extra)
        await _close([extra])
    finally:
        await _close(held)


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    make_server: Callable[..., MllpServer],
) -> None:
    server = make_server(idle_timeout_s=0.2)
    await server.start()
    [conn] = await _open(server, 1)
    try:
        assert await _closed_by_server(conn, timeout_s=5)
    finally:
        await _close([conn])
