"""Delivery benchmark: drain queued deliveries to a local EHR on PostgreSQL.

What it does:

1. seeds a template database once: ``--deliveries`` (default 5,000) intake submissions
   through the ingest service, each a Patient + QuestionnaireResponse + Provenance and one
   outbox row for the target ``bench-ehr`` (and a case, which records ``ehr_delivered``);
2. for each scenario, clones the template, starts the local EHR as its own process
   (``python -m testkit.ehr``: the token endpoint in Python, a real FHIR server, Medplum's,
   in a Node child process, validating every resource; ``--delay-ms`` 0 or 50),
   starts 1 or 4 ``fhir-gateway worker`` processes (``--concurrency`` each, default 4;
   then 4 processes at ``--tuned-concurrency``, default 16),
   and releases the queue at one instant once they are up: the drain time runs from that
   instant to the last ``delivered_at``;
3. counts token requests while the local EHR's token endpoint answers 504 for
   ``--outage-s`` seconds (default 120) with 4 workers waiting on the queue, and the time
   to drain once it recovers.

Reported per scenario: deliveries/s, p50/p99 delivery latency (from the claim to the
recorded delivery: ``first_attempt_at`` -> ``delivered_at``, one HTTP transaction plus
the database work), and checks (all delivered, EHR resource counts).

Usage (from the repository root, PostgreSQL at ``GATEWAY_TEST_PG_URL`` or 127.0.0.1)::

    python -m bench.delivery                      # every scenario (about 15 minutes)
    python -m bench.delivery --skip-outage --deliveries 2000
    python -m bench.delivery --only 4:50          # 4 workers, 50 ms EHR
    python -m bench.delivery --baseline main --scenarios 1:0,1:50,4:50 --skip-outage \
        --template fgw_bench_tmpl --deliveries 2000   # main's workers beside these

Traffic goes only to 127.0.0.1. The EHR, PostgreSQL and the workers share the machine's
cores, so the figures are for this machine as a whole.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from bench.baseline import add_worktree, remove_worktree

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TARGET = "bench-ehr"
SECRET_ENV = "BENCH_EHR_CLIENT_SECRET"
SECRET = "bench-s3cret"  # synthetic credential of the local EHR


def db_url(name: str, driver: str = "postgresql+psycopg") -> str:
    """URL of database ``name`` on the benchmark server."""
    base = PG_ADMIN.split("://", 1)[1].rsplit("/", 1)[0]
    return f"{driver}://{base}/{name}"


def admin(statement: sql.Composable) -> None:
    """Run one statement on the server's maintenance database (autocommit)."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(statement)


def write_profiles(dest: Path, fhir_base: str, token_url: str) -> Path:
    """The bundled profiles plus an enabled ``bench-ehr`` target."""
    import shutil

    from gateway.settings import BUNDLED_PROFILES_DIR

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(BUNDLED_PROFILES_DIR, dest)
    target = {
        "kind": "ehr",
        "name": TARGET,
        "enabled": True,
        "base_url": fhir_base,
        "auth": {
            "method": "client_secret_basic",
            "token_url": token_url,
            "client_id": "gateway",
            "client_secret_env": SECRET_ENV,
            "scopes": ["system/*.cruds"],
        },
        "timeout_s": 10,
        "max_concurrent_requests": 64,
    }
    (dest / "ehr" / f"{TARGET}.yaml").write_text(yaml.safe_dump(target))
    return dest


# --------------------------------------------------------------------------- seeding


async def seed(database: str, profiles: Path, n: int) -> float:
    """Ingest ``n`` synthetic intakes into ``database``; returns seconds taken."""
    from gateway.ingest.intake import submit_intake
    from gateway.ingest.storage import IngestContext
    from gateway.logging import configure_logging
    from gateway.runtime import Runtime
    from gateway.settings import Settings
    from testkit import samples

    configure_logging("warning")
    settings = Settings(
        database_url=db_url(database),
        profiles_dir=profiles,
        run_worker=False,
        _env_file=None,  # type: ignore[call-arg]
    )
    runtime = Runtime.create(settings)
    started = time.perf_counter()
    try:
        for i in range(n):
            raw = json.dumps(samples.varied(samples.intake(), i)).encode()  # a population
            async with runtime.sessionmaker() as session:
                await submit_intake(
                    session,
                    IngestContext.of(runtime),
                    raw=raw,
                    content_type="application/json",
                    actor="bench",
                )
                await session.commit()
            if (i + 1) % 1000 == 0:
                print(f"  seeded {i + 1}/{n}", flush=True)
    finally:
        await runtime.close()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def local_ehr(delay_ms: float, logs: Path) -> Iterator[tuple[str, list[int]]]:
    """The local EHR in its own process; yields its base URL and the pids of that process
    and of its FHIR server (Node): together, the EHR's CPU time."""
    log = (logs / f"ehr-{delay_ms:g}ms.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testkit.ehr",
            "--port",
            "0",
            "--delay-ms",
            str(delay_ms),
            "--client-secret",
            SECRET,
            "--token-lifetime-s",
            "3600",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().decode().strip()
        details = proc.stdout.readline().decode()
        if not base.startswith("http://127.0.0.1:") or "(pid " not in details:
            raise RuntimeError(f"the local EHR did not start; see {log.name}")
        node_pid = int(details.rsplit("(pid ", 1)[1].split(")", 1)[0])
        yield base, [proc.pid, node_pid]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def start_workers(
    n: int,
    concurrency: int,
    database: str,
    profiles: Path,
    logs: Path,
    side_root: Path = ROOT,
) -> list[subprocess.Popen[bytes]]:
    """``n`` worker processes on ``database``, of the code in ``side_root`` (this checkout,
    or the baseline's worktree: ``PYTHONPATH`` puts it before the installed package)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(side_root),
        "GATEWAY_DATABASE_URL": db_url(database),
        "GATEWAY_PROFILES_DIR": str(profiles),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_WORKER_POLL_INTERVAL": "PT0.1S",
        SECRET_ENV: SECRET,
    }
    procs = []
    for i in range(n):
        log = (logs / f"worker-{database}-{i}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "worker",
                    "--concurrency",
                    str(concurrency),
                ],
                cwd=side_root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (graceful), then wait."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


# --------------------------------------------------------------------------- a run


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from ``/proc`` (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_backends_cpu_s(database: str) -> float:
    """CPU seconds of the PostgreSQL backends serving ``database`` (from their titles)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("postgres:") and f" {database} " in title:
            total += cpu_s(int(entry.name))
    return total


def counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Deliveries by status."""
    rows = conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
    return {status: int(n) for status, n in rows}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def template_exists(name: str) -> bool:
    """Whether database ``name`` exists on the benchmark server."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            is not None
        )


def run_drain(
    *,
    template: str,
    workers: int,
    concurrency: int,
    delay_ms: float,
    n: int,
    logs: Path,
    outage_s: float | None = None,
    side: str = "new",
    side_root: Path = ROOT,
) -> dict[str, Any]:
    """Clone the template, start the EHR and the workers, release the queue, time it."""
    database = f"fgw_bench_{uuid.uuid4().hex[:8]}"
    admin(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(database), sql.Identifier(template)
        )
    )
    result: dict[str, Any] = {
        "side": side,
        "workers": workers,
        "concurrency": concurrency,
        "ehr_delay_ms": delay_ms,
        "deliveries": n,
    }
    try:
        with contextlib.ExitStack() as stack:
            ehr_pids: list[int] = []
            if outage_s is None:
                base, ehr_pids = stack.enter_context(local_ehr(delay_ms, logs))
                ehr = None
            else:
                from testkit.ehr import FhirServer, LocalEhr, run_ehr

                fhir = stack.enter_context(FhirServer(log_path=logs / "fhir-server.log"))
                ehr = LocalEhr(fhir, client_secret=SECRET, token_lifetime_s=3600)
                base = stack.enter_context(run_ehr(ehr)).base_url
                ehr_pids = [fhir.pid] if fhir.pid else []  # the token endpoint runs in here
            profiles = write_profiles(
                logs / f"profiles-{database}", f"{base}/fhir", f"{base}/token"
            )
            with psycopg.connect(db_url(database, "postgresql"), autocommit=True) as conn:
                release_at = datetime.now(UTC) + timedelta(seconds=4 + workers)
                conn.execute(
                    "UPDATE deliveries SET available_at = %s, created_at = %s",
                    (release_at, release_at),
                )
                procs = start_workers(workers, concurrency, database, profiles, logs, side_root)
                stack.callback(stop_workers, procs)
                time.sleep(max(0.0, (release_at - datetime.now(UTC)).total_seconds() - 0.05))
                baseline = {  # CPU used from the release on (not start-up)
                    "workers": sum(cpu_s(p.pid) for p in procs),
                    "ehr": sum(cpu_s(pid) for pid in ehr_pids),
                    "postgres": postgres_backends_cpu_s(database),
                }
                if ehr is not None:
                    ehr.token_outage(outage_s or 0, status=504)
                    outage_started = time.monotonic()
                deadline = time.monotonic() + 600 + (outage_s or 0)
                while time.monotonic() < deadline:
                    c = counts(conn)
                    if c.get("delivered", 0) + c.get("dead", 0) + c.get("review", 0) >= n:
                        break
                    if any(p.poll() is not None for p in procs):
                        raise RuntimeError(f"a worker exited; see {logs}")
                    time.sleep(0.1)
                final = counts(conn)
                cpu = {
                    "workers": sum(cpu_s(p.pid) for p in procs) - baseline["workers"],
                    "ehr": sum(cpu_s(pid) for pid in ehr_pids) - baseline["ehr"]
                    if outage_s is None
                    else None,
                    "postgres": postgres_backends_cpu_s(database) - baseline["postgres"],
                }
                rows = conn.execute(
                    "SELECT first_attempt_at, delivered_at, attempts FROM deliveries "
                    "WHERE status = 'delivered'"
                ).fetchall()
                tokens = conn.execute(
                    "SELECT failures, last_error FROM oauth_tokens WHERE target = %s", (TARGET,)
                ).fetchone()
                # read while the EHR's FHIR server still runs (the stack stops it)
                ehr_patients = ehr.count("Patient") if ehr is not None else None
        last = max(r[1] for r in rows)
        drain_s = (last - release_at).total_seconds()
        latencies_ms = [(r[1] - r[0]).total_seconds() * 1000 for r in rows]
        result.update(
            statuses=final,
            drain_s=round(drain_s, 3),
            deliveries_per_s=round(len(rows) / drain_s, 1),
            latency_p50_ms=round(percentile(latencies_ms, 0.50), 1),
            latency_p99_ms=round(percentile(latencies_ms, 0.99), 1),
            latency_mean_ms=round(statistics.fmean(latencies_ms), 1),
            max_attempts=max(r[2] for r in rows),
            cpu_ms_per_delivery={
                k: round(v * 1000 / len(rows), 2) for k, v in cpu.items() if v is not None
            },
            load_average_1m=round(os.getloadavg()[0], 2),
        )
        if ehr is not None:
            in_outage = [
                r for r in ehr.token_requests if r.monotonic_s - outage_started < (outage_s or 0)
            ]
            result.update(
                outage_s=outage_s,
                token_requests_during_outage=len(in_outage),
                token_statuses_during_outage=sorted({r.status for r in in_outage}),
                token_requests_total=len(ehr.token_requests),
                token_requests_ok=sum(1 for r in ehr.token_requests if r.status == 200),
                fhir_requests_during_outage=sum(
                    1 for t in ehr.request_times if t - outage_started < (outage_s or 0)
                ),
                drain_after_recovery_s=round(drain_s - (outage_s or 0), 3),
                token_row=list(tokens) if tokens else None,
                ehr_patients=ehr_patients,
            )
    finally:
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    return result


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table (and JSON to bench/results/)."""
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__)
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=4, help="per worker process")
    parser.add_argument("--only", help="one scenario WORKERS:DELAY_MS, e.g. 4:50")
    parser.add_argument(
        "--tuned-concurrency",
        type=int,
        default=16,
        help="also drain with 4 workers at this concurrency (0: skip)",
    )
    parser.add_argument("--outage-s", type=float, default=120.0)
    parser.add_argument("--skip-outage", action="store_true")
    parser.add_argument(
        "--template",
        help="reuse (or create and keep) this seeded template database; it is migrated to "
        "the current head first and must hold --deliveries deliveries",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run REF's workers (a temporary git worktree) on every scenario, "
        "alternating with this checkout's, and print both",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="with --baseline: run each pair this often"
    )
    parser.add_argument(
        "--scenarios",
        help="comma-separated WORKERS:DELAY_MS[:CONCURRENCY] (instead of the default set)",
    )
    args = parser.parse_args(argv)

    from gateway.db.migrate import upgrade

    logs = Path(tempfile.mkdtemp(prefix="fgw-bench-"))
    sides: list[tuple[str, Path]] = [("new", ROOT)]
    base_tree: Path | None = None
    if args.baseline:
        base_tree = logs / "baseline-tree"
        add_worktree(args.baseline, base_tree)
        sides.insert(0, ("base", base_tree))
    template = args.template or f"fgw_bench_tmpl_{os.getpid()}"
    reuse = args.template is not None and template_exists(template)
    if not reuse:
        admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    results: list[dict[str, Any]] = []
    seed_s: float | None = None
    try:
        upgrade(db_url(template))
        if reuse:
            print(f"reusing the template {template}", flush=True)
        else:
            profiles = write_profiles(
                logs / "seed-profiles", "http://127.0.0.1:9/fhir", "http://127.0.0.1:9/token"
            )
            print(f"seeding {args.deliveries} intakes into {template} ...", flush=True)
            seed_s = asyncio.run(seed(template, profiles, args.deliveries))
            print(f"  {seed_s:.1f} s ({args.deliveries / seed_s:.0f} intakes/s)", flush=True)
        c = args.concurrency
        scenarios = [(1, 0.0, c), (4, 0.0, c), (1, 50.0, c), (4, 50.0, c)]
        if args.tuned_concurrency:  # the same drains with more deliveries in flight per process
            scenarios += [(4, 0.0, args.tuned_concurrency), (4, 50.0, args.tuned_concurrency)]
        if args.only:
            w, d = args.only.split(":")
            scenarios = [(int(w), float(d), c)]
        if args.scenarios:
            scenarios = []
            for spec in args.scenarios.split(","):
                w, d, *k = spec.split(":")
                scenarios.append((int(w), float(d), int(k[0]) if k else c))
        for round_no in range(args.rounds if args.baseline else 1):
            for workers, delay, concurrency in scenarios:
                order = sides if round_no % 2 == 0 else sides[::-1]
                for side, side_root in order:
                    print(
                        f"drain ({side}): {workers} worker(s) x {concurrency}, "
                        f"EHR {delay:g} ms ...",
                        flush=True,
                    )
                    r = run_drain(
                        template=template,
                        workers=workers,
                        concurrency=concurrency,
                        delay_ms=delay,
                        n=args.deliveries,
                        logs=logs,
                        side=side,
                        side_root=side_root,
                    )
                    print(f"  {json.dumps(r)}", flush=True)
                    results.append(r)
        if not args.skip_outage and not args.only:
            print(f"token endpoint outage: 504 for {args.outage_s:g} s, 4 workers ...", flush=True)
            r = run_drain(
                template=template,
                workers=4,
                concurrency=args.concurrency,
                delay_ms=0.0,
                n=args.deliveries,
                logs=logs,
                outage_s=args.outage_s,
            )
            print(f"  {json.dumps(r)}", flush=True)
            results.append(r)
    finally:
        if args.template is None:
            admin(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(template))
            )
        if base_tree is not None:
            remove_worktree(base_tree)

    print()
    print(
        "| side | workers x concurrency | EHR latency | deliveries/s | p50 ms | p99 ms | drain s "
        "| CPU ms/delivery: workers + EHR + PostgreSQL | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "outage_s" in r:
            continue
        cpu = r["cpu_ms_per_delivery"]
        print(
            f"| {r['side']} | {r['workers']} x {r['concurrency']} | {r['ehr_delay_ms']:g} ms | "
            f"{r['deliveries_per_s']} | {r['latency_p50_ms']} | {r['latency_p99_ms']} | "
            f"{r['drain_s']} | {cpu.get('workers')} + {cpu.get('ehr')} + "
            f"{cpu.get('postgres')} | {r['load_average_1m']} |"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"delivery-{stamp}.json"
    path.write_text(json.dumps({"seed_s": seed_s, "results": results}, indent=2))
    print(f"\nresults: {path.relative_to(ROOT)}; logs: {logs}")


if __name__ == "__main__":
    main()
