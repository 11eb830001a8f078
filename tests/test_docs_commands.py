"""The README and the guides tell a newcomer how to run the command line: it lives in
``.venv/bin`` (not on ``PATH``), and a copied EHR target needs a name of its own."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from mappers.profiles import ProfileLoadError, load_profiles

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = [ROOT / "docs" / name for name in ("PROFILES.md", "DELIVERY.md", "EVENTS.md")]


def _fenced_lines_by_section(text: str) -> list[tuple[str, str]]:
    """``(section heading, line)`` of every line inside a fenced code block."""
    out: list[tuple[str, str]] = []
    section, fenced = "", False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced and line.startswith("## "):
            section = line[3:]
        elif fenced:
            out.append((section, line))
    return out


def test_readme_commands_run_from_the_venv() -> None:
    """A bare ``fhir-gateway`` is not on PATH in a fresh shell: only the synopsis (which
    says how to run it) may use the short form."""
    bare = [
        (section, line)
        for section, line in _fenced_lines_by_section(README.read_text())
        if re.match(r"\s*(export \w+=\$\()?fhir-gateway\b", line) and section != "Command line"
    ]
    assert bare == []
    assert "source .venv/bin/activate" in README.read_text()


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_each_guide_says_where_the_command_is(guide: Path) -> None:
    head = guide.read_text()[:1500]
    assert ".venv/bin/fhir-gateway" in head and "source .venv/bin/activate" in head


def test_copying_the_example_target_without_renaming_it_is_refused(tmp_path: Path) -> None:
    """README: copy example-ehr.yaml and change ``name:``; forgetting is a clear error."""
    root = tmp_path / "profiles"
    shutil.copytree(ROOT / "profiles", root)
    example = root / "ehr" / "example-ehr.yaml"
    shutil.copy(example, root / "ehr" / "my-ehr.yaml")
    with pytest.raises(ProfileLoadError) as caught:
        load_profiles(root)
    assert "ehr profile 'example-ehr' is also defined in ehr/" in str(caught.value)
    renamed = example.read_text().replace("name: example-ehr", "name: my-ehr")
    (root / "ehr" / "my-ehr.yaml").write_text(renamed)
    assert "my-ehr" in load_profiles(root).ehr
    for text in (README.read_text(), (ROOT / "docs" / "DELIVERY.md").read_text()):
        assert "change `name:`" in text or "change its `name:`" in text
