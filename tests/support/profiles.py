"""Helpers for tests that change profiles: a copy of the bundled set, edited as YAML."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from gateway.settings import BUNDLED_PROFILES_DIR


def copy_profiles(dest: Path) -> Path:
    """A copy of the bundled profiles at ``dest`` (golden examples included)."""
    shutil.copytree(BUNDLED_PROFILES_DIR, dest)
    return dest


def edit_yaml(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Load a profile file, let ``change`` edit the dict, write it back as YAML."""
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


GLP1_V1 = "intake/glp1-weight-management-v1.yaml"
GLP1_V2 = "intake/glp1-weight-management-v2.yaml"
DERM = "intake/dermatology-v1.yaml"
PLANS = "checkout/glp1-plans.yaml"
PROCESSORS = "checkout/processors.yaml"
ACME = "ehr/acme-clinic-ehr.yaml"


def item(data: dict[str, Any], key: str) -> dict[str, Any]:
    """The item with answer ``key`` in a loaded intake profile dict (groups searched)."""

    def walk(items: list[dict[str, Any]]) -> dict[str, Any] | None:
        for it in items:
            if it["key"] == key:
                return it
            found = walk(it.get("items", []))
            if found is not None:
                return found
        return None

    found = walk(data["items"])
    if found is None:
        raise KeyError(key)
    return found
