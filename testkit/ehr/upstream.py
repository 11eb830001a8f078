"""The local EHR's HTTP/1.1 client for its one upstream, the local FHIR server.

A general client (httpx) spends about as much CPU per forwarded request as the FHIR
server spends processing it, and in tests that CPU is taken from the gateway under test
(the EHR's front runs in the test process). The upstream is known and narrow:
``server.mjs`` always answers with ``Content-Length`` (never chunked) on keep-alive
connections, so a reply is a status line, headers and that many bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Final, NamedTuple

#: Idle connections older than this are not reused (the server closes them after 60 s).
_IDLE_REUSE_S: Final = 30.0


class UpstreamError(Exception):
    """The FHIR server could not be reached, or its answer was cut short."""


class UpstreamResponse(NamedTuple):
    """One answer of the FHIR server."""

    status: int
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes


class _Connection(NamedTuple):
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float


class Upstream:
    """Keep-alive connections to ``http://host:port``, for one event loop.

    Args:
        host: the FHIR server's address.
        port: its port.
        timeout_s: the longest one request may take (connect, send and receive).
    """

    def __init__(self, host: str, port: int, *, timeout_s: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []

    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        """Send one request (``target``: path and query) and read the answer.

        A reused connection the server closed while idle is replaced once; a request is
        never sent twice after the server began to answer it.

        Raises:
            UpstreamError: connection refused or reset, a cut answer, or the timeout.
        """
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        try:
            return await asyncio.wait_for(self._exchange(message), self.timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise UpstreamError(type(exc).__name__) from exc
        except TimeoutError as exc:
            raise UpstreamError("timeout") from exc

    async def _exchange(self, message: bytes) -> UpstreamResponse:
        while self._idle:
            connection = self._idle.pop()
            if time.monotonic() - connection.idle_since > _IDLE_REUSE_S:
                connection.writer.close()
                continue
            try:
                return await self._send(connection, message)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                connection.writer.close()
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise  # the server had begun to answer: not safe to send again
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._send(_Connection(reader, writer, time.monotonic()), message)

    async def _send(self, connection: _Connection, message: bytes) -> UpstreamResponse:
        reader, writer, _ = connection
        try:
            writer.write(message)
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            headers = {}
            for line in head[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:  # cut short (error, timeout, cancel): the connection is done
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append(_Connection(reader, writer, time.monotonic()))
        return UpstreamResponse(status, headers, body)

    async def aclose(self) -> None:
        """Close the idle connections."""
        while self._idle:
            connection = self._idle.pop()
            connection.writer.close()
            await connection.writer.wait_closed()
