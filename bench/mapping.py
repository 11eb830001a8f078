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
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def main() -> None:
    """Print the throughput table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario")
    parser.add_argument("--profiles", type=Path, default=PROFILES)
    args = parser.parse_args()
    profiles = load_profiles(args.profiles)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
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
