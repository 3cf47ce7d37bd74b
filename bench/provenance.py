"""Where a result came from: the commit of stepcascade's own source tree.

The commit is read from the repository the package's files are in, never the current
directory's: a benchmark run from inside another project's checkout records
stepcascade's commit, not that project's, and an installed copy (a wheel, no git
checkout) says so in words instead of a bare "unknown".
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["PACKAGE_ROOT", "package_commit"]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # holds bench/, cascade/, decoding/, ...


def package_commit(root: Path = PACKAGE_ROOT) -> str:
    """The commit (HEAD) of the git checkout whose top level is `root`; otherwise a
    sentence starting with "unknown" that says why."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != Path(root).resolve():
            return f"unknown (stepcascade at {root} is not a git checkout of its own; it lies inside {top})"
        return git("rev-parse", "HEAD")
    except FileNotFoundError:
        return f"unknown (git is not installed; stepcascade at {root})"
    except (OSError, subprocess.CalledProcessError):
        return f"unknown (stepcascade at {root} is not a git checkout)"
