"""The dependency rules of docs/ARCHITECTURE.md, enforced.

* the import-linter contracts of ``pyproject.toml``: ``mappers`` is pure (no ``gateway``,
  no database, web framework, HTTP client or logger); the ``gateway`` floors (an import
  only goes down); no endpoint module imports another's; no import cycles; ``bench`` and
  ``testkit`` never import ``tests``, and ``testkit`` never imports the gateway;
* no module imports a ``_private`` name of another module (checked here, on the syntax
  tree).

Each rule also runs on a tiny project that breaks it, which must fail: a rule that cannot
fail proves nothing.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300", "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def report() -> str:
    """One lint-imports run over the repository, all contracts."""
    return lint_imports(REPO).stdout


def verdict(report: str, name: str) -> str:
    found = re.search(rf"^{re.escape(name)} (KEPT|BROKEN)$", report, re.MULTILINE)
    assert found, report
    return found.group(1)


@pytest.mark.parametrize(
    "name",
    [
        "mappers is pure: no gateway, no I/O frameworks, no logger",
        "gateway layers",
        "no endpoint module imports another's",
        "mappers: no import cycles",
        "gateway: no import cycles",
        "benchmarks and the testkit never import the tests",
        "the testkit plays the gateway's peers: it never imports the gateway or the benchmarks",
    ],
)
def test_the_contract_is_kept(report: str, name: str) -> None:
    assert verdict(report, name) == "KEPT", report


def test_every_module_of_the_layers_is_placed(report: str) -> None:
    """A top-level module of ``gateway`` that no floor names would escape the contract."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in contracts["contracts"] if c["id"] == "gateway-layers"]
    placed = set(re.findall(r"gateway\.([a-z0-9_]+)", " ".join(layers)))
    present = {
        p.stem if p.is_file() else p.name
        for p in (REPO / "gateway").iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").exists()) and not p.name.startswith("_")
    }
    assert present - placed - {"migrations"} == set()
    # A package placed module by module (fhir: its endpoints and its repository stand on
    # different floors) has every module placed.
    split: dict[str, set[str]] = {}
    for package, module in re.findall(r"gateway\.([a-z0-9_]+)\.([a-z0-9_]+)", " ".join(layers)):
        split.setdefault(package, set()).add(module)
    for package, modules in split.items():
        found = {p.stem for p in (REPO / "gateway" / package).glob("*.py")} - {"__init__"}
        assert found <= modules, (package, found - modules)


# --------------------------------------------------------------------------- controls


def _project(tmp_path: Path, files: dict[str, str]) -> Path:
    """A tiny project with the repository's import-linter section and ``files`` (and an
    empty package for every root package that ``files`` leave out)."""
    config = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(config[config.index("[tool.importlinter]") :])
    for package in tomllib.loads(config)["tool"]["importlinter"]["root_packages"]:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        for parent in path.relative_to(tmp_path).parents:
            init = tmp_path / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
    return tmp_path


#: Every module the layers contract names (empty), so that the control fails for the
#: violation it plants, not for a missing layer.
LAYER_MODULES = {
    f"gateway/{name}.py": ""
    for name in (
        "app",
        "cli",
        "worker",
        "openapi",
        "console",
        "ops",
        "ingest",
        "events",
        "hl7",
        "partners",
        "fhir/endpoints",
        "fhir/audit_endpoints",
        "fhir/search",
        "fhir/capability",
        "profiles",
        "imports",
        "triage",
        "workflow",
        "delivery",
        "subscribers",
        "ehr",
        "oauth",
        "patients",
        "queue",
        "audit",
        "http",
        "deps",
        "runtime",
        "fhir/repository",
        "inbox",
        "clients",
        "staff",
        "db",
        "errors",
        "settings",
        "secrets",
        "logging",
        "metrics",
        "clock",
        "egress",
    )
}


def test_the_contracts_catch_what_they_forbid(tmp_path: Path) -> None:
    """A control: the same contracts over a tiny project that breaks each must fail."""
    root = _project(
        tmp_path,
        {
            **LAYER_MODULES,
            "gateway/db.py": "from gateway import ingest\n",
            "gateway/patients.py": "from gateway import http\n",
            "mappers/bad.py": "import logging\n\nfrom gateway import app\n",
            "mappers/a.py": "from mappers import b\n",
            "mappers/b.py": "from mappers import a\n",
        },
    )
    result = lint_imports(root)
    assert result.returncode != 0, result.stdout
    out = result.stdout
    for name in (
        "mappers is pure: no gateway, no I/O frameworks, no logger",
        "gateway layers",
        "mappers: no import cycles",
    ):
        assert verdict(out, name) == "BROKEN", out
    assert "mappers.bad -> gateway.app" in out
    assert "mappers.bad -> logging" in out
    assert "gateway.db is not allowed to import gateway.ingest" in out
    assert "gateway.patients is not allowed to import gateway.http" in out


def test_the_contracts_catch_a_benchmark_or_the_testkit_importing_the_tests(tmp_path: Path) -> None:
    root = _project(
        tmp_path,
        {
            "tests/samples.py": "VALUE = 1\n",
            "gateway/app.py": "",
            "bench/run.py": "from tests import samples\n",
            "testkit/ehr.py": "from gateway import app\n",
        },
    )
    no_tests = lint_imports(root, "--contract", "no-tests-outside-tests")
    independent = lint_imports(root, "--contract", "testkit-independent")
    assert no_tests.returncode != 0, no_tests.stdout
    assert "bench.run -> tests.samples" in no_tests.stdout
    assert independent.returncode != 0, independent.stdout
    assert "testkit.ehr -> gateway.app" in independent.stdout


def test_the_endpoint_contract_catches_an_endpoint_importing_another(tmp_path: Path) -> None:
    root = _project(
        tmp_path,
        {
            "mappers/__init__.py": "",
            "gateway/events/endpoints.py": "from gateway.ingest import endpoints\n",
            "gateway/ingest/endpoints.py": "",
        },
    )
    result = lint_imports(root, "--contract", "endpoints-independent")
    assert result.returncode != 0, result.stdout
    assert "gateway.events.endpoints is not allowed to import gateway.ingest.endpoints" in (
        result.stdout
    )


# --------------------------------------------------------------------------- private names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(
    root: Path, package: str, roots: frozenset[str] | set[str] = frozenset({"gateway", "mappers"})
) -> Iterator[str]:
    """Each place a module of ``package`` uses a ``_private`` name of another module:
    ``from m import _x``, ``import m._x``, or ``m._x`` on an imported module. A private
    module may be used inside its own package."""
    modules = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def allowed(importer: str, owner: str, name: str) -> bool:
        if f"{owner}.{name}" in modules:  # a private module: its package may use it
            return importer == owner or importer.startswith(f"{owner}.")
        return importer == owner

    for module, path in sorted(modules.items()):
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] not in roots:
                    continue
                for alias in node.names:
                    if _private(alias.name) and not allowed(module, node.module, alias.name):
                        yield f"{path.relative_to(root)}:{node.lineno}: {alias.name} of {node.module}"
                    if f"{node.module}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] not in roots:
                        continue
                    *owner, last = alias.name.split(".")
                    if _private(last) and not allowed(module, ".".join(owner), last):
                        yield f"{path.relative_to(root)}:{node.lineno}: {alias.name}"
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
                and not allowed(module, aliases[node.value.id], node.attr)
            ):
                yield f"{path.relative_to(root)}:{node.lineno}: {node.attr} of {aliases[node.value.id]}"


def test_no_gateway_module_uses_another_modules_private_names() -> None:
    assert list(private_imports(REPO, "gateway")) == []


def test_no_mappers_module_uses_another_modules_private_names() -> None:
    assert list(private_imports(REPO, "mappers")) == []


def test_the_private_name_check_catches_each_form(tmp_path: Path) -> None:
    """A control: each way of reaching a private name is reported; a private module used
    inside its own package is not."""
    files = {
        "pkg/__init__.py": "",
        "pkg/owner.py": "_hidden = 1\n",
        "pkg/_inner.py": "X = 1\n",
        "pkg/friend.py": "import pkg.sub._deep\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/_deep.py": "Y = 1\n",
        "pkg/sub/user.py": (
            "from pkg.owner import _hidden\nfrom pkg import _inner, owner\nVALUE = owner._hidden\n"
        ),
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = sorted(private_imports(tmp_path, "pkg", roots={"pkg"}))
    assert found == [
        "pkg/friend.py:1: pkg.sub._deep",
        "pkg/sub/user.py:1: _hidden of pkg.owner",
        "pkg/sub/user.py:3: _hidden of pkg.owner",
    ]
