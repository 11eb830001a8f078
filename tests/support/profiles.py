"""Helpers for tests that change profiles: a copy of the bundled set, edited as YAML;
and :func:`shared_profiles`, the profile sets loaded once per test run."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from gateway.settings import BUNDLED_PROFILES_DIR
from mappers.profiles import ProfileSet, load_profiles

# content digest of a profiles directory -> (the set loaded from it, its fingerprint)
_SHARED: dict[str, tuple[ProfileSet, str]] = {}


def _content_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def fingerprint(profiles: ProfileSet) -> str:
    """A digest of everything in ``profiles`` but its root (changes if it is mutated)."""
    return hashlib.sha256(repr(dataclasses.replace(profiles, root=Path())).encode()).hexdigest()


def shared_profiles(root: Path) -> ProfileSet:
    """The profiles under ``root``, loaded once per test run for each distinct content.

    Profile sets are immutable data, so tests whose directories hold the same files share
    one load (its ``root`` is each test's own directory). A directory whose content
    differs (a test that edits a profile) gets its own load. :func:`check_unchanged`
    verifies that no test mutated a shared set.

    Raises:
        ProfileLoadError: as :func:`load_profiles` (never cached).
    """
    key = _content_digest(root)
    hit = _SHARED.get(key)
    if hit is None:
        loaded = load_profiles(root)
        hit = _SHARED[key] = (loaded, fingerprint(loaded))
    profiles = hit[0]
    return profiles if profiles.root == root else dataclasses.replace(profiles, root=root)


def check_unchanged(profiles: ProfileSet) -> None:
    """Fail if ``profiles`` is a shared set (or a copy of one) that a test mutated."""
    for shared, digest in _SHARED.values():
        if profiles.intake is shared.intake:
            assert fingerprint(profiles) == digest, (
                "a test mutated a shared ProfileSet; load your own with load_profiles()"
            )


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
