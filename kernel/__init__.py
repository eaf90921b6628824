"""The ground floor every stage stands on: config, errors, exit codes, atomic I/O, hashing, tracking, task map.

Imports no stage package (checked by import-linter, see pyproject.toml).

The product's top-level packages have generic names (``kernel``, ``job``, ``pipeline``, ...), so it installs
into an environment of its own. Importing any of them imports this one first, which checks that each of
those names resolves to this project (the ``ADS_RELEVANCE`` marker in its ``__init__.py``): another installed
package that shadows one is an ImportError naming it and where it lives, not a puzzling failure later.
"""
from __future__ import annotations

import importlib.util
import re

ADS_RELEVANCE = True  # the marker: every top-level package of this project defines it in its __init__.py
PACKAGES = ("kernel", "job", "pipeline", "training", "serving", "monitoring", "features", "modeling", "evaluation")
_MARKER = re.compile(r"^ADS_RELEVANCE = True\b", re.MULTILINE)


def check_packages(names: tuple[str, ...] = PACKAGES) -> None:
    """Raise ImportError when one of ``names`` resolves to a package that is not this project's. A name that
    does not resolve at all is left alone (an MLflow model carries only the packages it needs)."""
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith("__init__.py"):
            continue  # absent, or a namespace portion (which a regular package of ours would win over)
        try:
            with open(spec.origin, encoding="utf-8") as f:
                ours = bool(_MARKER.search(f.read()))
        except OSError:
            ours = False
        if not ours:
            raise ImportError(
                f"the top-level package {name!r} resolves to {spec.origin}, which is not ads-relevance's: another "
                f"installed package (or a folder on sys.path) shadows it. Install ads-relevance into a virtual "
                f"environment of its own (README.md, 'Install').")


check_packages()
