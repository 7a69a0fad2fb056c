"""Which code a run ran: the git commit of the ffablate source tree, for the records of runs and ``--version``."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path


@cache
def source_revision() -> str:
    """The git commit of the ffablate source this process runs, with "+dirty" when tracked files differ from it;
    "" for an installed copy (no checkout) or when git cannot say. The version number alone does not pin the
    numerics: it stays the same across commits that change them."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return ""
    try:
        head = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise OSError(done.stderr)
    return done.stdout.strip()
