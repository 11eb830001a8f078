"""MLLP listener for HL7 v2 (``fhir-gateway mllp``).

MLLP (HL7 v2 Minimal Lower Layer Protocol, release 2) frames each message as
``<SB=0x0B> message <EB=0x1C><CR=0x0D>`` on a TCP stream and answers each with an ACK in
the same framing, one at a time per connection. The listener is an
``asyncio.start_server``: many connections at once, each read frame by frame:

* bytes before a start block (a stray newline between frames) are dropped;
* the end block alone ends a frame (a CR right after it is skipped): a few senders
  leave the CR out, and waiting for it would leave them without an ACK;
* a frame terminator without a start block, or a start block before the previous frame
  ended, is a broken frame: answered with an ``AR`` ACK (MSA-2 empty) and kept in the
  exceptions queue; the connection stays open;
* a frame larger than the limit is answered with ``AR`` and the connection is closed
  (the stream cannot be resynchronized without reading it all);
* a connection that stalls in the middle of a frame is closed after ``read_timeout_s``,
  one idle between frames after ``idle_timeout_s``.

Who may connect (docs/SECURITY.md, "HL7 v2 senders"):

* **MLLP over TLS with client certificates** (mutual TLS, :func:`mllp_tls_context`): the
  client must present a certificate the client CA issued; the partners whose
  ``hl7.certificates`` name it (SHA-256 fingerprint or subject CN) are the only ones it may
  send as: a message whose MSH-4 (or MSH-3) is another partner's is answered ``AR`` and
  kept in the exceptions queue. The certificate is recorded as the principal of each
  message (``cert:<CN>:sha256:<hex>``).
* **plaintext MLLP** only when ``allow_plaintext`` is set (loopback and development): any
  peer may send as a partner whose ``peers`` allow its address; the principal is
  ``mllp-peer:<address>``.

Limits: at most ``max_connections`` at once and ``max_connections_per_peer`` from one
address (a connection over either is closed at once, before any byte is read).

Each message is stored and committed before its ACK is written; it is applied after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway.clients.actor import Actor, set_actor
from gateway.db.types import utcnow
from gateway.db.uow import unit_of_work
from gateway.hl7.service import Hl7Credential, Hl7Reply, receive_hl7, record_hl7_rejection
from gateway.logging import get_logger
from gateway.runtime import Runtime
from mappers.hl7v2 import Hl7MessageError, build_ack

log = get_logger(__name__)

SB = b"\x0b"
EB = b"\x1c"
CR = b"\x0d"
TERMINATOR = EB + CR


@dataclass
class MllpDecoder:
    """Splits a byte stream into MLLP frames (pure: no I/O).

    :meth:`feed` returns, in order, ``("frame", payload)`` for each complete frame,
    ``("broken", bytes)`` for data that ended without a proper start block, and
    ``("oversize", b"")`` once the frame being read exceeds ``max_bytes`` (the caller
    should close the connection).
    """

    max_bytes: int
    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Add received bytes; return the complete frames and framing errors."""
        self.buffer += data
        out: list[tuple[str, bytes]] = []
        while True:
            # the end block alone ends a frame: a few senders leave out the CR after it
            # (0x1C cannot occur inside a message); a CR that follows is skipped with it
            end = self.buffer.find(EB)
            start = self.buffer.find(SB)
            if end == -1:
                if start > 0:
                    del self.buffer[:start]  # junk between frames
                elif start == -1 and not self.buffer.strip():
                    self.buffer.clear()  # a newline some senders put after a frame
                if len(self.buffer) > self.max_bytes + 1:
                    self.buffer.clear()
                    out.append(("oversize", b""))
                break
            after = end + 2 if self.buffer[end + 1 : end + 2] == CR else end + 1
            if start == -1 or start > end:
                broken = bytes(self.buffer[:end])
                del self.buffer[:after]
                out.append(("broken", broken[: self.max_bytes]))
                continue
            frame = bytes(self.buffer[start + 1 : end])
            del self.buffer[:after]
            nested = frame.rfind(SB)
            if nested != -1:
                out.append(("broken", frame[:nested]))
                frame = frame[nested + 1 :]
            if len(frame) > self.max_bytes:
                out.append(("oversize", b""))
                break
            out.append(("frame", frame))
        return out

    @property
    def partial(self) -> bool:
        """True while a frame has started but not ended."""
        return bool(self.buffer)


def frame(message: str) -> bytes:
    """``message`` (ER7) in an MLLP block."""
    return SB + message.encode("utf-8") + TERMINATOR


class MllpConfigError(ValueError):
    """The listener is configured neither for TLS nor to allow plaintext."""


def mllp_tls_context(*, cert_file: str, key_file: str, client_ca_file: str) -> ssl.SSLContext:
    """A server context for MLLP over mutual TLS: TLS 1.2 or later, the listener's
    certificate chain and key (PEM), and a client certificate required and verified
    against ``client_ca_file`` (PEM bundle of the CAs that issue partners' certificates).

    Raises:
        OSError, ssl.SSLError: a file cannot be read or does not hold what it should.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


def certificate_credential(ssl_object: ssl.SSLObject | None) -> Hl7Credential | None:
    """The credential of a verified TLS client: the SHA-256 fingerprint (lowercase hex of
    the DER certificate) and subject CN of its certificate (None: no certificate)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    sha256 = hashlib.sha256(der).hexdigest()
    common_name = None
    subject = (ssl_object.getpeercert() or {}).get("subject", ())
    for rdn in subject if isinstance(subject, tuple) else ():
        for pair in rdn:
            if isinstance(pair, tuple) and pair[0] == "commonName":
                common_name = str(pair[1])
    return Hl7Credential(
        f"cert:{common_name or ''}:sha256:{sha256}", certificate=(sha256, common_name)
    )


class MllpServer:
    """The MLLP listener.

    Args:
        runtime: the wired runtime.
        host, port: where to listen (port 0: any free port, see :attr:`port`).
        max_message_bytes: the largest message accepted.
        read_timeout_s: how long a half-received frame may stall.
        idle_timeout_s: how long a connection may stay idle between frames (None: no
            limit).
        after_store: called with the reply of each stored message after its ACK was sent
            (applies it, with the event mapped on receipt); None leaves messages to the
            worker's sweep.
        tls: a mutual-TLS server context (:func:`mllp_tls_context`): each connection's
            client certificate says which partners it may send as.
        allow_plaintext: without ``tls``, listen in plaintext (loopback, development).
        max_connections: connections open at once; more are closed on accept.
        max_connections_per_peer: connections open at once from one address.

    Raises:
        MllpConfigError: neither ``tls`` nor ``allow_plaintext``.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        host: str = "127.0.0.1",
        port: int = 2575,
        max_message_bytes: int = 1_048_576,
        read_timeout_s: float = 60.0,
        idle_timeout_s: float | None = 300.0,
        after_store: Callable[[Hl7Reply], Coroutine[Any, Any, object]] | None = None,
        tls: ssl.SSLContext | None = None,
        allow_plaintext: bool = False,
        max_connections: int = 256,
        max_connections_per_peer: int = 16,
    ) -> None:
        if tls is None and not allow_plaintext:
            raise MllpConfigError(
                "MLLP needs TLS (GATEWAY_MLLP_TLS_CERT_FILE, GATEWAY_MLLP_TLS_KEY_FILE, "
                "GATEWAY_MLLP_TLS_CLIENT_CA_FILE) or GATEWAY_MLLP_ALLOW_PLAINTEXT=true "
                "(loopback, development)"
            )
        self.runtime = runtime
        self.host = host
        self.requested_port = port
        self.max_message_bytes = max_message_bytes
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.after_store = after_store
        self.tls = tls
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._per_peer: Counter[str | None] = Counter()
        self._closing = False
        self._background: set[asyncio.Task[object]] = set()

    @property
    def port(self) -> int:
        """The port actually listened on."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(
            self._handle,
            self.host,
            self.requested_port,
            ssl=self.tls,
            ssl_handshake_timeout=self.read_timeout_s if self.tls is not None else None,
        )
        log.info("mllp.listening", host=self.host, port=self.port, tls=self.tls is not None)

    async def serve_forever(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then close."""
        await stop.wait()
        await self.close()

    async def close(self) -> None:
        """Stop listening, close connections, wait for after-ACK work."""
        if self._server is not None:
            self._closing = True
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        log.info("mllp.stopped")

    def _admit(self, peer: str | None) -> bool:
        """Count a new connection in, or refuse it (over a cap)."""
        if len(self._connections) >= self.max_connections:
            log.warning("mllp.refused_connection", peer=peer, reason="max_connections")
            return False
        if self._per_peer[peer] >= self.max_connections_per_peer:
            log.warning("mllp.refused_connection", peer=peer, reason="max_connections_per_peer")
            return False
        return True

    def _credential(self, writer: asyncio.StreamWriter, peer: str | None) -> Hl7Credential:
        if self.tls is None:
            return Hl7Credential(f"mllp-peer:{peer or ''}")
        credential = certificate_credential(writer.get_extra_info("ssl_object"))
        # CERT_REQUIRED: the handshake fails without a verified certificate; a credential
        # with no partners refuses every message (AR, kept) if this ever happened
        return credential or Hl7Credential("cert:unknown", partners=frozenset())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) else None
        if not self._admit(peer):
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            return
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        self._per_peer[peer] += 1
        credential = self._credential(writer, peer)
        # the audit trail's agent for this connection's work (and the tasks it starts)
        set_actor(Actor("client", credential.agent_name, None, peer))
        decoder = MllpDecoder(self.max_message_bytes)
        log.info("mllp.connected", peer=peer, tls=self.tls is not None)
        try:
            while True:
                timeout = self.read_timeout_s if decoder.partial else self.idle_timeout_s
                try:
                    data = await asyncio.wait_for(reader.read(65536), timeout)
                except TimeoutError:
                    log.info(
                        "mllp.read_timeout" if decoder.partial else "mllp.idle_timeout", peer=peer
                    )
                    return
                if not data:
                    return
                for kind, payload in decoder.feed(data):
                    if kind == "frame":
                        reply = await self._receive(payload, peer, credential)
                    else:
                        reply = await self._framing_error(kind, payload)
                    try:
                        writer.write(frame(reply.ack))
                        await writer.drain()
                    finally:
                        # stored: applied even when the sender left before its ACK
                        if reply.message is not None and self.after_store is not None:
                            job = asyncio.create_task(self.after_store(reply))
                            self._background.add(job)
                            job.add_done_callback(self._background.discard)
                    if kind == "oversize":
                        return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            log.info("mllp.connection_lost", peer=peer)
        except asyncio.CancelledError:
            # Cancelled by close() (shutdown): end normally. On Python 3.11 asyncio's
            # stream callback calls ``task.exception()`` on the finished handler, which
            # raises for a cancelled task and logs a traceback per open connection.
            if not self._closing:
                raise
            log.info("mllp.connection_closed_on_shutdown", peer=peer)
        finally:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError, ssl.SSLError):
                await writer.wait_closed()
            log.info("mllp.disconnected", peer=peer)

    async def _receive(
        self, payload: bytes, peer: str | None, credential: Hl7Credential
    ) -> Hl7Reply:
        """Store one message and commit (the listener owns each message's unit of work),
        then return its ACK. The same MSH-10 arriving at once on another connection is
        settled by the inbox's unique key (``INSERT ... ON CONFLICT DO NOTHING``): the
        second is answered as a duplicate."""
        async with unit_of_work(self.runtime.write_session) as session:
            return await receive_hl7(
                session,
                self.runtime,
                raw=payload,
                transport="mllp",
                peer=peer,
                lease=self.after_store is not None,
                credential=credential,
            )

    async def _framing_error(self, kind: str, payload: bytes) -> Hl7Reply:
        if kind == "oversize":
            error = Hl7MessageError(
                "AR", 207, f"the message is larger than {self.max_message_bytes} bytes"
            )
        else:
            error = Hl7MessageError(
                "AR", 100, "broken MLLP frame: data without a start block (0x0B)"
            )
        async with unit_of_work(self.runtime.write_session) as session:
            record_hl7_rejection(session, raw=payload, error=error, sender=None, transport="mllp")
        ack = build_ack(
            None, "AR", control_id=f"A{uuid.uuid4().hex[:19]}", now=utcnow(), error=error
        )
        return Hl7Reply(ack, "AR")
