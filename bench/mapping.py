"""Mapping throughput per core: payload in -> validated FHIR out, no database, no network.

``python -m bench.mapping [--seconds S] [--profiles DIR]`` (``make bench``). For each
scenario, one process on one core repeatedly runs exactly what ingest runs before the
database: parse and normalize the payload against its profile, map it (Patient,
QuestionnaireResponse, derived Observations/Flags/Consents, or Patient +
MedicationRequest), build the Provenance, and validate every resource with
``fhir.resources.R4B`` plus our binding and US Core checks. Each iteration uses a new
submission id and a new patient id, as production traffic does (every reference to the
patient is new content to the validation memo, so no result is reused across
iterations). Prints a table: mapped
submissions per second, mean and p99 time per submission, resources per submission.

Scenarios (the payloads are the golden example inputs beside the profiles):

* ``glp1-v1 intake``: the bundled GLP-1 intake (22 questions, 3 vitals, 2 consents);
* ``glp1-v2 intake (full)``: the full-featured profile: groups, a repeating group,
  unit conversion, synonyms via a ConceptMap, enableWhen, unknowns, 3 vitals with BMI,
  4 FHIRPath flag rules (2 raised), 2 consents;
* ``dermatology intake``: the second form;
* ``stripe checkout``: a Stripe ``checkout.session.completed`` via the profile's paths.

``python -m bench.mapping --baseline REF [--rounds N]`` compares with another commit in
the same run: it checks ``REF`` out into a temporary ``git worktree`` and runs one task
per (round, scenario, side), one after the other, alternating the baseline and this
checkout (the order flips each round); each task is a fresh process that imports only its
own side's ``mappers`` (:mod:`bench.mapping_side`), and measures with the same loop. It prints the medians of both sides
and their ratio, for submissions per second and for CPU time per submission, so the
comparison holds on a shared, noisy machine: both sides see the same noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.baseline import worktree
from mappers.pipeline import EXAMPLE_SYSTEMS, checkout_payload, map_checkout, map_intake
from mappers.profiles import ProfileSet, load_profiles
from mappers.provenance import provenance_for
from mappers.validation import validate_resources

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"


def _intake_case(profiles: ProfileSet, path: Path) -> Callable[[int], int]:
    base = json.loads(path.read_text())

    def run(i: int) -> int:
        data = copy.copy(base)
        data["submission_id"] = f"bench-{i}"
        mapped = map_intake(
            data,
            profiles,
            systems=EXAMPLE_SYSTEMS,
            patient_id=f"7b2e4a90-0000-4000-8000-{i:012d}",
            response_id=f"3f1c0d5e-0000-4000-8000-{i:012d}",
        )
        return _finish(mapped.resources, data["submission_id"])

    return run


def _stripe_case(profiles: ProfileSet, path: Path) -> Callable[[int], int]:
    base = json.loads(path.read_text())

    def run(i: int) -> int:
        event = copy.deepcopy(base)
        event["data"]["object"]["id"] = f"cs_bench_{i}"
        canonical = checkout_payload(event, profiles, kind="stripe")
        mapped = map_checkout(
            canonical,
            profiles,
            systems=EXAMPLE_SYSTEMS,
            patient_id=f"7b2e4a90-0000-4000-8000-{i:012d}",
            request_id=f"3f1c0d5e-0000-4000-8000-{i:012d}",
        )
        return _finish(mapped.resources, event["data"]["object"]["id"])

    return run


def _finish(resources: list[dict[str, Any]], message_id: str) -> int:
    provenance = provenance_for(
        provenance_id="3f1c0d5e-0000-4000-8000-00000000ffff",
        targets=[f"{r['resourceType']}/{r['id']}" for r in resources],
        recorded=datetime.now(UTC),
        message_id=message_id,
        message_kind="bench",
        systems=EXAMPLE_SYSTEMS,
        author=f"Patient/{resources[0]['id']}",
        organization="Bench",
        profile="intake/bench/1#sha256=0",
    )
    validate_resources([*resources, provenance])
    return len(resources) + 1


def scenarios(profiles: ProfileSet, root: Path) -> dict[str, Callable[[int], int]]:
    """The benchmark scenarios by name."""
    intake = root / "intake"
    return {
        "glp1-v1 intake": _intake_case(
            profiles, intake / "glp1-weight-management-v1.examples/basic.input.json"
        ),
        "glp1-v2 intake (full)": _intake_case(
            profiles, intake / "glp1-weight-management-v2.examples/full.input.json"
        ),
        "dermatology intake": _intake_case(
            profiles, intake / "dermatology-v1.examples/acne.input.json"
        ),
        "stripe checkout": _stripe_case(
            profiles, root / "checkout/glp1-plans.examples/stripe.input.json"
        ),
    }


def measure(run: Callable[[int], int], seconds: float) -> dict[str, float]:
    """Run ``run`` for about ``seconds`` after a warm-up; throughput and latency."""
    for i in range(50):
        run(i)
    times: list[float] = []
    resources = 0
    deadline = time.perf_counter() + seconds
    i = 1000
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        resources = run(i)
        times.append(time.perf_counter() - t0)
        i += 1
    total = sum(times)
    times.sort()
    return {
        "per_s": len(times) / total,
        "mean_ms": statistics.fmean(times) * 1000,
        "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
        "n": len(times),
        "resources": resources,
    }


def compare(ref: str, *, seconds: float, rounds: int) -> None:
    """Measure ``ref`` and this checkout alternately; print both, and new / baseline."""
    names = list(scenarios(load_profiles(PROFILES), PROFILES))
    with worktree(ref) as base:
        results = _alternate(str(base), str(ROOT), names, seconds=seconds, rounds=rounds)
    print(
        f"{'scenario':24} {'base per s':>10} {'new per s':>10} {'ratio':>6}"
        f" {'base CPU us':>11} {'new CPU us':>10} {'CPU ratio':>9}"
    )
    for name in names:
        b, n = results[("base", name)], results[("new", name)]
        bps, nps = (statistics.median(r["per_s"] for r in side) for side in (b, n))
        bcpu, ncpu = (statistics.median(r["cpu_us"] for r in side) for side in (b, n))
        print(
            f"{name:24} {bps:10.0f} {nps:10.0f} {nps / bps:6.2f}"
            f" {bcpu:11.0f} {ncpu:10.0f} {bcpu / ncpu:9.2f}"
        )
    print("ratio: new / baseline submissions per second; CPU ratio: baseline / new CPU time")


def _alternate(
    base: str, new: str, names: list[str], *, seconds: float, rounds: int
) -> dict[tuple[str, str], list[dict[str, float]]]:
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_ in range(rounds):
        for name in names:
            sides = [("base", base), ("new", new)]
            for side, root in sides if round_ % 2 == 0 else sides[::-1]:
                done = subprocess.run(
                    [sys.executable, "-m", "bench.mapping_side", root, name, str(seconds)],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(done.stdout.splitlines()[-1])
                results.setdefault((side, name), []).append(r)
                print(
                    f"  round {round_ + 1}/{rounds} {name:24} {side:4}"
                    f" {r['per_s']:7.0f}/s {r['cpu_us']:7.0f} us CPU",
                    flush=True,
                )
    return results


def main() -> None:
    """Print the throughput table (or, with ``--baseline``, the comparison)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario (and side)")
    parser.add_argument("--profiles", type=Path, default=PROFILES)
    parser.add_argument("--baseline", metavar="REF", help="a git ref to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.baseline:
        print(
            f"mapping throughput per core, {args.baseline} (base) against this checkout (new),"
            f" {args.rounds} rounds of {args.seconds:g} s per scenario and side, alternating"
            f" ({os.cpu_count()} CPUs, load average {load:.2f} at start)"
        )
        compare(args.baseline, seconds=args.seconds, rounds=args.rounds)
        return
    profiles = load_profiles(args.profiles)
    print(
        f"mapping throughput, one process, {args.seconds:g} s per scenario "
        f"({os.cpu_count()} CPUs, load average {load:.2f} at start)"
    )
    print(f"{'scenario':28} {'per s':>9} {'mean ms':>9} {'p99 ms':>9} {'resources':>10} {'n':>8}")
    for name, run in scenarios(profiles, args.profiles).items():
        r = measure(run, args.seconds)
        print(
            f"{name:28} {r['per_s']:9.0f} {r['mean_ms']:9.3f} {r['p99_ms']:9.3f} "
            f"{int(r['resources']):10d} {int(r['n']):8d}"
        )


if __name__ == "__main__":
    main()
