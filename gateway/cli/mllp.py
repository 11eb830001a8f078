"""``fhir-gateway mllp``: the MLLP listener for HL7 v2 feeds.

Its options are settings (``GATEWAY_MLLP_HOST``, ``GATEWAY_MLLP_PORT``,
``GATEWAY_MLLP_MAX_MESSAGE_BYTES``, ``GATEWAY_MLLP_READ_TIMEOUT``); the flags override
them for one run.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from gateway.cli.common import profiles_or_exit, run_until_stopped, settings_or_exit


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
) -> None:
    """Listen for HL7 v2 over MLLP (0x0B message 0x1C 0x0D), many connections at once.

    Each message is stored before its ACK (AA / AE / AR) is sent; senders are the
    partner profiles with an ``hl7`` block (MSH-4 sending facility). SIGTERM/SIGINT: stop;
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
    )
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
        )
        await server.start()
        typer.echo(f"MLLP listening on {settings.mllp_host}:{server.port}", err=True)
        await server.serve_forever(stop)

    run_until_stopped(settings, profiles, serve)
