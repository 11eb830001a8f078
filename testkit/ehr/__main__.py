"""``python -m testkit.ehr``: run a local EHR in the foreground until interrupted.

It starts its own FHIR server (Node; ``make fhir-server`` installs it) unless
``--fhir-server URL`` names one already running. The first line on stdout is the EHR's base
URL; the second gives its FHIR base, token URL and the FHIR server's pid (benchmarks add
that process's CPU time to this one's).
"""

from __future__ import annotations

import argparse
import json
import sys

import uvicorn

from testkit.ehr import FhirServer, FhirServerUnavailableError, LocalEhr, bind, uvicorn_config


def main(argv: list[str] | None = None) -> None:
    """Parse the options, start the FHIR server and serve the EHR."""
    parser = argparse.ArgumentParser(
        prog="python -m testkit.ehr",
        description="Local EHR: OAuth token endpoint + a real FHIR R4 server (Medplum).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency of every FHIR call")
    parser.add_argument("--client-id", default="gateway")
    parser.add_argument("--client-secret", default="s3cret")
    parser.add_argument("--jwks", help="path of a public JWKS file for private_key_jwt clients")
    parser.add_argument("--token-lifetime-s", type=int, default=300)
    parser.add_argument("--max-bundle-entries", type=int)
    parser.add_argument("--no-validate", action="store_true", help="skip resource validation")
    parser.add_argument("--no-transactions", action="store_true")
    parser.add_argument(
        "--fhir-server",
        metavar="URL",
        help="use this running FHIR server (node testkit/fhir_server/server.mjs) instead of "
        "starting one",
    )
    args = parser.parse_args(argv)

    jwks = None
    if args.jwks:
        with open(args.jwks, encoding="utf-8") as handle:
            jwks = json.load(handle)
    fhir = FhirServer.connect(args.fhir_server) if args.fhir_server else FhirServer()
    try:
        fhir.start()
    except FhirServerUnavailableError as exc:
        sys.exit(f"error: {exc}")
    try:
        ehr = LocalEhr(
            fhir,
            client_id=args.client_id,
            client_secret=args.client_secret,
            token_lifetime_s=args.token_lifetime_s,
            jwks=jwks,
            response_delay_s=args.delay_ms / 1000,
            max_bundle_entries=args.max_bundle_entries,
            supports_transactions=not args.no_transactions,
            validate=not args.no_validate,
        )
        sock = bind(args.host, args.port)
        port = sock.getsockname()[1]
        base_url = f"http://{args.host}:{port}"
        print(base_url, flush=True)
        print(
            f"  FHIR base: {base_url}/fhir  token: {base_url}/token  "
            f"FHIR server: {fhir.base_url}/{ehr.tenant}/fhir (pid {fhir.pid})",
            flush=True,
        )
        try:
            config = uvicorn_config(ehr, host=args.host, port=port, loop="auto", standalone=True)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            sock.close()
    finally:
        fhir.stop()


if __name__ == "__main__":
    main()
