"""Where a result came from: package version and git commit of the running code."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__all__ = ["package_version", "git_commit", "git_dirty"]

_PKG_DIR = Path(__file__).resolve().parents[1]


def package_version() -> str:
    """The installed distribution's version; ``granq_search.__version__`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("granq_search")
    except PackageNotFoundError:
        import granq_search

        return granq_search.__version__


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_PKG_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the checkout the package is imported from, or 'unknown' (an installed wheel)."""
    sha = _git("rev-parse", "HEAD")
    return sha if sha and len(sha) >= 7 else "unknown"


@functools.lru_cache(maxsize=1)
def git_dirty() -> str:
    """'true' when tracked files differ from HEAD, 'false', or 'unknown'."""
    if git_commit() == "unknown":
        return "unknown"
    out = _git("status", "--porcelain", "--untracked-files=no")
    return "unknown" if out is None else ("true" if out else "false")
