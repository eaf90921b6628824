"""Shared fixtures: private caches for every test, the tiny BERT/LLaMA configs, ingested tiny data."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.shared import BERT, LLAMA, TINY_CONFIG, WDC


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """Registry downloads and transformers' remote-code modules go under the session's tmp folder."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("xdg-cache")
    mp.setenv("XDG_CACHE_HOME", str(cache))
    mp.setenv("HF_MODULES_CACHE", str(cache / "hf-modules"))
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield
    mp.undo()


@pytest.fixture
def tiny_bert() -> dict:
    """A 2-layer, hidden-32 random BERT as ``model.random_config`` (a fresh copy for each test)."""
    return copy.deepcopy(BERT)


@pytest.fixture
def tiny_llama() -> dict:
    """A 2-layer, hidden-32 random LLaMA (GQA 4/2) as ``model.random_config``."""
    return copy.deepcopy(LLAMA)


@pytest.fixture(scope="session")
def wdc_dir() -> Path:
    if not WDC.is_dir():
        pytest.fail(f"the WDC products data is expected at {WDC}")
    return WDC


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """configs/tiny.yaml's synthetic multi-market data, ingested for real: train/valid/test Parquet + task map."""
    from kernel.config import load_config
    from pipeline.ingest import run_ingest
    from pipeline.synthetic import generate

    work = tmp_path_factory.mktemp("tiny-data")
    cfg = load_config(TINY_CONFIG, [f"work_dir={work}"])
    raw = generate(work / "raw.parquet", cfg.data.synthetic)
    run_ingest(cfg, raw, work / "data")
    return work / "data"
