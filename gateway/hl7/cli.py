"""``fhir-gateway mllp``: the MLLP listener for HL7 v2 feeds."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer


def mllp(
    host: Annotated[
        str, typer.Option(envvar="GATEWAY_MLLP_HOST", help="Bind address")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="GATEWAY_MLLP_PORT", min=0, max=65535, help="TCP port")
    ] = 2575,
    max_message_bytes: Annotated[
        int, typer.Option(help="Largest message accepted (default: GATEWAY_MAX_BODY_BYTES)")
    ] = 0,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply/--no-apply",
            help="Apply each message right after its ACK (else the worker's sweep does)",
        ),
    ] = True,
) -> None:
    """Listen for HL7 v2 over MLLP (0x0B message 0x1C 0x0D), many connections at once.

    Each message is stored before its ACK (AA / AE / AR) is sent; senders are the
    partner profiles with an ``hl7`` block (MSH-4 sending facility). SIGTERM/SIGINT: stop;
    SIGHUP: reload the profiles (a set with problems is refused, the running one stays).
    """
    from gateway.cli import _load_profiles_or_exit, _settings
    from gateway.events.apply import apply_received
    from gateway.hl7.mllp import MllpServer
    from gateway.hl7.service import Hl7Reply
    from gateway.logging import configure_logging
    from gateway.profiles.service import install_sighup_reload
    from gateway.runtime import Runtime

    settings = _settings()
    _load_profiles_or_exit(settings)
    configure_logging(settings.log_level, json=settings.log_json)

    async def main() -> None:
        runtime = Runtime.create(settings)
        install_sighup_reload(runtime)

        async def after_store(reply: Hl7Reply) -> object:
            assert reply.message is not None  # only called for stored messages
            return await apply_received(runtime, reply.message, prepared=reply.prepared)

        server = MllpServer(
            runtime,
            host=host,
            port=port,
            max_message_bytes=max_message_bytes or settings.max_body_bytes,
            after_store=after_store if apply else None,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.start()
            typer.echo(f"MLLP listening on {host}:{server.port}", err=True)
            await server.serve_forever(stop)
        finally:
            await runtime.close()

    asyncio.run(main())
