"""The import-linter contract of pyproject.toml: ``mappers`` stays pure (no gateway,
SQLAlchemy, FastAPI, httpx, logging...), including the HL7 v2, notification and partner
mappers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_mappers_import_no_service_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert os.path.exists("pyproject.toml")
    assert lint_imports(no_cache=True, no_logo=True) == 0
