"""Where the running code comes from: the package version and the git commit, for MLflow tags, manifests and
the job's summary.

    provenance()      # {"version": "0.1.0", "git_commit": "3fa0...(-dirty)" or "unknown"}

The version is the installed distribution's (``importlib.metadata``): a wheel install records it, and so does
an editable install of the checkout. The commit is known only when the code runs from a git checkout.
"""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

DISTRIBUTION = "ads-relevance"


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The source commit (plus "-dirty" when the tree has changes), or "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:  # this very file must be tracked: an installed copy inside some other checkout is not that commit
        subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here, capture_output=True,
                       check=True)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@lru_cache(maxsize=1)
def package_version() -> str:
    """The installed version of the ads-relevance distribution, or "unknown" when it is not installed (the
    checkout on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def provenance() -> dict[str, str]:
    """{"version", "git_commit"}: what a run, a manifest or a summary records about the code that made it."""
    return {"version": package_version(), "git_commit": git_commit()}
