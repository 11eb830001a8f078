"""Fixtures for the pure mapper tests: the bundled profiles and identifier systems.

Nothing here touches a database, the web framework or the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from mappers.identifiers import IdentifierSystems
from mappers.profiles import IntakeProfile, Plan, ProfileSet, load_profiles

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "profiles"
EXAMPLES = REPO / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
BASE = "https://fhir-gateway.example.org/sid"


@pytest.fixture(scope="session")
def profile_set() -> ProfileSet:
    """The bundled profiles, loaded once."""
    return load_profiles(PROFILES)


@pytest.fixture(scope="session")
def glp1_profile(profile_set: ProfileSet) -> IntakeProfile:
    """The GLP-1 intake profile, version 1."""
    profile = profile_set.intake_profile("glp1-weight-management", "1")
    assert profile is not None
    return profile


@pytest.fixture(scope="session")
def systems() -> IdentifierSystems:
    """Identifier systems under the default base."""
    return IdentifierSystems(BASE)


def find_plan(profile_set: ProfileSet) -> Any:
    """``plan_id -> Plan | None`` over ``profile_set``."""

    def find(plan_id: str) -> Plan | None:
        found = profile_set.plan(plan_id)
        return found[1] if found else None

    return find


def example(name: str) -> dict[str, Any]:
    """A bundled example payload (``examples/<name>``)."""
    return json.loads((EXAMPLES / name).read_text())  # type: ignore[no-any-return]


def assert_golden(actual: Any, name: str) -> None:
    """Compare ``actual`` with ``golden/<name>``; ``UPDATE_GOLDEN=1`` rewrites the file."""
    path = GOLDEN / name
    text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert actual == json.loads(path.read_text())
