"""The local EHR's client for the FHIR server, against a scripted local TCP server: keep-alive
reuse, a connection the server closed while idle, an answer cut short."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from testkit.ehr.upstream import Upstream, UpstreamError

Script = Callable[[int, bytes], bytes | None]
"""(connection number, request head) -> the bytes to answer, None to close without answering."""


@pytest.fixture
async def server() -> AsyncIterator[tuple[list[int], Callable[[Script], None], int]]:
    """A TCP server on 127.0.0.1 answering each request as the current script says, then
    closing the connection when the script's answer has no keep-alive."""
    connections: list[int] = []
    script: list[Script] = [lambda n, head: b""]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(connections)
        connections.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                connections[number] += 1
                answer = script[0](number, head)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield connections, lambda s: script.__setitem__(0, s), port


def ok(body: bytes = b"{}") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )


async def test_connections_are_kept_alive_and_answers_read_by_content_length(server: tuple) -> None:
    connections, set_script, port = server
    set_script(lambda n, head: ok(b'{"n":%d}' % n))
    upstream = Upstream("127.0.0.1", port)
    answers = [
        await upstream.request("POST", "/t/fhir/Patient", {"Content-Type": "x"}, b"{}")
        for _ in range(3)
    ]
    await upstream.aclose()

    assert [(a.status, a.body) for a in answers] == [(200, b'{"n":0}')] * 3
    assert answers[0].headers["content-type"] == "application/fhir+json"
    assert connections == [3]  # one connection, three requests


async def test_a_connection_closed_while_idle_is_replaced_once(server: tuple) -> None:
    connections, set_script, port = server
    set_script(lambda n, head: ok() if n == 0 else ok(b'{"again":true}'))
    upstream = Upstream("127.0.0.1", port)
    await upstream.request("GET", "/t/fhir/metadata", {}, b"")
    set_script(lambda n, head: None if n == 0 else ok(b'{"again":true}'))  # closes the first
    answer = await upstream.request("POST", "/t/fhir", {}, b"{}")
    await upstream.aclose()

    assert answer.body == b'{"again":true}'
    assert connections == [2, 1]  # the request reached the closing server, then a new one


async def test_an_answer_cut_short_is_an_error_not_a_second_request(server: tuple) -> None:
    connections, set_script, port = server
    set_script(
        lambda n, head: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}"
    )
    upstream = Upstream("127.0.0.1", port)
    with pytest.raises(UpstreamError):
        await upstream.request("POST", "/t/fhir", {}, b"{}")
    refused = Upstream("127.0.0.1", 1)
    with pytest.raises(UpstreamError):
        await refused.request("GET", "/", {}, b"")

    assert connections == [1]
