"""What produced a release: the git commit (and whether the tree had changes) and DVC's lock file."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def _git(repo: Path, *args: str, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() if strip else out.stdout


def git_info(repo: str | os.PathLike = ".") -> dict:
    """``{commit, short, branch, dirty, changed}`` of the repository at ``repo``; commit None outside git.

    ``changed`` lists modified tracked paths (at most 50): in a ``dvc repro`` run ``dvc.lock`` is
    always among them (DVC rewrites it as stages finish), so ``dirty`` alone says little. The remote
    URL is deliberately not recorded: it can carry credentials.
    """
    repo = Path(repo)
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        log.warning("%s is not a git repository (or git is missing): the release records no commit", repo.resolve())
        return {"commit": None, "short": None, "branch": None, "dirty": None, "changed": []}
    # not stripped: a porcelain line starts with a two-letter status whose first letter may be a space
    status = _git(repo, "status", "--porcelain", "--untracked-files=no", strip=False) or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    branch = _git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    return {"commit": commit, "short": commit[:8], "branch": branch if branch != "HEAD" else None,
            "dirty": bool(changed), "changed": changed[:50]}


def dvc_lock(repo: str | os.PathLike = ".") -> bytes | None:
    path = Path(repo) / "dvc.lock"
    if not path.is_file():
        log.warning("%s not found: the release records no DVC lock (run it through `dvc repro`)", path)
        return None
    return path.read_bytes()
