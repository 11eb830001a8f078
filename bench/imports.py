"""Bulk import benchmark (issue 16): records per second into the outbox.

What it does: writes ``--records`` synthetic records (NDJSON; by default a mix of 40%
intake submissions, 40% canonical checkouts and 20% Stripe events, each a new patient)
to a temporary file, creates a fresh database (PostgreSQL at ``GATEWAY_TEST_PG_URL`` or
127.0.0.1 by default; ``--database sqlite`` for a SQLite file), migrates it, and imports
the file in this process with :func:`gateway.imports.service.run_job` (the code path of
``fhir-gateway import``, without the progress bar), with one enabled EHR target so each
record gets its outbox row. No worker runs: nothing is delivered.

Reported: records per second (wall clock, from the first record read to the last batch
committed), CPU seconds of this process per record, outbox rows written, and the load
average; the database server's CPU is not in the CPU figure (it shares the machine).

With ``--workers N`` the file is cut into N parts imported by N processes
(:mod:`gateway.imports.parallel`, the path of ``fhir-gateway import --workers N``); the
CPU figure then includes theirs.

Usage (from the repository root)::

    python -m bench.imports                         # 5,000 mixed records, PostgreSQL
    python -m bench.imports --records 2000 --kind checkout --batch-size 500
    python -m bench.imports --workers 2             # two import processes
    python -m bench.imports --database sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from gateway.clients.actor import Actor
from gateway.db.migrate import upgrade_async
from gateway.imports.parallel import run_parallel
from gateway.imports.service import ImportSource, create_job, run_job
from gateway.logging import configure_logging
from gateway.runtime import Runtime
from gateway.settings import BUNDLED_PROFILES_DIR, Settings
from testkit import samples

PG_ADMIN = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def records(
    n: int, kind: str, *, same_person: bool = False, one_birth_date: bool = False
) -> list[dict[str, Any]]:
    """``n`` synthetic records of ``kind`` (``mixed``: 4 intakes, 4 checkouts, 2 Stripe
    events in every 10), each a new patient with demographics drawn like a population
    (:func:`testkit.samples.person`), or all with the example's name and birth date when
    ``same_person`` (the worst case of merge review: every patient a candidate of every
    other). ``one_birth_date``: the intakes' people keep their varied names but are all
    born on 06/15/1980 (a placeholder date of an old system: from the 200th intake on,
    each new patient's duplicate review reads the 200 candidates of its cap)."""
    out = []
    for i in range(n):
        slot = i % 10
        if kind == "intake" or (kind == "mixed" and slot < 4):
            record = samples.intake()
        elif kind == "checkout" or (kind == "mixed" and slot < 8):
            record = samples.canonical_checkout()
        else:
            record = samples.stripe_event()
        if not same_person:
            samples.varied(record, i)
            if one_birth_date and "submission_id" in record:
                record["patient"]["birth_date"] = "06/15/1980"
        out.append(record)
    return out


def _machine_busy_s() -> float:
    """CPU seconds all processes of the machine spent busy so far (``/proc/stat``: user,
    nice, system, irq, softirq, steal), to see what the database server costs too."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _cpu_s() -> float:
    """CPU seconds of this process and its ended children (the ``--workers`` processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _pg_url(name: str, driver: str = "postgresql+psycopg") -> str:
    base = PG_ADMIN.rsplit("/", 1)[0].split("://", 1)[1]
    return f"{driver}://{base}/{name}"


def _admin(statement: sql.Composable) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(statement)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark run; the figures."""
    work = Path(tempfile.mkdtemp(prefix="bench-imports-"))
    dbname = f"fgw_bench_imports_{uuid.uuid4().hex[:8]}"
    try:
        if args.database == "postgres":
            _admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            url = _pg_url(dbname)
        else:
            url = f"sqlite+aiosqlite:///{work / 'gateway.db'}"
        await upgrade_async(url)
        profiles = work / "profiles"
        shutil.copytree(BUNDLED_PROFILES_DIR, profiles)
        (profiles / "ehr" / "bench-ehr.yaml").write_text(
            yaml.safe_dump(
                {
                    "kind": "ehr",
                    "name": "bench-ehr",
                    "base_url": "http://127.0.0.1:9/fhir",
                    "auth": {"method": "none"},
                }
            )
        )
        path = work / "history.ndjson"
        path.write_text(
            "".join(
                json.dumps(r) + "\n"
                for r in records(
                    args.records,
                    args.kind,
                    same_person=args.same_person,
                    one_birth_date=args.one_birth_date,
                )
            )
        )
        settings = Settings(
            database_url=url,
            profiles_dir=profiles,
            run_worker=False,
            log_level="warning",
            egress_allow_loopback=True,  # the (never called) bench target is on 127.0.0.1
            _env_file=None,  # type: ignore[call-arg]
        )
        configure_logging("warning", json=True)  # per-record info lines are not measured
        runtime = Runtime.create(settings)
        try:
            source = ImportSource(name=path.name, path=path)
            async with runtime.sessionmaker() as session:
                job = await create_job(
                    session,
                    source="bench",
                    notify=False,
                    actor="bench",
                    csv_profile=None,
                    files=[source],
                    parts=args.workers,
                )
                await session.commit()
            load_before = os.getloadavg()
            cpu0, busy0, t0 = _cpu_s(), _machine_busy_s(), time.perf_counter()
            if args.workers > 1:
                counts = await run_parallel(
                    runtime,
                    job.id,
                    [source],
                    workers=args.workers,
                    batch_size=args.batch_size,
                    actor=Actor("user", "bench"),
                )
            else:
                counts = await run_job(runtime, job.id, [source], batch_size=args.batch_size)
            wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
            busy = _machine_busy_s() - busy0
            async with runtime.sessionmaker() as session:
                from sqlalchemy import func, select

                from gateway.db.models import Delivery

                outbox = int(
                    await session.scalar(
                        select(func.count()).select_from(Delivery).where(Delivery.kind == "ehr")
                    )
                    or 0
                )
        finally:
            await runtime.close()
        return {
            "database": args.database,
            "kind": args.kind,
            "records": args.records,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "mapped": counts["mapped"],
            "refused": counts["refused"],
            "outbox_rows": outbox,
            "wall_s": round(wall, 2),
            "records_per_s": round(args.records / wall, 1),
            "cpu_ms_per_record": round(1000 * cpu / args.records, 2),
            "machine_cpu_ms_per_record": round(1000 * busy / args.records, 2),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.database == "postgres":
            _admin(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument(
        "--kind", choices=["mixed", "intake", "checkout", "stripe"], default="mixed"
    )
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument(
        "--workers", type=int, default=1, help="import processes (PostgreSQL), as --workers N"
    )
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument(
        "--same-person",
        action="store_true",
        help="every record with the example's name and birth date (merge review's worst case)",
    )
    parser.add_argument(
        "--one-birth-date",
        action="store_true",
        help="intakes of varied people all born on one date (duplicate review at its cap)",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
