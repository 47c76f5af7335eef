"""Which memtrain is running: the package version and, in a git checkout, the commit.

    describe() -> "memtrain 0.1.0 (commit 0123ca8)"   or   "memtrain 0.1.0" for an installed wheel
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from memtrain import __version__

_CHECKOUT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """``MEMTRAIN_COMMIT`` if set (a copied tree without ``.git``), else the short HEAD of the memtrain checkout
    this module runs from, else None (an installed wheel, or no git)."""
    if os.environ.get("MEMTRAIN_COMMIT"):
        return os.environ["MEMTRAIN_COMMIT"]
    # only memtrain's own checkout: a wheel installed into some other repository's folder reports no commit
    if not ((_CHECKOUT / ".git").exists() and (_CHECKOUT / "pyproject.toml").is_file()):
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=_CHECKOUT, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe() -> str:
    commit = git_commit()
    return f"memtrain {__version__}" + (f" (commit {commit})" if commit else "")
