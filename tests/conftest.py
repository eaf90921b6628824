"""Shared fixtures: private caches for every test, the tiny BERT/LLaMA configs, ingested tiny data."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from tests.shared import BERT, LLAMA, TINY_CONFIG, WDC


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """Registry downloads and transformers' remote-code modules go under the session's tmp folder. DeepSpeed's
    compiled CPU ops stay in the machine's torch extensions folder: content-keyed and locked while built, they
    are built once per machine, not once per session (about a minute each time)."""
    mp = pytest.MonkeyPatch()
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    mp.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR") or str(home_cache / "torch_extensions"))
    cache = tmp_path_factory.mktemp("xdg-cache")
    mp.setenv("XDG_CACHE_HOME", str(cache))
    mp.setenv("HF_MODULES_CACHE", str(cache / "hf-modules"))
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _sqlite_stores_from_one_migration(tmp_path_factory):
    """Every test that tracks gets a fresh sqlite MLflow store, and MLflow builds each one by running its whole
    chain of schema migrations (about 1.8 s a store, some 2 minutes of the suite). In this process a new
    store is instead filled with a copy of one store that this MLflow migrated at the start of the session:
    the same tables and alembic revision, copied page by page with sqlite's backup API. Stores created by
    the job processes that tests start are migrated by MLflow as usual."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store
    import sqlalchemy

    migrate = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    migrate(engine)
    engine.dispose()

    def copy_of_the_migrated_store(engine):
        if engine.url.get_backend_name() != "sqlite":
            return migrate(engine)
        target = engine.raw_connection()
        try:
            with sqlite3.connect(template) as source:
                source.backup(target.driver_connection)
        finally:
            target.close()

    mp = pytest.MonkeyPatch()
    mp.setattr(db_utils, "_initialize_tables", copy_of_the_migrated_store)
    mp.setattr(registry_store, "_initialize_tables", copy_of_the_migrated_store)
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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server on 127.0.0.1 (moto's standalone server) for the whole session; clients find
    it through the standard environment (AWS_ENDPOINT_URL, credentials, region; MLflow's S3 endpoint)."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    yield endpoint
    mp.undo()
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket for one test; its name as s3://<bucket>."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-b"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(autouse=True, scope="module")
def _ray_files_one_at_a_time(request, tmp_path_factory):
    """The test files marked ``starts_ray`` run one at a time, on whichever pytest-xdist worker has them: each
    starts and stops local Ray clusters, and a driver must not meet another file's cluster. Autouse here, so
    the lock is held before the file's own module fixtures start Ray."""
    if request.node.get_closest_marker("starts_ray") is None:
        yield
        return
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "ray-tests.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
