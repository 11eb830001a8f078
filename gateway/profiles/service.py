"""The profiles domain: preview, reload, published Questionnaires, and re-mapping a
stored message with the current profiles.

* :func:`preview_payload`: what the gateway would produce for a payload, optionally with a
  draft profile that is not deployed; reads and writes nothing;
* :func:`reload_profiles`: load the profiles again; an invalid new set is refused and
  the running one stays (the ``ProfileHolder`` swaps whole sets, so a request sees one
  consistent set); also wired to SIGHUP by :func:`install_sighup_reload`;
* :func:`questionnaires`: the Questionnaires the intake profiles publish.

Re-mapping a stored message with the current profiles is :mod:`gateway.ingest.remap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any

from gateway.db.types import utcnow
from gateway.errors import UnprocessableError
from gateway.logging import get_logger
from gateway.runtime import Runtime
from mappers.errors import Problem
from mappers.pipeline import Preview, preview
from mappers.profiles import ProfileLoadError, ProfileSet, load_profiles
from mappers.questionnaire import profile_to_questionnaire

log = get_logger(__name__)


# --------------------------------------------------------------------------- preview


def set_and_key_with_draft(
    runtime: Runtime, draft: bytes | None, draft_name: str | None = None
) -> tuple[ProfileSet, str | None]:
    """The running set, or the profiles directory loaded with ``draft`` added/replacing.

    The draft's kind (``kind:``) decides its folder; it replaces the profile with the same
    key. Nothing is written. Also returns the draft's key (``intake/<id>/<version>``...;
    None without a draft).

    Raises:
        UnprocessableError: the draft (or the set with it) has problems, each listed.
    """
    if draft is None:
        return runtime.profiles.current, None
    root = runtime.profiles.current.root
    kind = _draft_kind(draft)
    rel = f"{kind}/{draft_name or '_draft'}.yaml" if kind != "workflow" else "workflow.yaml"
    try:
        profiles = load_profiles(root, drafts={rel: draft})
        return profiles, profiles.key_of_file(rel)
    except ProfileLoadError as exc:
        raise UnprocessableError(
            "the draft profile has problems", exc.problems, pointer="#/profile"
        ) from exc


def _draft_kind(draft: bytes) -> str:
    import yaml

    try:
        data = yaml.safe_load(draft)
    except yaml.YAMLError as exc:
        raise UnprocessableError(
            "the draft profile is not YAML", [Problem("profile", "yaml_syntax", "invalid YAML")]
        ) from exc
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in ("intake", "checkout", "ehr", "workflow"):
        raise UnprocessableError(
            "the draft profile has no known kind",
            [
                Problem(
                    "profile.kind", "unknown_kind", "kind must be intake, checkout, ehr or workflow"
                )
            ],
        )
    return str(kind)


def preview_payload(
    runtime: Runtime, data: Any, *, draft: bytes | None = None, kind: Any = None
) -> Preview:
    """Map ``data`` with the running profiles (or with ``draft``), validate, store nothing.

    With a draft, an input that another profile maps (an intake naming another form
    version) gets the issue ``other_profile`` and no resources: the draft is what is
    previewed, never a deployed profile in its place.
    """
    profiles, key = set_and_key_with_draft(runtime, draft)
    return preview(
        data,
        profiles,
        recorded=utcnow(),
        organization=runtime.settings.organization_name,
        systems=runtime.systems,
        kind=kind,
        profile_key=key,
    )


def preview_body(result: Preview) -> dict[str, Any]:
    """The JSON answer of a preview: the Bundle and every issue (never input values)."""
    return {
        "kind": result.kind,
        "profile": result.profile,
        "valid": not result.problems,
        "issues": [p.as_dict() for p in result.problems],
        "bundle": result.bundle(),
    }


# --------------------------------------------------------------------------- reload


@dataclass
class ReloadResult:
    """What a reload changed: profile keys added, removed and changed (by content hash)."""

    content_hash: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "status": "reloaded",
            "content_hash": self.content_hash,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
        }


#: The most problems one refused reload writes to the log (all are in the API answer).
RELOAD_PROBLEMS_LOGGED = 20


def reload_profiles(runtime: Runtime) -> ReloadResult:
    """Load the profiles directory again and swap the set in one step.

    Raises:
        UnprocessableError: the new set has problems (each with file, line and path); the
            running set stays in use.
    """
    old = runtime.profiles.current
    try:
        new = runtime.profiles.reload()
    except ProfileLoadError as exc:
        # What is wrong, so a SIGHUP (no caller to answer) is not a silent refusal: profile
        # problems name files, lines, paths and rules of the configuration, never a
        # patient's data. At most RELOAD_PROBLEMS_LOGGED of them; the count is whole.
        log.warning(
            "profiles.reload_refused",
            count=len(exc.problems),
            problems=[p.as_dict() for p in exc.problems[:RELOAD_PROBLEMS_LOGGED]],
        )
        raise UnprocessableError(
            "the profiles have problems; the running profiles stay in use",
            exc.problems,
            in_body=False,
        ) from exc
    before = {k: v.content_hash for k, v in old.sources.items()}
    after = {k: v.content_hash for k, v in new.sources.items()}
    result = ReloadResult(
        content_hash=new.content_hash,
        added=sorted(set(after) - set(before)),
        removed=sorted(set(before) - set(after)),
        changed=sorted(k for k in set(after) & set(before) if after[k] != before[k]),
    )
    log.info(
        "profiles.reloaded",
        content_hash=new.content_hash,
        added=len(result.added),
        removed=len(result.removed),
        changed=len(result.changed),
    )
    return result


def install_sighup_reload(runtime: Runtime) -> bool:
    """Reload the profiles on SIGHUP (refused sets are logged, the running set stays).

    Returns:
        False where the platform or loop has no signal handlers (nothing installed).
    """

    def on_sighup() -> None:
        # A refused set is logged by reload_profiles; the running set stays.
        with contextlib.suppress(UnprocessableError):
            reload_profiles(runtime)

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    except (NotImplementedError, RuntimeError, AttributeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- Questionnaires


def questionnaires(
    profiles: ProfileSet, *, url: str | None = None, version: str | None = None
) -> list[dict[str, Any]]:
    """The Questionnaires published by the intake profiles, filtered by canonical ``url``
    and ``version`` (a ``url|version`` canonical in ``url`` is split)."""
    if url and "|" in url and version is None:
        url, version = url.split("|", 1)
    out = []
    for profile in sorted(profiles.intake.values(), key=lambda p: (p.url, p.version)):
        if url is not None and profile.url != url:
            continue
        if version is not None and profile.version != version:
            continue
        out.append(profile_to_questionnaire(profile))
    return out


def searchset(resources: list[dict[str, Any]], base_url: str) -> dict[str, Any]:
    """A ``searchset`` Bundle (https://hl7.org/fhir/R4/bundle.html#searchset)."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {
                "fullUrl": f"{base_url}/fhir/{r['resourceType']}/{r['id']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in resources
        ],
    }
