"""``fhir-gateway mllp``: the MLLP listener for HL7 v2 feeds.

Its options are settings (``GATEWAY_MLLP_HOST``, ``GATEWAY_MLLP_PORT``,
``GATEWAY_MLLP_MAX_MESSAGE_BYTES``, ``GATEWAY_MLLP_READ_TIMEOUT``, the TLS files, the
connection limits); the flags override some of them for one run. Without TLS files it
refuses to start unless ``GATEWAY_MLLP_ALLOW_PLAINTEXT=true`` (exit 2).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli.common import fail, profiles_or_exit, run_until_stopped, settings_or_exit

if TYPE_CHECKING:
    import ssl

    from gateway.settings import Settings


def mllp(
    host: Annotated[
        str | None, typer.Option(help="Bind address (GATEWAY_MLLP_HOST, default 127.0.0.1)")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="TCP port (GATEWAY_MLLP_PORT, default 2575)"),
    ] = None,
    max_message_bytes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Largest message accepted (GATEWAY_MLLP_MAX_MESSAGE_BYTES, default "
            "GATEWAY_MAX_BODY_BYTES)",
        ),
    ] = None,
    apply: Annotated[
        bool | None,
        typer.Option(
            "--apply/--no-apply",
            help="Apply each message right after its ACK, else the worker's sweep does "
            "(GATEWAY_APPLY_EVENTS_AFTER_ACK, default on)",
        ),
    ] = None,
    allow_plaintext: Annotated[
        bool | None,
        typer.Option(
            "--allow-plaintext",
            help="Listen without TLS (GATEWAY_MLLP_ALLOW_PLAINTEXT; loopback, development)",
        ),
    ] = None,
) -> None:
    """Listen for HL7 v2 over MLLP (0x0B message 0x1C 0x0D), many connections at once.

    Each message is stored before its ACK (AA / AE / AR) is sent; senders are the
    partner profiles with an ``hl7`` block (MSH-4 sending facility), and over TLS the
    client certificate must be one their ``hl7.certificates`` name. SIGTERM/SIGINT: stop;
    SIGHUP: reload the profiles (a set with problems is refused, the running one stays).
    """
    from gateway.events.apply import apply_received
    from gateway.hl7.mllp import MllpServer
    from gateway.hl7.service import Hl7Reply

    settings = settings_or_exit(
        mllp_host=host,
        mllp_port=port,
        mllp_max_message_bytes=max_message_bytes,
        apply_events_after_ack=apply,
        mllp_allow_plaintext=allow_plaintext,
    )
    tls = _tls_or_exit(settings)
    profiles = profiles_or_exit(settings)

    async def serve(runtime: Any, stop: asyncio.Event) -> None:
        async def after_store(reply: Hl7Reply) -> object:
            assert reply.message is not None  # only called for stored messages
            return await apply_received(runtime, reply.message, prepared=reply.prepared)

        server = MllpServer(
            runtime,
            host=settings.mllp_host,
            port=settings.mllp_port,
            max_message_bytes=settings.mllp_max_message_bytes or settings.max_body_bytes,
            read_timeout_s=settings.mllp_read_timeout.total_seconds(),
            after_store=after_store if settings.apply_events_after_ack else None,
            tls=tls,
            allow_plaintext=settings.mllp_allow_plaintext,
            idle_timeout_s=settings.mllp_idle_timeout.total_seconds() or None,
            max_connections=settings.mllp_max_connections,
            max_connections_per_peer=settings.mllp_max_connections_per_peer,
        )
        await server.start()
        typer.echo(f"MLLP listening on {settings.mllp_host}:{server.port}", err=True)
        typer.echo(
            "TLS: client certificates required"
            if tls is not None
            else "plaintext (GATEWAY_MLLP_ALLOW_PLAINTEXT): loopback and development only",
            err=True,
        )
        await server.serve_forever(stop)

    run_until_stopped(settings, profiles, serve)


def _tls_or_exit(settings: Settings) -> ssl.SSLContext | None:
    """The mutual-TLS context from the three ``GATEWAY_MLLP_TLS_*`` files; None for
    plaintext when it is allowed; exit 2 when the files are partial or unreadable, or when
    there are none and plaintext is not allowed."""
    from gateway.hl7.mllp import mllp_tls_context

    files = (
        settings.mllp_tls_cert_file,
        settings.mllp_tls_key_file,
        settings.mllp_tls_client_ca_file,
    )
    if not any(files):
        if settings.mllp_allow_plaintext:
            return None
        raise fail(
            "MLLP needs TLS with client certificates (GATEWAY_MLLP_TLS_CERT_FILE, "
            "GATEWAY_MLLP_TLS_KEY_FILE, GATEWAY_MLLP_TLS_CLIENT_CA_FILE), or "
            "GATEWAY_MLLP_ALLOW_PLAINTEXT=true for loopback and development"
        )
    cert, key, ca = files
    if cert is None or key is None or ca is None:
        raise fail(
            "MLLP over TLS needs all three of GATEWAY_MLLP_TLS_CERT_FILE, "
            "GATEWAY_MLLP_TLS_KEY_FILE and GATEWAY_MLLP_TLS_CLIENT_CA_FILE"
        )
    try:
        return mllp_tls_context(cert_file=str(cert), key_file=str(key), client_ca_file=str(ca))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise fail(f"MLLP TLS files cannot be used: {type(exc).__name__}") from exc
