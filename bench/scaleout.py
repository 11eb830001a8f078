"""Scale-out and soak benchmark: N API processes and M workers on one PostgreSQL, as the
deployment runs them (docs/DEPLOYMENT.md), each a separate OS process on 127.0.0.1.

**Scale-out** (default): for each ``N,M`` pair in ``--grid`` it starts
``fhir-gateway serve --no-worker --workers N`` and ``M`` x ``fhir-gateway worker`` on a fresh
PostgreSQL database, with an enabled EHR target (the local EHR, ``python -m testkit.ehr``),
drives ``POST /v1/intake-submissions`` closed loop (``--concurrency`` clients back to back for
``--seconds``) and reports:

* accepted intakes per second (202 answers) and deliveries per second (outbox rows that
  reached ``delivered`` during the window: the whole pipeline, not only the acknowledgement);
* CPU milliseconds per intake of the API processes, the workers and the PostgreSQL
  backends (from ``/proc``; robust to other load);
* the largest resident set size (RSS) of any one API process.

Throughput should rise with processes until the machine's cores are used; on the 2-core
project machine that is N + M around 2-3 (the load generator, the EHR and PostgreSQL run
on the same cores).

**Soak** (``--soak SECONDS``): one configuration (the first grid pair) under an open loop
at ``--rate`` intakes/s for SECONDS (600 for the 10-minute soak). Every 10 s it samples each
API process's RSS and the latency of the period; at the end it prints the series and the
growth between the first and the last minute. The aim (issue 18): each API process under
200 MB RSS, and no growth.

Usage::

    python -m bench.scaleout                          # grid 1,1 2,1 1,2 2,2
    python -m bench.scaleout --grid 1,1 2,2 --seconds 20
    python -m bench.scaleout --soak 600 --rate 100 --grid 2,1

Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.delivery import (
    PG_ADMIN,
    SECRET,
    SECRET_ENV,
    cpu_s,
    db_url,
    local_ehr,
    postgres_backends_cpu_s,
    write_profiles,
)
from bench.ingest import LightClient, free_port, intake_body, percentile, wait_http

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SAMPLE_EVERY_S = 10.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def rss_mb(pid: int) -> float:
    """Resident set size of one process in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def api_processes(server_pid: int) -> list[int]:
    """The uvicorn processes that serve requests: the children of a multi-process server
    (the parent only supervises), or the server itself when it runs alone."""
    tree = process_tree(server_pid)
    children = [p for p in tree if p != server_pid]
    return children or [server_pid]


def delivered(conn: psycopg.Connection[Any]) -> int:
    """Deliveries recorded as delivered so far."""
    row = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'delivered'").fetchone()
    return int(row[0]) if row else 0


class Gateway:
    """A fresh database, an EHR target, ``serve --no-worker --workers N`` and M workers."""

    def __init__(self, n_api: int, n_workers: int, concurrency: int, workdir: Path) -> None:
        self.n_api, self.n_workers, self.concurrency = n_api, n_workers, concurrency
        self.workdir = workdir
        self.database = f"fgw_scale_{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, ehr_base: str) -> tuple[str, str]:
        """Start everything; returns the API URL and an ``intake:write`` key."""
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        profiles = write_profiles(
            self.workdir / f"profiles-{self.database}",
            f"{ehr_base}/fhir",
            f"{ehr_base}/token",
        )
        env = {
            **os.environ,
            "GATEWAY_DATABASE_URL": db_url(self.database),
            "GATEWAY_PROFILES_DIR": str(profiles),
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_WORKER_POLL_INTERVAL": "PT0.1S",
            SECRET_ENV: SECRET,
        }
        cli = str(VENV_BIN / "fhir-gateway")
        subprocess.run(
            [cli, "db", "upgrade"], env=env, cwd=self.workdir, check=True, stdout=subprocess.DEVNULL
        )
        key = (
            subprocess.run(
                [cli, "clients", "create", "bench", "--scope", "intake:write"],
                env=env,
                cwd=self.workdir,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        port = free_port()
        self.log_path = self.workdir / f"{self.database}.log"
        logs = self.log_path.open("wb")
        self.procs.append(
            subprocess.Popen(
                [
                    cli,
                    "serve",
                    "--port",
                    str(port),
                    "--no-migrate",
                    "--no-worker",
                    "--workers",
                    str(self.n_api),
                ],
                env=env,
                cwd=self.workdir,
                stdout=logs,
                stderr=subprocess.STDOUT,
            )
        )
        for _ in range(self.n_workers):
            self.procs.append(
                subprocess.Popen(
                    [cli, "worker", "--concurrency", str(self.concurrency)],
                    env=env,
                    cwd=self.workdir,
                    stdout=logs,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.close()
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/readyz", timeout_s=120)
        except TimeoutError:
            print(self.log_path.read_text()[-3000:], file=sys.stderr)
            raise
        return url, key

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: API processes, workers, PostgreSQL backends."""
        api = sum(cpu_s(p) for p in process_tree(self.procs[0].pid))
        workers = sum(cpu_s(p.pid) for p in self.procs[1:])
        return {"api": api, "workers": workers, "postgres": postgres_backends_cpu_s(self.database)}

    def stop(self) -> None:
        """SIGTERM everything (the workers drain), then drop the database."""
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database)
                )
            )


async def closed_loop(
    url: str, key: str, clients: int, seconds: float, template: dict[str, Any], on_tick: Any = None
) -> dict[str, Any]:
    """``clients`` senders back to back for ``seconds``: accepted intakes and latencies."""
    run = uuid.uuid4().hex[:6]
    client = LightClient(
        url, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    latencies: list[float] = []
    errors = counter = 0
    deadline = time.perf_counter() + seconds

    async def sender() -> None:
        nonlocal errors, counter
        while time.perf_counter() < deadline:
            counter += 1
            body = intake_body(template, counter, run)
            t0 = time.perf_counter()
            try:
                ok = await client.post("/v1/intake-submissions", body) == 202
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                ok = False
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += not ok

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    client.close()
    accepted = len(latencies) - errors
    return {
        "accepted": accepted,
        "errors": errors,
        "elapsed_s": elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


async def open_loop_soak(
    url: str, key: str, rate: float, seconds: float, template: dict[str, Any], api_pids: list[int]
) -> list[dict[str, Any]]:
    """``rate`` intakes/s for ``seconds``; every 10 s: RSS of each API process, p99 of the
    period (latency from each request's due time), errors."""
    run = uuid.uuid4().hex[:6]
    client = LightClient(
        url, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    samples: list[dict[str, Any]] = []
    period: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.2
    total = int(rate * seconds)

    async def one(i: int) -> None:
        nonlocal errors
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            ok = await client.post("/v1/intake-submissions", intake_body(template, i, run)) == 202
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            ok = False
        errors += not ok
        period.append((time.perf_counter() - due) * 1000)

    async def sampler() -> None:
        nonlocal errors
        t = 0.0
        while t < seconds:
            await asyncio.sleep(SAMPLE_EVERY_S)
            t += SAMPLE_EVERY_S
            lat = list(period)
            period.clear()
            samples.append(
                {
                    "t_s": t,
                    "rss_mb": [round(rss_mb(p), 1) for p in api_pids],
                    "requests": len(lat),
                    "p99_ms": round(percentile(lat, 99), 1) if lat else None,
                    "errors": errors,
                }
            )
            print(
                f"  t={t:5.0f}s rss MB {samples[-1]['rss_mb']} "
                f"p99 {samples[-1]['p99_ms']} ms errors {errors}",
                flush=True,
            )

    async def load() -> None:
        # Schedule in slices so a 10-minute soak does not hold 60,000 pending tasks.
        slice_n = int(rate * 5) or 1
        for first in range(0, total, slice_n):
            await asyncio.gather(*(one(i) for i in range(first, min(total, first + slice_n))))

    await asyncio.gather(load(), sampler())
    client.close()
    return samples


def run_pair(
    n_api: int,
    n_workers: int,
    args: argparse.Namespace,
    ehr_base: str,
    workdir: Path,
    template: dict[str, Any],
) -> dict[str, Any]:
    """One scale-out measurement."""
    gw = Gateway(n_api, n_workers, args.worker_concurrency, workdir)
    try:
        url, key = gw.start(ehr_base)
        asyncio.run(closed_loop(url, key, 4, 2, template))  # warm-up
        with psycopg.connect(
            f"postgresql://{db_url(gw.database).split('://', 1)[1]}", autocommit=True
        ) as conn:
            delivered0, cpu0 = delivered(conn), gw.cpu()
            result = asyncio.run(closed_loop(url, key, args.concurrency, args.seconds, template))
            delivered1, cpu1 = delivered(conn), gw.cpu()
        rss = max(rss_mb(p) for p in api_processes(gw.procs[0].pid))
    finally:
        gw.stop()
    accepted = max(1, result["accepted"])
    cpu_ms = {k: round((cpu1[k] - cpu0[k]) * 1000 / accepted, 2) for k in cpu0}
    return {
        "api_processes": n_api,
        "workers": n_workers,
        "intakes_per_s": round(result["accepted"] / result["elapsed_s"], 1),
        "deliveries_per_s": round((delivered1 - delivered0) / result["elapsed_s"], 1),
        "errors": result["errors"],
        "p50_ms": round(result["p50_ms"], 1),
        "p99_ms": round(result["p99_ms"], 1),
        "cpu_ms_per_intake": cpu_ms,
        "max_api_rss_mb": round(rss, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def run_soak(
    n_api: int,
    n_workers: int,
    args: argparse.Namespace,
    ehr_base: str,
    workdir: Path,
    template: dict[str, Any],
) -> dict[str, Any]:
    """The soak: RSS and p99 every 10 s, growth between the first and the last minute."""
    gw = Gateway(n_api, n_workers, args.worker_concurrency, workdir)
    try:
        url, key = gw.start(ehr_base)
        asyncio.run(closed_loop(url, key, 4, 5, template))  # warm-up (imports, caches)
        pids = api_processes(gw.procs[0].pid)
        samples = asyncio.run(open_loop_soak(url, key, args.rate, args.soak, template, pids))
    finally:
        gw.stop()
    per_minute = max(1, int(60 / SAMPLE_EVERY_S))
    first = samples[:per_minute]
    last = samples[-per_minute:]

    def mean_rss(rows: list[dict[str, Any]]) -> float:
        values = [max(r["rss_mb"]) for r in rows]
        return sum(values) / len(values)

    return {
        "api_processes": n_api,
        "workers": n_workers,
        "rate": args.rate,
        "seconds": args.soak,
        "max_rss_mb": max(max(r["rss_mb"]) for r in samples),
        "rss_first_minute_mb": round(mean_rss(first), 1),
        "rss_last_minute_mb": round(mean_rss(last), 1),
        "rss_growth_mb": round(mean_rss(last) - mean_rss(first), 1),
        "worst_p99_ms": max((r["p99_ms"] or 0) for r in samples),
        "errors": samples[-1]["errors"] if samples else None,
        "samples": samples,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--grid",
        nargs="+",
        default=["1,1", "2,1", "1,2", "2,2"],
        help="N,M pairs: N API processes, M workers",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="closed loop per pair")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--worker-concurrency", type=int, default=8)
    parser.add_argument("--soak", type=float, help="run the soak for this many seconds")
    parser.add_argument("--rate", type=float, default=100.0, help="soak intakes/s")
    parser.add_argument("--ehr-delay-ms", type=float, default=0.0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    pairs = [tuple(int(x) for x in p.split(",")) for p in args.grid]
    template = json.loads((ROOT / "examples" / "intake-glp1.json").read_text())
    results: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_ehr(args.ehr_delay_ms, Path(tmp)) as (
            ehr_base,
            _,
        ),
    ):
        workdir = Path(tmp)
        if args.soak:
            n_api, n_workers = pairs[0]
            result = run_soak(n_api, n_workers, args, ehr_base, workdir, template)
            print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
            results.append(result)
        else:
            print(
                f"{'api':>3} {'wrk':>3} {'intakes/s':>10} {'deliv/s':>8} {'p50 ms':>7} "
                f"{'p99 ms':>7} {'cpu ms/intake api/wrk/pg':>26} {'max RSS MB':>10}  load"
            )
            for n_api, n_workers in pairs:
                r = run_pair(n_api, n_workers, args, ehr_base, workdir, template)
                cpu = r["cpu_ms_per_intake"]
                print(
                    f"{n_api:>3} {n_workers:>3} {r['intakes_per_s']:>10} "
                    f"{r['deliveries_per_s']:>8} {r['p50_ms']:>7} {r['p99_ms']:>7} "
                    f"{cpu['api']:>8}/{cpu['workers']:>6}/{cpu['postgres']:>6}     "
                    f"{r['max_api_rss_mb']:>10}  {r['loadavg']}",
                    flush=True,
                )
                results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
