"""Where the running code comes from: the git commit, for MLflow's source tags and run provenance."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """The source commit (plus "-dirty" when the tree has changes), or "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
