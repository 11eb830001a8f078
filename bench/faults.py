"""Fault benchmark (issue 17): how long after an EHR recovers the last patient arrives.

Against a local real FHIR server (Medplum's, behind the testkit fault layer, served by
this process so it can script the faults), with real ``fhir-gateway worker`` processes
on PostgreSQL. Three scenarios, each with ``--patients`` (default 100) patients in flight,
each an intake and a checkout (two deliveries, in order per patient):

* ``outage``: every FHIR request fails (503, metadata included) for 30 s; the patients'
  deliveries come due evenly over those 30 s;
* ``rate``: 20% of FHIR writes fail (503) for two minutes (metadata answers); the
  deliveries come due evenly over the two minutes;
* ``burst``: 12 transient failures, as an on-call engineer saw them: 503 with
  ``Retry-After: 1`` and ``2``, 500 and 502 after the EHR committed, and two 10-second
  hangs (the target's timeout is 5 s); every delivery is due at the start.

Reported per scenario and side: **seconds from the EHR's recovery to the last delivery**
(the outage's end; for the burst, the moment its last scripted fault was served), and to
the first delivery after it (the breaker's part; the rest is the drain, which depends on
the machine's load), how many deliveries were left for after the recovery,
deliveries lost (not delivered when the run ends, ``--max-after-s`` after recovery),
duplicated (resources in the EHR beyond one per business identifier) and dead-lettered,
and how many times the circuit opened (the workers' ``delivery.circuit_probed`` logs).

``--baseline REF`` runs the same scenarios with the workers of another commit (checked
out into a temporary ``git worktree``; the EHR, the seeding and the measurement are this
checkout's) in the same run, alternating sides per scenario. Both sides use one template
database migrated by this checkout (new columns have server defaults, so older code runs
on it), and the target's default retry and circuit-breaker policies of their own code.

Usage (from the repository root; PostgreSQL at ``GATEWAY_TEST_PG_URL`` or 127.0.0.1)::

    python -m bench.faults --baseline main            # about 15 minutes
    python -m bench.faults --only burst --patients 20

Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from bench.delivery import SECRET, SECRET_ENV, TARGET, admin, db_url

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("outage", "rate", "burst")
#: The fault window of each scenario (seconds) over which the deliveries come due.
SPREAD_S = {"outage": 30.0, "rate": 120.0, "burst": 0.0}
#: Business identifier systems of what a patient's two messages write, to count copies.
IDENTIFIED = ("Patient", "QuestionnaireResponse", "MedicationRequest", "Provenance")


def write_profiles(dest: Path, side_root: Path, fhir_base: str, token_url: str) -> Path:
    """The side's bundled profiles plus an enabled ``bench-ehr`` target with the default
    retry and circuit-breaker policies (a 5 s request timeout)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(side_root / "profiles", dest)
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
        "timeout_s": 5,
    }
    (dest / "ehr" / f"{TARGET}.yaml").write_text(yaml.safe_dump(target))
    return dest


async def seed(database: str, profiles: Path, patients: int) -> None:
    """``patients`` intakes and their checkouts (same e-mail: the same patient)."""
    from gateway.ingest.checkout import submit_checkout
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
    try:
        for i in range(patients):
            intake = samples.varied(samples.intake(), i)  # one patient of a population
            checkout = samples.varied(samples.canonical_checkout(), i)
            checkout["customer"]["email"] = intake["patient"]["email"]
            for submit, body in ((submit_intake, intake), (submit_checkout, checkout)):
                async with runtime.sessionmaker() as session:
                    await submit(
                        session,
                        IngestContext.of(runtime),
                        raw=json.dumps(body).encode(),
                        content_type="application/json",
                        actor="bench",
                    )
                    await session.commit()
    finally:
        await runtime.close()


def start_workers(
    side_root: Path, n: int, concurrency: int, database: str, profiles: Path, logs: Path
) -> list[subprocess.Popen[bytes]]:
    """``n`` worker processes of the side's code (``PYTHONPATH`` = its tree)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(side_root),
        "GATEWAY_DATABASE_URL": db_url(database),
        "GATEWAY_PROFILES_DIR": str(profiles),
        "GATEWAY_LOG_LEVEL": "info",
        "GATEWAY_WORKER_POLL_INTERVAL": "PT0.2S",
        SECRET_ENV: SECRET,
    }
    procs = []
    for i in range(n):
        with (logs / f"worker-{database}-{i}.log").open("wb") as log:
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
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then wait (kill after 20 s)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def script_faults(ehr: Any, scenario: str) -> Callable[[], float | None]:
    """Start the scenario's faults now; returns a function that gives the recovery time
    (``time.monotonic()``) once the EHR has recovered, else None."""
    started = time.monotonic()
    if scenario == "outage":
        ehr.fhir_outage(30, 503)
        return lambda: started + 30 if time.monotonic() >= started + 30 else None
    if scenario == "rate":
        ehr.fhir_outage(120, 503, fraction=0.2, seed=17)
        return lambda: started + 120 if time.monotonic() >= started + 120 else None
    # burst: in the order requests reach the EHR
    ehr.fail_fhir(2, 503, retry_after=1)
    ehr.fail_fhir(2, 500, after_commit=True)
    ehr.fail_fhir(2, 503, retry_after=2)
    ehr.hang_fhir(1, seconds=10)
    ehr.fail_fhir(2, 502, after_commit=True)
    ehr.fail_fhir(2, 503, retry_after=1)
    ehr.hang_fhir(1, seconds=10)
    seen: dict[str, float] = {}

    def recovered() -> float | None:
        if "at" not in seen and not ehr.fhir_faults:
            seen["at"] = time.monotonic()
        return seen.get("at")

    return recovered


def duplicates(ehr: Any) -> int:
    """Resources beyond one per business identifier (or Provenance tag) in the EHR."""
    extra = 0
    for resource_type in IDENTIFIED:
        keys: Counter[str] = Counter()
        for resource in ehr.resources(resource_type):
            marks = resource.get("identifier") or (resource.get("meta") or {}).get("tag") or []
            if isinstance(marks, dict):  # QuestionnaireResponse.identifier is 0..1
                marks = [marks]
            key = json.dumps(
                sorted((m.get("system"), m.get("value") or m.get("code")) for m in marks)
            )
            keys[key] += 1
        extra += sum(n - 1 for n in keys.values() if n > 1)
    return extra


def run(
    *,
    side: str,
    side_root: Path,
    scenario: str,
    template: str,
    deliveries: int,
    workers: int,
    concurrency: int,
    max_after_s: float,
    logs: Path,
) -> dict[str, Any]:
    """One scenario with one side's workers; returns its figures."""
    from testkit.ehr import FhirServer, LocalEhr, run_ehr

    database = f"fgw_faults_{uuid.uuid4().hex[:8]}"
    admin(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(database), sql.Identifier(template)
        )
    )
    result: dict[str, Any] = {"side": side, "scenario": scenario, "deliveries": deliveries}
    try:
        with contextlib.ExitStack() as stack:
            fhir = stack.enter_context(FhirServer(log_path=logs / f"fhir-{database}.log"))
            ehr = LocalEhr(fhir, client_secret=SECRET, token_lifetime_s=3600)
            base = stack.enter_context(run_ehr(ehr)).base_url
            profiles = write_profiles(
                logs / f"profiles-{database}", side_root, f"{base}/fhir", f"{base}/token"
            )
            with psycopg.connect(db_url(database, "postgresql"), autocommit=True) as conn:
                start_at = datetime.now(UTC) + timedelta(seconds=5 + workers)
                spread = SPREAD_S[scenario]
                # due evenly over the fault window, a patient's checkout right after its intake
                conn.execute(
                    "UPDATE deliveries d SET available_at = %s + (r.n * %s) * interval '1 second',"
                    " created_at = %s FROM (SELECT id, (row_number() OVER (ORDER BY id) - 1)"
                    " / 2 AS n FROM deliveries) r WHERE r.id = d.id",
                    (start_at, spread / max(1, deliveries // 2 - 1), start_at),
                )
                procs = start_workers(side_root, workers, concurrency, database, profiles, logs)
                stack.callback(stop, procs)
                time.sleep(max(0.0, (start_at - datetime.now(UTC)).total_seconds()))
                recovered = script_faults(ehr, scenario)
                fault_started = time.monotonic()
                recovery: float | None = None
                while True:
                    recovery = recovered()
                    row = conn.execute(
                        "SELECT count(*) FILTER (WHERE status IN ('delivered', 'dead', 'review'))"
                        " FROM deliveries"
                    ).fetchone()
                    done = int(row[0]) if row else 0
                    if recovery is not None and done >= deliveries:
                        break
                    if recovery is not None and time.monotonic() - recovery > max_after_s:
                        break
                    if time.monotonic() - fault_started > max_after_s + 300:
                        break
                    time.sleep(0.1)
                ended = time.monotonic()
                recovery_wall = datetime.now(UTC) - timedelta(
                    seconds=ended - (recovery if recovery is not None else ended)
                )
                statuses = dict(
                    conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status")
                )
                last = conn.execute(
                    "SELECT max(delivered_at), max(attempts) FROM deliveries"
                    " WHERE status = 'delivered'"
                ).fetchone()
                first = conn.execute(
                    "SELECT min(delivered_at) FROM deliveries WHERE delivered_at >= %s",
                    (recovery_wall,),
                ).fetchone()
                after_recovery = conn.execute(
                    "SELECT count(*) FROM deliveries WHERE delivered_at >= %s", (recovery_wall,)
                ).fetchone()
                stop(procs)
                result.update(
                    statuses=statuses,
                    after_recovery_s=round((last[0] - recovery_wall).total_seconds(), 1)
                    if last and last[0]
                    else None,
                    first_after_recovery_s=round((first[0] - recovery_wall).total_seconds(), 1)
                    if first and first[0]
                    else None,
                    delivered_after_recovery=int(after_recovery[0]) if after_recovery else 0,
                    lost=deliveries - int(statuses.get("delivered", 0)),
                    dead=int(statuses.get("dead", 0)),
                    review=int(statuses.get("review", 0)),
                    max_attempts=last[1] if last else None,
                    duplicated=duplicates(ehr),
                    ehr_patients=ehr.count("Patient"),
                    requests=len(ehr.requests),
                    failed_requests=sum(1 for r in ehr.requests if r.status >= 500),
                    circuit_opened=_count_logs(logs, database, "circuit_probed"),
                    finished=statuses.get("delivered", 0) == deliveries,
                )
    finally:
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    return result


def _count_logs(logs: Path, database: str, event: str) -> int:
    """How many log lines of the run's workers name ``event`` (probes of open circuits)."""
    total = 0
    for path in logs.glob(f"worker-{database}-*.log"):
        total += sum(1 for line in path.read_text(errors="replace").splitlines() if event in line)
    return total


def main(argv: list[str] | None = None) -> None:
    """Run the scenarios (both sides with ``--baseline``), print a Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=4, help="per worker process")
    parser.add_argument("--only", choices=SCENARIOS, action="append")
    parser.add_argument("--baseline", metavar="REF", help="also run REF's workers")
    parser.add_argument(
        "--max-after-s", type=float, default=240.0, help="give up this long after recovery"
    )
    args = parser.parse_args(argv)

    from gateway.db.migrate import upgrade

    logs = Path(tempfile.mkdtemp(prefix="fgw-faults-"))
    template = f"fgw_faults_tmpl_{os.getpid()}"
    sides: list[tuple[str, Path]] = [("new", ROOT)]
    base_tree: Path | None = None
    if args.baseline:
        base_tree = logs / "baseline-tree"
        subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "worktree",
                "add",
                "--detach",
                "--quiet",
                str(base_tree),
                args.baseline,
            ],
            check=True,
        )
        sides.insert(0, ("base", base_tree))
    admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    results: list[dict[str, Any]] = []
    try:
        upgrade(db_url(template))
        profiles = write_profiles(
            logs / "seed-profiles", ROOT, "http://127.0.0.1:9/fhir", "http://127.0.0.1:9/token"
        )
        print(f"seeding {args.patients} patients (intake + checkout) ...", flush=True)
        asyncio.run(seed(template, profiles, args.patients))
        with psycopg.connect(db_url(template, "postgresql")) as conn:
            row = conn.execute("SELECT count(*) FROM deliveries").fetchone()
            deliveries = int(row[0]) if row else 0
        for scenario in args.only or SCENARIOS:
            for side, root in sides:
                print(f"{scenario}: {side} ...", flush=True)
                r = run(
                    side=side,
                    side_root=root,
                    scenario=scenario,
                    template=template,
                    deliveries=deliveries,
                    workers=args.workers,
                    concurrency=args.concurrency,
                    max_after_s=args.max_after_s,
                    logs=logs,
                )
                r["load_average_1m"] = round(os.getloadavg()[0], 2)
                print(f"  {json.dumps(r, default=str)}", flush=True)
                results.append(r)
    finally:
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(template)))
        if base_tree is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                check=False,
            )

    print()
    print(
        "| scenario | side | s from recovery to first / last delivery | delivered after "
        "recovery | delivered | lost | duplicated | dead | probes | load |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        after = r["after_recovery_s"]
        shown = f"{after}" if r["finished"] else f"> {args.max_after_s:g} (gave up)"
        print(
            f"| {r['scenario']} | {r['side']} | {r['first_after_recovery_s']} / {shown} | "
            f"{r['delivered_after_recovery']} | "
            f"{r['statuses'].get('delivered', 0)}/{r['deliveries']} | {r['lost']} | "
            f"{r['duplicated']} | {r['dead']} | {r['circuit_opened']} | {r['load_average_1m']} |"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"faults-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {path.relative_to(ROOT)}; logs: {logs}")


if __name__ == "__main__":
    main()
