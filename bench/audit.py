"""Audit trail cost: CPU per intake, per FHIR read and per case search, in process.

Runs the gateway app in this process (httpx over ASGI, no network, no worker) on a fresh
SQLite file or PostgreSQL database, and measures this process's CPU time
(``time.process_time``: other load on the machine disturbs it much less than wall time)
for ``--n`` intakes (new patient each), then ``--n`` ``GET /fhir/Patient/{id}`` and
``--n`` ``GET /v1/cases?patient=Patient/{id}``. The HTTP client's own CPU is in the figures
and is the same whichever gateway runs.

It uses only what every version of the gateway has (``create_app``, ``create_client``,
the migrations), so the same file measures another checkout: run it with that checkout's
interpreter from that checkout's directory, alternating, in the same session::

    (cd ../main && .venv/bin/python $OLDPWD/bench/audit.py --n 300)   # without the audit trail
    .venv/bin/python -m bench.audit --n 300                            # with it

Prints one JSON line: ``{"gateway": <source dir>, "intake_cpu_ms": ..., "read_cpu_ms": ...,
"search_cpu_ms": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx


def disable_audit() -> None:
    """Make the audit entries this branch added no-ops (``gateway.audit.service.record``
    and ``record_patients``; the ingest's per-resource entries, older than the audit
    trail, stay): ``--without-audit`` measures the same tree without them."""
    from gateway.audit import service

    def nothing(*_args: Any, **_kwargs: Any) -> None:
        return None

    for name in ("record", "record_patients"):
        setattr(service, name, nothing)


async def measure(database_url: str, n: int) -> dict[str, Any]:
    """CPU milliseconds per intake, per FHIR read and per case search (see the module
    docstring), after ``n // 10`` warm-up intakes."""
    from gateway.app import create_app
    from gateway.clients.service import create_client
    from gateway.db.migrate import upgrade_async
    from gateway.settings import Settings
    from testkit import samples

    settings = Settings(
        database_url=database_url, run_worker=False, log_level="error", _env_file=None
    )
    await upgrade_async(settings.database_url)
    app = create_app(settings, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.bench"
        ) as http,
    ):
        runtime = app.state.runtime
        async with runtime.sessionmaker() as session:
            _, key = await create_client(
                session,
                name=f"bench-{uuid.uuid4().hex[:6]}",
                scopes=["intake:write", "fhir:read", "cases:read"],
            )
            await session.commit()
        headers = {"Authorization": f"Bearer {key}"}

        sent = iter(range(10**9))

        async def intake() -> str:
            body = samples.varied(samples.intake(), next(sent))  # a population's patients
            r = await http.post("/v1/intake-submissions", json=body, headers=headers)
            assert r.status_code == 202, r.text
            return str(r.json()["patient"]["id"])

        for _ in range(max(1, n // 10)):
            await intake()
        started = time.process_time()
        patients = [await intake() for _ in range(n)]
        intake_s = time.process_time() - started
        started = time.process_time()
        for patient in patients:
            assert (await http.get(f"/fhir/Patient/{patient}", headers=headers)).status_code == 200
        read_s = time.process_time() - started
        started = time.process_time()
        for patient in patients:
            r = await http.get(
                "/v1/cases", params={"patient": f"Patient/{patient}"}, headers=headers
            )
            assert r.status_code == 200
        search_s = time.process_time() - started
    return {
        "database": settings.database_url.split(":", 1)[0],
        "n": n,
        "intake_cpu_ms": round(intake_s * 1000 / n, 3),
        "read_cpu_ms": round(read_s * 1000 / n, 3),
        "search_cpu_ms": round(search_s * 1000 / n, 3),
    }


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=300, help="intakes, reads and searches each")
    parser.add_argument(
        "--database-url", help="a PostgreSQL database to use (default: a fresh SQLite file)"
    )
    parser.add_argument(
        "--without-audit",
        action="store_true",
        help="this tree with the audit entries of reads, events and previews disabled",
    )
    args = parser.parse_args()
    if args.without_audit:
        disable_audit()
    sys.path.insert(0, str(Path.cwd()))  # run by path from another checkout: its testkit
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{tmp}/bench.db"
        result = asyncio.run(measure(url, args.n))
    import gateway

    source = str(Path(gateway.__file__).resolve().parent.parent)
    print(json.dumps({"gateway": source, **result, "audit": not args.without_audit}))


if __name__ == "__main__":
    main()
