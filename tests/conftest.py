"""Shared test set-up: every test runs with its own caches, never the user's."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """Registry downloads and transformers' remote-code modules go under the session's tmp folder."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("xdg-cache")
    mp.setenv("XDG_CACHE_HOME", str(cache))
    mp.setenv("HF_MODULES_CACHE", str(cache / "hf-modules"))
    yield
    mp.undo()
