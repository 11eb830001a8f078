"""One side of ``python -m bench.mapping --baseline REF``: measure one checkout's mapping.

``python -m bench.mapping_side ROOT SCENARIO SECONDS`` prints one JSON line. Each task
runs in a fresh process, so the checkout's ``mappers`` is the one imported: this module
imports nothing of the project at its top. :func:`run_side` puts ``root`` first on
``sys.path``, loads ``root/bench/mapping.py`` by path and measures one of its scenarios
with the same loop for both sides.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any


def run_side(root: str, scenario: str, seconds: float, warmup: int = 50) -> dict[str, float]:
    """Measure ``scenario`` of the checkout at ``root`` for about ``seconds``.

    Returns:
        ``per_s`` (submissions per wall-clock second), ``cpu_us`` (process CPU time per
        submission, microseconds: the figure other load on the machine disturbs least) and
        ``n`` (submissions measured).
    """
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("side_mapping", Path(root, "bench/mapping.py"))
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    profiles_dir = Path(root, "profiles")
    run = module.scenarios(module.load_profiles(profiles_dir), profiles_dir)[scenario]
    for i in range(warmup):
        run(i)
    n, i = 0, 1000
    wall0, cpu0 = time.perf_counter(), time.process_time()
    deadline = wall0 + seconds
    while time.perf_counter() < deadline:
        run(i)
        i += 1
        n += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"per_s": n / wall, "cpu_us": cpu / n * 1e6, "n": n}


if __name__ == "__main__":
    print(json.dumps(run_side(sys.argv[1], sys.argv[2], float(sys.argv[3]))))
