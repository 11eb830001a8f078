"""Another commit of this repository checked out beside this one, for the benchmarks'
``--baseline REF``: the two sides run in the same session, so their ratio holds on a
shared machine where absolute figures do not."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_worktree(ref: str, path: Path) -> None:
    """Check ``ref`` out at ``path`` as a detached git worktree of this repository.

    Raises:
        subprocess.CalledProcessError: git refused (an unknown ref, ``path`` exists).
    """
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), ref],
        check=True,
    )


def remove_worktree(path: Path) -> None:
    """Remove the worktree at ``path`` (its files and git's record of it)."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
    )


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """``ref`` checked out in a temporary worktree for the block, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        tree = Path(tmp) / "baseline"
        add_worktree(ref, tree)
        try:
            yield tree
        finally:
            remove_worktree(tree)
