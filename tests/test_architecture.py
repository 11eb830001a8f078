"""The dependency direction of DESIGN.md, enforced: ``mappers`` is pure (no ``gateway``,
no database, web framework, HTTP client or logger), and ``bench`` and ``testkit`` never
import ``tests``; checked with import-linter and the contracts in ``pyproject.toml``."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(
    cwd: Path, *args: str, pythonpath: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_import_contract_is_kept() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert f"Contracts: {len(config['contracts'])} kept, 0 broken." in result.stdout


def test_the_contract_catches_a_mapper_that_imports_the_gateway_or_a_logger(tmp_path: Path) -> None:
    """A control: the same contract over a tiny project that breaks it must fail."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c for c in config["contracts"] if c["source_modules"] == ["mappers"]]
    lines = [
        "[importlinter]",
        "root_packages =\n    " + "\n    ".join(config["root_packages"]),
        f"include_external_packages = {config['include_external_packages']}",
        "",
        "[importlinter:contract:pure-mappers]",
        f"name = {contract['name']}",
        f"type = {contract['type']}",
        "source_modules =\n    " + "\n    ".join(contract["source_modules"]),
        "forbidden_modules =\n    " + "\n    ".join(contract["forbidden_modules"]),
    ]
    (tmp_path / ".importlinter").write_text("\n".join(lines) + "\n")
    for package in config["root_packages"]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "gateway" / "app.py").write_text("VALUE = 1\n")
    (tmp_path / "mappers" / "bad.py").write_text("import logging\n\nfrom gateway import app\n")
    result = lint_imports(tmp_path, "--config", ".importlinter", pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert "mappers.bad -> gateway.app" in result.stdout
    assert "mappers.bad -> logging" in result.stdout


def test_the_contract_catches_a_benchmark_that_imports_the_tests(tmp_path: Path) -> None:
    """A control for ``bench`` -> ``tests``: a benchmark importing a test helper must fail."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c for c in config["contracts"] if "tests" in c["forbidden_modules"]]
    lines = [
        "[importlinter]",
        "root_packages =\n    bench\n    testkit\n    tests",
        "",
        "[importlinter:contract:no-tests]",
        f"name = {contract['name']}",
        f"type = {contract['type']}",
        "source_modules =\n    " + "\n    ".join(contract["source_modules"]),
        "forbidden_modules =\n    " + "\n    ".join(contract["forbidden_modules"]),
    ]
    (tmp_path / ".importlinter").write_text("\n".join(lines) + "\n")
    for package in ("bench", "testkit", "tests"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tests" / "samples.py").write_text("VALUE = 1\n")
    (tmp_path / "bench" / "run.py").write_text("from tests import samples\n")
    result = lint_imports(tmp_path, "--config", ".importlinter", pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "bench.run -> tests.samples" in result.stdout
