"""Fixtures for the clinical-event tests: profiles with a test EHR target (notifications),
an HL7 feed and the shipped partners, with their secrets in the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.events_env import (
    BEACON_ENV,
    BEACON_SECRET,
    NOTIFY_ENV,
    NOTIFY_SECRET,
    PHARMACY_ENV,
    PHARMACY_SECRET,
    events_profiles,
)


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NOTIFY_ENV, NOTIFY_SECRET)
    monkeypatch.setenv(PHARMACY_ENV, PHARMACY_SECRET)
    monkeypatch.setenv(BEACON_ENV, BEACON_SECRET)


@pytest.fixture
def profiles_dir(tmp_path: Path, secrets_env: None) -> Path:
    return events_profiles(tmp_path / "profiles")
