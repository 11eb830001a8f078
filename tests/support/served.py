"""Serving an ASGI app on a loopback port for clients that need a real socket (fhirpy,
fhirclient, a JWKS URL): uvicorn in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


def free_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve_app(
    app: Any, *, sock: socket.socket | None = None, lifespan: str = "off"
) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 in this event loop; yields ``http://127.0.0.1:<port>``."""
    sock = sock or free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan=lifespan,
        ws="none",
        loop="none",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(2000):  # uvicorn sets a flag, not an event
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
