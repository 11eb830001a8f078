"""Duplicate review at scale: CPU per accepted intake with N Patients already stored.

A new patient's intake scores it against the stored Patients born on its date or a typo
of it (:mod:`gateway.patients.review`), so what an intake costs could grow with the
database; issue 18's 10-minute soak at 100 intakes/s is where that showed. This
benchmark measures it directly, without the soak's dependence on the machine keeping
up: for each number of stored Patients it creates a fresh PostgreSQL database, migrates
it, stores that many Patients (names, birth dates over 65 years, phones and states drawn
like a population: :func:`testkit.samples.person`), fills duplicate review's features
for them when the code has that table (``patient_review_features``, migration 0021),
then posts intakes of new people to the app in-process (``httpx.ASGITransport``, no
HTTP server; an API key with ``intake:write``; no EHR target, no worker) and reports the
process's CPU time per accepted intake after a warm-up.

Usage (from the repository root)::

    python -m bench.review_scale                                # 0 and 120,000 stored
    python -m bench.review_scale --stored 0 60000 --intakes 600
    python -m bench.review_scale --baseline 877c813 --rounds 3  # against another commit

With ``--baseline REF`` the commit is checked out into a temporary git worktree and each
(round, stored, side) runs in a fresh process that imports that side's ``gateway`` (this
file is run by path with the side's tree first on ``PYTHONPATH``), alternating the sides;
it prints the median CPU ms per intake of each side and their ratio, so the comparison
holds on a shared, noisy machine. PostgreSQL at ``GATEWAY_TEST_PG_URL`` or 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WARM_UP = 50


def _stored_patient(n: int) -> tuple[str, str]:
    """Patient number ``n`` as stored by an earlier intake: ``(id, resource JSON)``."""
    from testkit.samples import person

    who = person(1_000_000 + n)
    pid = str(uuid.uuid4())
    resource = {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "identifier": [{"system": "urn:bench:patient", "value": pid}],
        "active": True,
        "name": [{"use": "official", "family": who["last_name"], "given": [who["first_name"]]}],
        "telecom": [
            {"system": "phone", "value": who["phone"], "use": "mobile"},
            {"system": "email", "value": f"stored{n}@example.com"},
        ],
        "gender": "unknown",
        "birthDate": who["birth_date_iso"],
        "address": [{"line": [f"{n} Main St"], "state": who["state"], "postalCode": "78701"}],
    }
    return pid, json.dumps(resource)


async def _side(stored: int, intakes: int) -> dict[str, Any]:
    """One measurement with this process's ``gateway`` (the side under test)."""
    import httpx
    import psycopg
    from psycopg import sql

    from gateway.app import create_app
    from gateway.clients.service import create_client
    from gateway.db.migrate import upgrade_async
    from gateway.logging import configure_logging
    from gateway.runtime import Runtime
    from gateway.settings import BUNDLED_PROFILES_DIR, Settings
    from testkit import samples

    name = f"fgw_bench_review_{uuid.uuid4().hex[:8]}"
    base = PG_ADMIN.rsplit("/", 1)[0]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        await upgrade_async(url)
        with psycopg.connect(f"{base}/{name}") as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO fhir_resources (resource_type, id, version_id, resource,"
                " patient_id, created_at, updated_at)"
                " VALUES ('Patient', %s, 1, %s::jsonb, %s, now(), now())",
                [(pid, body, pid) for pid, body in map(_stored_patient, range(stored))],
            )
        settings = Settings(
            database_url=url,
            profiles_dir=BUNDLED_PROFILES_DIR,
            run_worker=False,
            log_level="warning",
            _env_file=None,  # type: ignore[call-arg]
        )
        configure_logging("warning", json=True)
        runtime = Runtime.create(settings)
        try:
            filled = await _fill_features(runtime)
            with psycopg.connect(f"{base}/{name}", autocommit=True) as conn:
                conn.execute("ANALYZE")
            app = create_app(settings, runtime=runtime)
            async with app.router.lifespan_context(app):
                async with runtime.sessionmaker() as session:
                    _, key = await create_client(session, name="bench", scopes=["intake:write"])
                    await session.commit()
                headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
                bodies = [
                    json.dumps(samples.varied(samples.intake(), n)).encode()
                    for n in range(WARM_UP + intakes)
                ]
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                    cpu0 = 0.0
                    for i, body in enumerate(bodies):
                        if i == WARM_UP:
                            cpu0 = time.process_time()
                        r = await client.post(
                            "/v1/intake-submissions", content=body, headers=headers
                        )
                        if r.status_code != 202:
                            raise RuntimeError(f"intake refused: {r.status_code} {r.text[:200]}")
                    cpu = time.process_time() - cpu0
        finally:
            await runtime.close()
        return {
            "stored": stored,
            "features_filled": filled,
            "intakes": intakes,
            "cpu_ms_per_intake": round(1000 * cpu / intakes, 2),
        }
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def _fill_features(runtime: Any) -> int | None:
    """Duplicate review's features of the Patients inserted (None: this side's code has
    no such table: it reads the resources)."""
    try:
        from gateway.patients.review import fill_review_features  # type: ignore[attr-defined]
    except ImportError:
        return None
    async with runtime.sessionmaker() as session:
        return int(await fill_review_features(session))


def _run_side(tree: Path, stored: int, intakes: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--side",
            *("--stored", str(stored), "--intakes", str(intakes)),
        ],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, nargs="+", default=[0, 120_000])
    parser.add_argument("--intakes", type=int, default=600)
    parser.add_argument("--baseline", help="a git ref to compare with")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(asyncio.run(_side(args.stored[0], args.intakes))))
        return
    from bench.baseline import worktree

    sides: dict[str, Path] = {"this": ROOT}
    figures: dict[tuple[str, int], list[float]] = {}

    def run_all() -> None:
        for round_no in range(args.rounds):
            order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
            for stored in args.stored:
                for side in order:
                    result = _run_side(sides[side], stored, args.intakes)
                    figures.setdefault((side, stored), []).append(result["cpu_ms_per_intake"])
                    print(
                        f"round {round_no + 1} {side:>8} stored {stored:>7}: "
                        f"{result['cpu_ms_per_intake']:.2f} ms CPU per intake"
                        f" (features filled: {result['features_filled']})",
                        flush=True,
                    )

    if args.baseline:
        with worktree(args.baseline) as tree:
            sides = {"baseline": tree, "this": ROOT}
            run_all()
    else:
        run_all()
    print(
        f"\nmedian CPU ms per accepted intake ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f})"
    )
    for stored in args.stored:
        line = f"  stored {stored:>7}:"
        for side in sides:
            line += f"  {side} {statistics.median(figures[(side, stored)]):6.2f}"
        if args.baseline:
            ratio = statistics.median(figures[("this", stored)]) / statistics.median(
                figures[("baseline", stored)]
            )
            line += f"  ({ratio:.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
