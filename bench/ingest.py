"""HTTP ingest benchmark: acknowledgement latency and throughput of a running gateway.

Starts ``fhir-gateway serve`` as a separate process on 127.0.0.1 (SQLite file or a fresh
PostgreSQL database), creates an API client, and drives it with synthetic intake
submissions (unique ``submission_id`` each, the bundled GLP-1 form):

* open loop at a fixed rate (default 100 requests/s for 20 s): p50/p95/p99/max latency of
  the 202 acknowledgement, measured from the moment each request was due;
* closed loop (N concurrent clients for 10 s): the maximum sustained requests/s.

Each line also gives the server's CPU milliseconds per request (all its processes, from
``/proc``: robust to other load on the machine, unlike the latencies) and the load
average when the run ended. The gateway runs in its normal mode (API + delivery worker in
each process) unless ``--no-worker``.

Optionally (``--with-ehr``) an enabled EHR target (the local EHR, ``python -m testkit.ehr``,
started as another process) makes every submission also write an outbox row and the
in-process worker deliver it while the load runs.

Usage::

    python -m bench.ingest                      # SQLite
    python -m bench.ingest --database postgres  # PostgreSQL (fresh database)
    python -m bench.ingest --rate 100 --seconds 20 --concurrency 16 --with-ehr
    python -m bench.ingest --database postgres --rate 50 --baseline main --rounds 2

``--baseline REF`` runs REF's gateway too (a temporary git worktree: its code, its
migrations and bundled profiles, this venv's libraries), alternating with this one round
by round, and prints the medians of both sides and their ratio: on a shared machine the
ratio holds where the absolute figures do not.

Traffic goes only to 127.0.0.1. The load generator shares the machine's cores with the
gateway, so figures are conservative.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml
from psycopg import sql

from bench.baseline import worktree
from testkit import samples

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh database URL: a SQLite file in ``workdir`` or a new PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
        return
    name = f"fgw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = PG_ADMIN.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def wait_http(url: str, timeout_s: float = 30) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up")


def intake_body(template: dict[str, Any], n: int, run: str) -> bytes:
    """A unique submission (new submission id, patient id and email; demographics
    number ``n`` of :func:`testkit.samples.person`)."""
    body = copy.deepcopy(template)
    body["submission_id"] = f"bench-{run}-{n}"
    body["patient"]["external_id"] = f"bench-pt-{run}-{n}"
    body["patient"]["email"] = f"bench+{run}-{n}@example.com"
    body["submitted_at"] = "2026-11-23T14:00:00Z"
    samples.varied(body, n)  # a population's names and birth dates, as merge review sees
    return json.dumps(body).encode()


#: Reuse a pooled connection only if it was used this recently (under the server's
#: keep-alive timeout, so it is not closed under us).
IDLE_REUSE_S = 3.0


class LightClient:
    """A minimal HTTP/1.1 keep-alive client for the load (POST, status code only).

    The load generator shares the two CPUs with the gateway; httpx costs a few CPU
    milliseconds per request, which then shows up as server latency. This client sends
    pre-built request bytes on pooled connections and reads the status line, headers and
    ``Content-Length`` body: a small fraction of that.
    """

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float = 30) -> None:
        host_port = url.split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.timeout_s = timeout_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def post(self, path: str, body: bytes) -> int:
        """POST ``body`` to ``path``; the response status code."""
        conn = None
        while self.idle and conn is None:
            reader, writer, used_at = self.idle.pop()
            if time.monotonic() - used_at < IDLE_REUSE_S:
                conn = reader, writer
            else:  # the server may have closed it (uvicorn: 5 s keep-alive)
                writer.close()
        reader, writer = conn or await self._connect()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            writer.write(head + body)
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = {
                k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)
            }
            await reader.readexactly(int(fields.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if fields.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer, time.monotonic()))
        return status

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        """Close the pooled connections."""
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


def tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` and its descendants (Linux ``/proc``;
    None elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, todo = 0.0, [pid]
    try:
        while todo:
            p = todo.pop()
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
                for task in Path(f"/proc/{p}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return None
    return total


def measured(pid: int, requests_of: Any, call: Any) -> dict[str, Any]:
    """Run ``call()`` and add the server's CPU milliseconds per request to its result."""
    before = tree_cpu_s(pid)
    result: dict[str, Any] = call()
    after = tree_cpu_s(pid)
    result["server_cpu_ms_per_req"] = (
        (after - before) * 1000 / max(1, requests_of(result))
        if before is not None and after is not None
        else None
    )
    return result


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


async def open_loop(
    url: str, key: str, rate: float, seconds: float, template: dict[str, Any]
) -> dict[str, Any]:
    """Send ``rate`` requests/s for ``seconds`` regardless of responses; latency from due time."""
    run = uuid.uuid4().hex[:6]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    bodies = [intake_body(template, i, run) for i in range(total)]  # built before the clock
    kinds: dict[str, int] = {}
    client = LightClient(url, headers)
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.2

    async def one(i: int) -> None:
        nonlocal errors
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            status = await client.post("/v1/intake-submissions", bodies[i])
            if status != 202:
                errors += 1
                kinds[str(status)] = kinds.get(str(status), 0) + 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors += 1  # a timeout or reset under overload counts, it does not abort
            kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
        latencies.append((time.perf_counter() - due) * 1000)

    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = time.perf_counter() - start
    client_cpu_s = time.process_time() - cpu0
    client.close()
    return {
        "error_kinds": kinds,
        "client_cpu_ms_per_req": client_cpu_s * 1000 / total,
        "mode": f"open loop {rate:g}/s",
        "requests": total,
        "errors": errors,
        "achieved_rps": total / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
    }


async def closed_loop(
    url: str, key: str, concurrency: int, seconds: float, template: dict[str, Any]
) -> dict[str, Any]:
    """``concurrency`` clients sending back to back for ``seconds``: maximum throughput."""
    run = uuid.uuid4().hex[:6]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    counter = 0
    client = LightClient(url, headers)
    cpu0 = time.process_time()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors, counter
        while time.perf_counter() < deadline:
            counter += 1
            body = intake_body(template, counter, run)
            t0 = time.perf_counter()
            try:
                if await client.post("/v1/intake-submissions", body) != 202:
                    errors += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
            latencies.append((time.perf_counter() - t0) * 1000)

    t_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    client_cpu_s = time.process_time() - cpu0
    client.close()
    return {
        "client_cpu_ms_per_req": client_cpu_s * 1000 / max(1, len(latencies)),
        "mode": f"closed loop x{concurrency}",
        "requests": len(latencies),
        "errors": errors,
        "achieved_rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
    }


def make_profiles(workdir: Path, ehr_port: int | None, root: Path = ROOT) -> Path:
    """The bundled profiles of the checkout at ``root``, plus an enabled local-EHR target
    when ``ehr_port`` is set."""
    dest = workdir / "profiles"
    shutil.copytree(root / "profiles", dest)
    if ehr_port is not None:
        target = {
            "kind": "ehr",
            "name": "bench-ehr",
            "enabled": True,
            "base_url": f"http://127.0.0.1:{ehr_port}/fhir",
            "auth": {
                "method": "client_secret_basic",
                "token_url": f"http://127.0.0.1:{ehr_port}/token",
                "client_id": "gateway",
                "client_secret_env": "BENCH_EHR_SECRET",
                "scopes": ["system/*.cruds"],
            },
        }
        (dest / "ehr" / "bench-ehr.yaml").write_text(yaml.safe_dump(target))
    return dest


def run(
    kind: str,
    rate: float,
    seconds: float,
    concurrency: int,
    with_ehr: bool,
    server_workers: int = 1,
    worker: bool = True,
    side_root: Path = ROOT,
) -> list[dict[str, Any]]:
    """Start the gateway (and the local EHR), run both load shapes, stop everything.

    ``worker``: the normal mode, ``serve`` with the delivery worker in each process;
    False starts ``serve --no-worker`` (API only). ``side_root``: whose gateway runs:
    this checkout, or a baseline's worktree (``PYTHONPATH`` puts its code before the
    installed package; its own migrations and bundled profiles; this venv's libraries).
    """
    template = json.loads((ROOT / "examples" / "intake-glp1.json").read_text())
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as db_url:
        workdir = Path(tmp)
        ehr_port = free_port() if with_ehr else None
        env = {
            **os.environ,
            "GATEWAY_DATABASE_URL": db_url,
            "GATEWAY_PROFILES_DIR": str(make_profiles(workdir, ehr_port, side_root)),
            "PYTHONPATH": str(side_root),
            "GATEWAY_LOG_LEVEL": "warning",
            "BENCH_EHR_SECRET": "s3cret",
        }
        try:
            if ehr_port is not None:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "testkit.ehr",
                            "--port",
                            str(ehr_port),
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                wait_http(f"http://127.0.0.1:{ehr_port}/fhir/metadata")
            gateway_cli = [sys.executable, "-m", "gateway.cli"]
            subprocess.run(
                [*gateway_cli, "db", "upgrade"],
                env=env,
                cwd=workdir,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            key = (
                subprocess.run(
                    [
                        *gateway_cli,
                        "clients",
                        "create",
                        "bench",
                        "--scope",
                        "intake:write",
                    ],
                    env=env,
                    cwd=workdir,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        *gateway_cli,
                        "serve",
                        "--port",
                        str(port),
                        "--no-migrate",
                        "--workers",
                        str(server_workers),
                        "--worker" if worker else "--no-worker",
                    ],
                    env=env,
                    cwd=workdir,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz")
            asyncio.run(open_loop(url, key, 20, 2, template))  # warm-up
            server = procs[-1].pid
            results = [
                measured(
                    server,
                    lambda r: r["requests"],
                    lambda: asyncio.run(open_loop(url, key, rate, seconds, template)),
                ),
                measured(
                    server,
                    lambda r: r["requests"],
                    lambda: asyncio.run(
                        closed_loop(url, key, concurrency, min(seconds, 10), template)
                    ),
                ),
            ]
            load = os.getloadavg()
            for r in results:
                r["database"] = kind
                r["ehr"] = "local EHR target" if with_ehr else "no target"
                r["processes"] = server_workers
                r["worker"] = worker
                r["loadavg"] = [round(x, 2) for x in load]
            return results
        finally:
            for p in procs:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--rate", type=float, default=100.0, help="open-loop requests per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument(
        "--with-ehr", action="store_true", help="enable a local EHR target during the load"
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=1,
        help="gateway processes (`serve --workers N`; PostgreSQL only, SQLite runs 1)",
    )
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="start `serve --no-worker` (API only) instead of API + delivery worker",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run REF's gateway (a temporary git worktree), alternating with this one",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds with --baseline")
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    results: list[dict[str, Any]] = []
    print(
        f"{'side':5} {'database':10} {'procs':5} {'worker':6} {'ehr':16} {'mode':18} {'req':>6} "
        f"{'err':>4} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'cpu/req':>8}  load avg",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        sides: list[tuple[str, Path]] = [("new", ROOT)]
        if args.baseline:
            sides.insert(0, ("base", stack.enter_context(worktree(args.baseline))))
        for round_no in range(args.rounds if args.baseline else 1):
            order = sides if round_no % 2 == 0 else sides[::-1]
            for label, root in order:
                for kind in kinds:
                    results += _run_and_print(args, kind, label, root)
    if args.baseline:
        print_ratios(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_ratios(results: list[dict[str, Any]]) -> None:
    """Medians per side of CPU per request and p99, and new / base, per database and
    load shape."""
    print("\nmedians (new / base):", flush=True)
    for kind in sorted({r["database"] for r in results}):
        for mode in sorted({r["mode"] for r in results}):

            def median(side: str, key: str, kind: str = kind, mode: str = mode) -> float:
                values = [
                    r[key]
                    for r in results
                    if r["side"] == side
                    and r["database"] == kind
                    and r["mode"] == mode
                    and r[key] is not None
                ]
                return statistics.median(values) if values else float("nan")

            base_cpu, new_cpu = (
                median("base", "server_cpu_ms_per_req"),
                median("new", "server_cpu_ms_per_req"),
            )
            base_p99, new_p99 = median("base", "p99_ms"), median("new", "p99_ms")
            print(
                f"  {kind:10} {mode:18} cpu/req {base_cpu:7.2f} -> {new_cpu:7.2f} ms "
                f"({new_cpu / base_cpu:5.2f}x)   p99 {base_p99:8.1f} -> {new_p99:8.1f} ms",
                flush=True,
            )


def _run_and_print(
    args: argparse.Namespace, kind: str, label: str, root: Path
) -> list[dict[str, Any]]:
    # SQLite takes one writing process (`serve --workers N` refuses it): always 1 there.
    workers = args.server_workers if kind == "postgres" else 1
    if workers != args.server_workers:
        print(f"({kind}: 1 server process; --server-workers applies to PostgreSQL)")
    found = run(
        kind,
        args.rate,
        args.seconds,
        args.concurrency,
        args.with_ehr,
        workers,
        worker=not args.no_worker,
        side_root=root,
    )
    for r in found:
        r["side"] = label
        print(
            f"{label:5} {r['database']:10} {r['processes']:5d} {'yes' if r['worker'] else 'no':6} "
            f"{r['ehr']:16} {r['mode']:18} {r['requests']:6d} {r['errors']:4d} "
            f"{r['achieved_rps']:8.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
            f"{r['p99_ms']:8.1f} {r['max_ms']:8.1f} "
            f"{(r['server_cpu_ms_per_req'] or float('nan')):8.2f}  "
            f"{' '.join(map(str, r['loadavg']))}",
            flush=True,
        )
        if r.get("error_kinds"):
            print(f"    errors: {r['error_kinds']}", flush=True)
    return found


if __name__ == "__main__":
    main()
