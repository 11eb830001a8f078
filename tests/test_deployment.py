"""The shipped deployment files (compose.yaml, deploy/kubernetes/) are valid and name the real
commands, settings, ports and probe paths.

There is no container runtime or cluster on the project machines, so the files are checked
offline: compose.yaml against the Compose Specification's JSON Schema (vendored by
check-jsonschema), the Kubernetes manifests against the Kubernetes OpenAPI schemas in strict
mode (kubernetes-validate), and every command line against the CLI's own parser.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml

from gateway.app import create_app
from gateway.cli import app as cli_app
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
K8S_DIR = ROOT / "deploy" / "kubernetes"
K8S_FILES = sorted(K8S_DIR.glob("*.yaml")) + sorted((K8S_DIR / "examples").glob("*.yaml"))
# The oldest Kubernetes minor still in the providers' standard support (late 2026).
K8S_VERSION = "1.32.0"
SETTING_NAMES = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}


def _k8s_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}", doc


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, doc in _k8s_documents():
        if doc["kind"] in {"Deployment", "Job"}:
            yield name, doc["spec"]["template"]["spec"]


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, pod in _pod_specs():
        for container in pod["containers"]:
            yield f"{name}/{container['name']}", container


def _parse_cli(argv: list[str]) -> Any:
    """Parse ``fhir-gateway ...`` with the CLI's own (typer/click) commands: sub-commands,
    options, types and ranges are checked and nothing runs. Raises the parser's usage error
    (exit code 2) on an unknown command or option or a value out of range."""
    assert argv[0] == "fhir-gateway", argv
    command: Any = typer.main.get_command(cli_app)
    ctx: Any = command.context_class(command, info_name="fhir-gateway")
    args = list(argv[1:])
    while hasattr(command, "get_command"):  # a group: the next word names a sub-command
        name, args = args[0], args[1:]
        command = command.get_command(ctx, name)
        assert command is not None, f"no command {name!r} in {argv}"
        if not hasattr(command, "get_command"):
            break
        ctx = command.context_class(command, info_name=name, parent=ctx)
    return command.make_context(name, args, parent=ctx)


def _commands() -> Iterator[tuple[str, list[str]]]:
    for name, container in _containers():
        yield name, container["command"] + container.get("args", [])
    for service, spec in _compose()["services"].items():
        if "command" in spec:
            yield f"compose.yaml:{service}", spec["command"]


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = [e.message for e in validator_cls(schema).iter_errors(_compose())]
    assert errors == []


def test_compose_runs_api_worker_mllp_postgres_and_one_shot_migrations() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker", "mllp"}
    assert services["migrate"]["command"] == ["fhir-gateway", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "mllp"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"}
        }
    assert "--no-migrate" in services["api"]["command"]
    assert "--no-worker" in services["api"]["command"]


@pytest.mark.parametrize(
    "name,doc", list(_k8s_documents()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_kubernetes_manifest_is_valid_in_strict_mode(name: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the failure message
        pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")


def test_kubernetes_ships_the_pieces_of_a_multi_host_deployment() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in _k8s_documents()}
    for component in ("api", "worker", "mllp"):
        assert ("Deployment", f"fhir-gateway-{component}") in kinds
        assert ("PodDisruptionBudget", f"fhir-gateway-{component}") in kinds
    assert ("Job", "fhir-gateway-migrate") in kinds
    assert {("Service", "fhir-gateway-api"), ("Service", "fhir-gateway-mllp")} <= kinds
    assert {
        ("HorizontalPodAutoscaler", "fhir-gateway-api"),
        ("HorizontalPodAutoscaler", "fhir-gateway-worker"),
    } <= kinds
    hpa_targets = {
        doc["spec"]["scaleTargetRef"]["name"]
        for _, doc in _k8s_documents()
        if doc["kind"] == "HorizontalPodAutoscaler"
    }
    assert all(
        metric["resource"]["name"] == "cpu"
        for _, doc in _k8s_documents()
        if doc["kind"] == "HorizontalPodAutoscaler"
        for metric in doc["spec"]["metrics"]
    )
    assert hpa_targets <= {name for kind, name in kinds if kind == "Deployment"}


@pytest.mark.parametrize(
    "name,argv", list(_commands()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_command_line_parses_with_the_cli(name: str, argv: list[str]) -> None:
    _parse_cli(argv)  # raises on a command or an option the CLI does not have


def test_the_cli_parse_check_catches_a_wrong_option() -> None:
    for argv in (
        ["fhir-gateway", "serve", "--no-such-option"],
        ["fhir-gateway", "worker", "--concurrency", "0"],
        ["fhir-gateway", "db", "downgrade"],
    ):
        with pytest.raises(Exception) as info:
            _parse_cli(argv)
        assert getattr(info.value, "exit_code", None) == 2 or isinstance(
            info.value, AssertionError
        ), argv


def _env_names() -> Iterator[tuple[str, str]]:
    for name, container in _containers():
        for env in container.get("env", []):
            yield name, env["name"]
    for name, doc in _k8s_documents():
        if doc["kind"] in {"ConfigMap", "Secret"}:
            for key in {**doc.get("data", {}), **doc.get("stringData", {})}:
                yield name, key
    for service, spec in _compose()["services"].items():
        for key in spec.get("environment", {}) if service != "postgres" else {}:
            yield f"compose.yaml:{service}", key
    for line in (ROOT / "deploy" / "gateway.env.example").read_text().splitlines():
        line = line.lstrip("# ").strip()
        if line.startswith("GATEWAY_") and "=" in line:
            yield "deploy/gateway.env.example", line.split("=", 1)[0]


def test_every_setting_named_is_a_real_setting() -> None:
    unknown = [(where, key) for where, key in _env_names() if key not in SETTING_NAMES]
    assert unknown == []


def test_probe_paths_and_ports_are_the_ones_the_processes_serve() -> None:
    routes = {getattr(route, "path", None) for route in create_app(Settings()).routes}
    for name, container in _containers():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = container.get(probe_name)
            if probe is None:
                continue
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in routes, (name, probe_name)
                assert ports[probe["httpGet"]["port"]] == int(env["GATEWAY_PORT"]), name
            if "tcpSocket" in probe:
                assert ports[probe["tcpSocket"]["port"]] == int(env["GATEWAY_MLLP_PORT"]), name
    api = dict(_containers())["deploy/kubernetes/api.yaml:Deployment/fhir-gateway-api/api"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_secrets_come_from_secret_objects_never_literal_values() -> None:
    secret_settings = {
        name
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation) or name == "database_url"
    }
    secret_env = {f"GATEWAY_{name.upper()}" for name in secret_settings}
    assert "GATEWAY_STRIPE_WEBHOOK_SECRET" in secret_env
    for name, container in _containers():
        for env in container.get("env", []):
            if env["name"] in secret_env:
                assert "secretKeyRef" in env.get("valueFrom", {}), (name, env["name"])
        refs = [src for src in container.get("envFrom", []) if "secretRef" in src]
        assert refs or any("secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])
    for name, doc in _k8s_documents():
        if doc["kind"] == "ConfigMap":
            assert not set(doc["data"]) & secret_env, name


def test_worker_grace_period_covers_the_slowest_ehr_request() -> None:
    """SIGTERM drains the deliveries in hand; each is bounded by its target's timeout_s."""
    timeouts = [
        yaml.safe_load(path.read_text()).get("timeout_s", 30)
        for path in (ROOT / "profiles" / "ehr").glob("*.yaml")
    ]
    pods = dict(_pod_specs())
    worker = pods["deploy/kubernetes/worker.yaml:Deployment/fhir-gateway-worker"]
    assert worker["terminationGracePeriodSeconds"] >= 2 * max(timeouts)
    compose_grace = _compose()["services"]["worker"]["stop_grace_period"]
    assert int(compose_grace.rstrip("s")) >= 2 * max(timeouts)


def test_pods_run_as_the_image_user_with_a_read_only_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--uid 10001" in dockerfile
    for name, pod in _pod_specs():
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001}, name
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], name


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A ``.dockerignore`` pattern as Docker reads it (moby/patternmatcher: ``*`` and ``?``
    stop at ``/``, ``**`` crosses directories, ``**/`` may match nothing)."""
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(f"^{out}$")


def _in_docker_context(path: str) -> bool:
    """Whether ``path`` (relative to the repository) is sent to the builder: the last
    matching pattern decides, and a pattern matching a parent directory matches the path."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = line.lstrip("!").strip("/")
        rules.append((negated, _dockerignore_regex(cleaned), cleaned.count("/") + 1))
    excluded = False
    parts = path.split("/")
    for negated, regex, depth in rules:
        if regex.match(path) or (depth < len(parts) and regex.match("/".join(parts[:depth]))):
            excluded = not negated
    return not excluded


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".venv/lib/python3.11/site-packages/fastapi/__init__.py",
        ".env",
        "profiles/.env",
        "gateway.db",
        "gateway.db-wal",
        "data/gateway.db",
        "deploy/gateway.env",
        ".git/HEAD",
        "tests/conftest.py",
        "testkit/fhir_server/node_modules/express/index.js",
        "gateway/__pycache__/app.cpython-311.pyc",
        "bench/results/ingest.json",
    ],
)
def test_docker_build_context_leaves_out_local_state_and_secrets(path: str) -> None:
    assert not _in_docker_context(path)


def test_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    copied = [src for group in sources for src in group]
    assert copied, "the Dockerfile copies nothing?"
    tracked = subprocess.run(
        ["git", "ls-files", *copied], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked
    assert [p for p in tracked if not _in_docker_context(p)] == []
