"""The local FHIR R4 server (``server.mjs``: Medplum's fhir-router under Node), as a child process.

One process serves any number of tenants, each an isolated FHIR server at
``{base_url}/{tenant}/fhir`` (its own in-memory repository)::

    with FhirServer() as server:              # starts Node, waits until it listens
        tenant = server.new_tenant()          # a fresh, empty FHIR server
        httpx.get(f"{server.base_url}/{tenant}/fhir/metadata")
        server.drop_tenant(tenant)

The npm packages are installed by ``make fhir-server`` (``npm ci`` in this directory, exact
versions from ``package-lock.json``); :func:`unavailable_reason` says what is missing.
Standalone, without Python: ``node testkit/fhir_server/server.mjs --port 8901``.

The process writes nothing while it runs; its stderr goes to a log file, whose tail is
shown when it fails to start. It exits when the Python process that started it dies (its
stdin closes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit

import httpx

__all__ = [
    "SERVER_DIR",
    "FhirServer",
    "FhirServerUnavailableError",
    "install_command",
    "unavailable_reason",
]

SERVER_DIR: Final = Path(__file__).resolve().parent
_SCRIPT: Final = SERVER_DIR / "server.mjs"
#: Written by ``npm ci`` last; its absence means the packages are not (fully) installed.
_INSTALLED_MARKER: Final = SERVER_DIR / "node_modules" / ".package-lock.json"
#: @medplum/* 4.5 require Node ^20.19 or >=22.12.
_MIN_NODE: Final = (20, 19)
_START_TIMEOUT_S: Final = 60.0


class FhirServerUnavailableError(RuntimeError):
    """Node or the FHIR server's npm packages are missing, or the server did not start."""


def install_command() -> str:
    """The command that installs the server's npm packages (what ``make fhir-server`` runs)."""
    return f"npm ci --prefix {SERVER_DIR} --ignore-scripts --no-audit --no-fund"


def _node() -> str | None:
    return os.environ.get("FHIR_SERVER_NODE") or shutil.which("node")


def unavailable_reason() -> str | None:
    """Why the server cannot start here (no Node, an old one, packages not installed), or None."""
    node = _node()
    if node is None:
        return "Node.js (>= 20.19) is not installed: the local FHIR server needs it"
    try:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{node} --version failed ({type(exc).__name__})"
    match = re.match(r"v(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < _MIN_NODE:
        return f"Node.js {version} is too old for the local FHIR server (>= 20.19 needed)"
    if not _INSTALLED_MARKER.exists():
        return (
            "the local FHIR server's npm packages are not installed: run `make fhir-server` "
            f"(or `{install_command()}`)"
        )
    return None


class FhirServer:
    """``server.mjs`` in a child process on 127.0.0.1.

    Args:
        host: interface to listen on.
        port: TCP port; 0 picks a free one (read back from the process).
        log_path: where the process's stderr goes (default: a temporary file).

    Raises:
        FhirServerUnavailableError: from :meth:`start` when Node or the packages are
            missing, or the process exits or stays silent for 60 s.
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None
        self._external = False

    @classmethod
    def connect(cls, url: str) -> FhirServer:
        """A server started elsewhere (``node server.mjs --port N``): used, never stopped."""
        parts = urlsplit(url)
        server = cls(host=parts.hostname or "127.0.0.1", port=parts.port or 80)
        server._external = True
        return server

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (once started)."""
        if self._process is None and not self._external:
            raise RuntimeError("the FHIR server is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def http(self) -> httpx.Client:
        """A client for the server's own URLs (tenant set-up, test observations)."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.base_url, timeout=30.0)
        return self._http

    def start(self) -> None:
        """Start the process and wait until it listens (definitions load in about 2 s)."""
        if self._external:
            return
        reason = unavailable_reason()
        if reason is not None:
            raise FhirServerUnavailableError(reason)
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="fhir-server-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        node = _node()
        assert node is not None  # checked by unavailable_reason()
        with self.log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    node,
                    str(_SCRIPT),
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--exit-on-stdin-close",
                ],
                cwd=SERVER_DIR,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert process.stdout is not None
        first_line: list[bytes] = []
        reader = threading.Thread(
            target=lambda: first_line.append(process.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(_START_TIMEOUT_S)
        try:
            started = json.loads(first_line[0]) if first_line and first_line[0] else None
        except ValueError:
            started = None
        if not isinstance(started, dict) or "port" not in started:
            process.kill()
            process.wait()
            raise FhirServerUnavailableError(
                f"the local FHIR server did not start (exit {process.returncode}); "
                f"log {self.log_path}:\n{self._log_tail()}"
            )
        self._process = process
        self.port = int(started["port"])
        self.pid = process.pid

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])  # type: ignore[union-attr]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s)."""
        if self._http is not None:
            self._http.close()
            self._http = None
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()

    @property
    def running(self) -> bool:
        """True while the process is alive (always for a server started elsewhere)."""
        return self._external or (self._process is not None and self._process.poll() is None)

    # ------------------------------------------------------------------ tenants

    def new_tenant(self, *, validate: bool = True) -> str:
        """A fresh tenant (an empty FHIR server at ``{base_url}/{name}/fhir``); returns its name.

        Args:
            validate: validate incoming resources against the R4 StructureDefinitions
                (False for benchmarks that measure the gateway, not the EHR).
        """
        name = f"t{uuid.uuid4().hex[:16]}"
        response = self.http.put(f"/{name}", json={"validate": validate})
        response.raise_for_status()
        return name

    def drop_tenant(self, name: str) -> None:
        """Forget a tenant and everything it stores."""
        if self.running:
            self.http.delete(f"/{name}")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
