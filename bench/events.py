"""Clinical events benchmark: ingest and apply rates over HTTP and MLLP, and the
acknowledgement latency at a fixed arrival rate.

    python -m bench.events                      # SQLite file in a temp dir
    python -m bench.events --database-url postgresql+psycopg://postgres@127.0.0.1/bench
    python -m bench.events --rate 200 --seconds 15 --json bench/results/events.json

What runs (real processes on 127.0.0.1, as in production):

* ``fhir-gateway serve --no-worker`` for HTTP: clinical events (``POST /v1/events``,
  canonical JSON) are stored and acknowledged 202;
* ``fhir-gateway mllp`` for MLLP: ORU^R01 messages from the shipped example EHR feed,
  stored and ACKed;
* applied either right after the acknowledgement in that same process (``--apply
  in-process``, the embedded default) or by a separate ``fhir-gateway worker``
  (``--apply worker``: the receiving process runs with
  ``GATEWAY_APPLY_EVENTS_AFTER_ACK=false``).

Per channel, the load generator (this process) measures:

* **throughput**: ``--concurrency`` senders back to back for ``--seconds``: events
  acknowledged per second, and events *applied* per second (from the first send until
  the last event is in its case's history);
* **latency at a fixed rate**: an open-loop schedule of ``--rate`` events/s for
  ``--seconds`` (each latency is measured from the event's scheduled send time, so a
  slow server cannot hide queueing); p50 / p99 / max acknowledgement latency, and how long
  after the last acknowledgement the last event was applied.

Every event goes to one of ``--patients`` patients (created first through the intake
API) as ``result_available`` from the EHR, which the workflow records in the case history
without moving the case: each one takes the full path (dedupe, patient match, case lock,
ownership and transition check, history row, SLA check).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from bench.ingest import LightClient

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXTERNAL_SYSTEM = "https://fhir-gateway.example.org/sid/external-patient-id"
SB, EB, CR = b"\x0b", b"\x1c", b"\r"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


@dataclass
class Result:
    """The figures of one measurement."""

    channel: str
    mode: str
    events: int
    seconds: float
    acked_per_s: float
    applied_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    apply_lag_s: float | None = None
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def gateway_process(args: list[str], env: dict[str, str], ready: Callable[[], bool]) -> Any:
    """Run ``fhir-gateway <args>`` until the block ends."""
    command = [str(Path(sys.executable).with_name("fhir-gateway")), *args]
    # stderr to a file, not a pipe: nobody reads a pipe while the load runs, and a full
    # pipe buffer would block the gateway on its next warning.
    errors = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in the finally below
        prefix=f"fgw-bench-{args[0]}-", suffix=".stderr", delete=False
    )
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None:
                tail = Path(errors.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{args[0]} exited: {tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args[0]} did not start")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        errors.close()
        size = Path(errors.name).stat().st_size
        if size:
            print(f"  ({args[0]} wrote {size} bytes to {errors.name})", file=sys.stderr)
        else:
            Path(errors.name).unlink()


def _http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def _port_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    return check


# --------------------------------------------------------------------------- load


async def closed_loop(
    send: Callable[[int], Awaitable[bool]], *, concurrency: int, seconds: float
) -> tuple[int, int, float]:
    """``concurrency`` senders back to back for ``seconds``: (acked, errors, elapsed)."""
    counter = iter(range(10**9))
    acked = errors = 0
    stop_at = time.perf_counter() + seconds

    async def sender() -> None:
        nonlocal acked, errors
        while time.perf_counter() < stop_at:
            if await send(next(counter)):
                acked += 1
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return acked, errors, time.perf_counter() - start


async def open_loop(
    send: Callable[[int], Awaitable[bool]], *, rate: float, seconds: float
) -> tuple[list[float], int, float]:
    """Send at ``rate``/s for ``seconds`` on a fixed schedule; latencies in ms, measured
    from each event's scheduled time."""
    total = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.05

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        ok = await send(i)
        latencies.append((time.perf_counter() - scheduled) * 1000)
        if not ok:
            errors += 1

    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    return latencies, errors, time.perf_counter() - start


def applied_count(database_url: str, channel: str) -> int:
    """Messages of ``channel`` no longer waiting to be applied."""
    engine = create_engine(_sync_url(database_url))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM inbound_messages "
                        "WHERE channel = :c AND status <> 'received'"
                    ),
                    {"c": channel},
                ).scalar_one()
            )
    finally:
        engine.dispose()


async def wait_applied(
    database_url: str, channel: str, expected: int, timeout_s: float = 300
) -> float:
    """Wait until ``expected`` messages of ``channel`` are applied; returns the time."""
    deadline = time.perf_counter() + timeout_s
    while True:
        done = await asyncio.to_thread(applied_count, database_url, channel)
        if done >= expected:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{done}/{expected} {channel} messages applied")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- channels


def event_body(patient: str, n: int, run: str) -> bytes:
    """A canonical ``result_available`` event (JSON bytes) for one patient."""
    return json.dumps(
        {
            "event_id": f"bench-{run}-{n}",
            "source": "ehr",
            "type": "result_available",
            "occurred_at": "2026-11-24T12:00:00Z",
            "patient": {"system": EXTERNAL_SYSTEM, "value": patient},
        }
    ).encode()


def oru_message(patient: str, n: int, run: str) -> bytes:
    """An ORU^R01 from the example EHR feed (ER7 bytes); PID-3 is the external patient id."""
    segments = [
        f"MSH|^~\\&|LAB|EXAMPLEEHR|FHIRGW|TELE|20261124120000-0500||ORU^R01^ORU_R01|{run}{n}|P|2.5.1",
        f"PID|1||{patient}^^^TELEHEALTH||DOE^JANE",
        f"OBR|1|O{n}|F{n}|4548-4^Hemoglobin A1c^LN|||20261124110000-0500",
        "OBX|1|NM|4548-4^Hemoglobin A1c^LN||6.1|%|4.0-5.6|H|||F",
    ]
    return "\r".join(segments).encode() + b"\r"


class MllpPool:
    """``size`` MLLP connections; a message waits for a free one (that wait counts in its
    latency, as it would for a sender with that many connections)."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def open(self) -> None:
        """Open the connections."""
        for _ in range(self.size):
            self.free.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))

    async def send(self, message: bytes) -> bytes:
        """Send one framed message on a free connection; the ACK frame."""
        reader, writer = await self.free.get()
        try:
            writer.write(SB + message + EB + CR)
            await writer.drain()
            return await reader.readuntil(EB + CR)
        finally:
            self.free.put_nowait((reader, writer))

    async def close(self) -> None:
        """Close the connections."""
        while not self.free.empty():
            _, writer = self.free.get_nowait()
            writer.close()


# --------------------------------------------------------------------------- run


async def seed_patients(url: str, key: str, count: int) -> list[str]:
    """Create ``count`` patients (and cases) through the intake API; their external ids."""
    intake = json.loads((EXAMPLES / "intake-glp1.json").read_text())
    ids = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        for _ in range(count):
            tag = uuid.uuid4().hex[:8]
            body = json.loads(json.dumps(intake))
            body["submission_id"] = f"bench-sub-{tag}"
            body["patient"]["external_id"] = f"bench-pt-{tag}"
            body["patient"]["email"] = f"bench+{tag}@example.com"
            body["submitted_at"] = "2026-11-23T14:00:00-05:00"
            r = await client.post("/v1/intake-submissions", json=body)
            r.raise_for_status()
            ids.append(body["patient"]["external_id"])
    return ids


async def run_http(
    url: str, key: str, patients: list[str], database_url: str, args: argparse.Namespace
) -> list[Result]:
    """The HTTP measurements (throughput, then fixed rate)."""
    results = []
    slots = asyncio.Semaphore(args.http_connections)
    limits = httpx.Limits(
        max_connections=args.http_connections, max_keepalive_connections=args.http_connections
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    light = LightClient(url, headers) if args.http_client == "light" else None
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=30, limits=limits
    ) as client:
        for mode in ("throughput", "fixed-rate"):
            run = uuid.uuid4().hex[:6]
            before = await asyncio.to_thread(applied_count, database_url, "events")

            async def send(n: int, run: str = run) -> bool:
                # wait for one of the client's connections here (cheap), not in httpx's
                # pool, which slows down with hundreds of waiters
                body = event_body(patients[n % len(patients)], n, run)
                async with slots:
                    if light is not None:
                        return await light.post("/v1/events", body) == 202
                    r = await client.post("/v1/events", content=body)
                return r.status_code == 202

            await send(10**8)  # warm the connection
            before += 1
            t0 = time.perf_counter()
            if mode == "throughput":
                acked, errors, elapsed = await closed_loop(
                    send, concurrency=args.concurrency, seconds=args.seconds
                )
                done_at = await wait_applied(database_url, "events", before + acked)
                results.append(
                    Result(
                        "http",
                        mode,
                        acked,
                        elapsed,
                        acked / elapsed,
                        acked / (done_at - t0),
                        errors=errors,
                        extra={
                            "concurrency": args.concurrency,
                            "apply": args.current_apply,
                            "client": args.http_client,
                        },
                    )
                )
            else:
                latencies, errors, elapsed = await open_loop(
                    send, rate=args.rate, seconds=args.seconds
                )
                acked_at = time.perf_counter()
                done_at = await wait_applied(database_url, "events", before + len(latencies))
                results.append(
                    Result(
                        "http",
                        mode,
                        len(latencies),
                        elapsed,
                        len(latencies) / elapsed,
                        len(latencies) / (done_at - t0),
                        statistics.median(latencies),
                        _percentile(latencies, 99),
                        max(latencies),
                        done_at - acked_at,
                        errors,
                        extra={
                            "rate": args.rate,
                            "apply": args.current_apply,
                            "client": args.http_client,
                        },
                    )
                )
            print(_line(results[-1]), flush=True)
    if light is not None:
        light.close()
    return results


async def run_mllp(
    port: int, patients: list[str], database_url: str, args: argparse.Namespace
) -> list[Result]:
    """The MLLP measurements (throughput, then fixed rate)."""
    results = []
    for mode in ("throughput", "fixed-rate"):
        run = f"B{uuid.uuid4().hex[:6]}"
        pool = MllpPool(port, args.mllp_connections)
        await pool.open()
        before = await asyncio.to_thread(applied_count, database_url, "hl7v2")

        async def send(n: int, run: str = run, pool: MllpPool = pool) -> bool:
            ack = await pool.send(oru_message(patients[n % len(patients)], n, run))
            return b"MSA|AA|" in ack

        try:
            t0 = time.perf_counter()
            if mode == "throughput":
                acked, errors, elapsed = await closed_loop(
                    send, concurrency=args.mllp_connections, seconds=args.seconds
                )
                done_at = await wait_applied(database_url, "hl7v2", before + acked)
                results.append(
                    Result(
                        "mllp",
                        mode,
                        acked,
                        elapsed,
                        acked / elapsed,
                        acked / (done_at - t0),
                        errors=errors,
                        extra={"connections": args.mllp_connections, "apply": args.current_apply},
                    )
                )
            else:
                latencies, errors, elapsed = await open_loop(
                    send, rate=args.rate, seconds=args.seconds
                )
                acked_at = time.perf_counter()
                done_at = await wait_applied(database_url, "hl7v2", before + len(latencies))
                results.append(
                    Result(
                        "mllp",
                        mode,
                        len(latencies),
                        elapsed,
                        len(latencies) / elapsed,
                        len(latencies) / (done_at - t0),
                        statistics.median(latencies),
                        _percentile(latencies, 99),
                        max(latencies),
                        done_at - acked_at,
                        errors,
                        extra={
                            "rate": args.rate,
                            "connections": args.mllp_connections,
                            "apply": args.current_apply,
                        },
                    )
                )
        finally:
            await pool.close()
        print(_line(results[-1]), flush=True)
    return results


def _line(r: Result) -> str:
    parts = [f"{r.channel:5} {r.mode:11} events={r.events:6d} acked/s={r.acked_per_s:7.1f}"]
    if "apply" in r.extra:
        parts.insert(0, f"[{r.extra['apply']}]")
    if "client" in r.extra:
        parts.append(f"client={r.extra['client']}")
    if r.applied_per_s is not None:
        parts.append(f"applied/s={r.applied_per_s:7.1f}")
    if r.p99_ms is not None:
        parts.append(f"ack p50={r.p50_ms:.1f}ms p99={r.p99_ms:.1f}ms max={r.max_ms:.1f}ms")
        parts.append(f"apply-lag={r.apply_lag_s:.2f}s")
    parts.append(f"errors={r.errors}")
    return "  ".join(parts)


def _create_key(env: dict[str, str]) -> str:
    command = [
        str(Path(sys.executable).with_name("fhir-gateway")),
        "clients",
        "create",
        f"bench-{uuid.uuid4().hex[:6]}",
        "-s",
        "intake:write",
        "-s",
        "events:write",
        "-s",
        "hl7:write",
    ]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def maybe_worker(env: dict[str, str], apply: str) -> Any:
    """A ``fhir-gateway worker`` process when the worker applies the events."""
    if apply != "worker":
        yield None
        return
    with gateway_process(["worker"], env, lambda: True) as proc:
        yield proc


async def main(args: argparse.Namespace) -> list[Result]:
    """Start the processes, seed patients, run every channel and apply mode."""
    workdir = Path(tempfile.mkdtemp(prefix="fgw-bench-"))
    database_url = args.database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    base_env = {
        **os.environ,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_RUN_WORKER": "false",
    }
    try:
        await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).with_name("fhir-gateway")), "db", "upgrade"],
            env=base_env,
            check=True,
            capture_output=True,
        )
        key = _create_key(base_env)
        results: list[Result] = []
        patients: list[str] = []
        for apply in args.apply.split(","):
            args.current_apply = apply
            env = {
                **base_env,
                "GATEWAY_APPLY_EVENTS_AFTER_ACK": "true" if apply == "in-process" else "false",
            }
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            with gateway_process(
                ["serve", "--no-worker", "--port", str(port)], env, _http_ready(url)
            ):
                if not patients:
                    patients = await seed_patients(url, key, args.patients)
                if "http" in args.channels:
                    with maybe_worker(env, apply):
                        results += await run_http(url, key, patients, database_url, args)
            if "mllp" in args.channels:
                mllp_port = _free_port()
                with (
                    gateway_process(
                        ["mllp", "--port", str(mllp_port), "--allow-plaintext"],
                        env,
                        _port_ready(mllp_port),
                    ),
                    maybe_worker(env, apply),
                ):
                    results += await run_mllp(mllp_port, patients, database_url, args)
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _apply_modes(value: str) -> str:
    """``--apply``: ``in-process``, ``worker``, both comma-separated, or ``both``."""
    modes = ["in-process", "worker"] if value == "both" else value.split(",")
    unknown = [m for m in modes if m not in ("in-process", "worker")]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown apply mode(s): {', '.join(unknown)}")
    return ",".join(modes)


def cli(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.events", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--database-url", help="default: a SQLite file in a temp dir")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="events/s for the fixed-rate run")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="HTTP senders in the throughput run"
    )
    parser.add_argument("--mllp-connections", type=int, default=4)
    parser.add_argument(
        "--http-client",
        choices=["light", "httpx"],
        default="light",
        help="the HTTP load generator: bench.ingest's light keep-alive client (about 0.3 ms "
        "of CPU per request) or httpx (a few ms per request, taken from the cores the "
        "gateway uses; the HTTP figures of docs/PERFORMANCE.md before this option were "
        "measured with it)",
    )
    parser.add_argument(
        "--http-connections", type=int, default=32, help="HTTP keep-alive connections"
    )
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--channels", default="http,mllp")
    parser.add_argument(
        "--apply",
        default="in-process,worker",
        type=_apply_modes,
        help="who applies the events: in-process, worker, or both (comma-separated)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = asyncio.run(main(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "started": started,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                    },
                    "database": (args.database_url or "sqlite").split("://", 1)[0],
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "results": [r.__dict__ for r in results],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    cli()
