"""Object storage through a real S3-protocol server on 127.0.0.1 (moto), started by the tests: ingestion reads
from and writes to s3://, MLflow keeps its artifacts there, and published folders are trusted only once their
commit marker is there."""
from __future__ import annotations

import json
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from kernel import storage
from kernel.config import load_config
from kernel.errors import DataError
from kernel.task_map import TASK_MAP_FILE
from pipeline.ingest import main as ingest_main
from pipeline.ingest import run_ingest
from tests.serving_testkit import WDC_COLUMNS, wdc_raw
from tests.shared import TINY_CONFIG


def put_table(uri: str, table) -> None:
    fs, path = storage.resolve(uri)
    pq.write_table(table, path, filesystem=fs)


def wdc_overrides() -> list[str]:
    cols = [f"data.columns.{k}={'null' if v is None else v}" for k, v in WDC_COLUMNS.items()]
    return [*cols, "data.scenarios=[cameras, computers, shoes]", "data.max_reject_rate=0.2"]


def test_ingest_reads_a_hive_dataset_on_s3_and_publishes_there(tmp_path, s3_bucket):
    for i, cat in enumerate(["cameras", "computers", "shoes"]):
        put_table(f"{s3_bucket}/traffic/day=2026-12-0{i + 1}/part-0.parquet", wdc_raw(per_category=40, categories=[cat]))
    cfg = load_config(TINY_CONFIG, [f"work_dir={tmp_path}", "tracking.enabled=false", *wdc_overrides()])
    report = run_ingest(cfg, f"{s3_bucket}/traffic", f"{s3_bucket}/data")
    assert report.rows_in == 120 and report.rows_accepted + report.rows_quarantined == 120
    names = {rel for rel, _ in storage.files(f"{s3_bucket}/data")}
    assert {"train.parquet", "valid.parquet", "test.parquet", "quarantine.parquet", TASK_MAP_FILE,
            "stats.json"} <= names
    stats = storage.read_json(f"{s3_bucket}/data/stats.json", "stats")
    assert stats["rows_in"] == 120
    train = pq.read_table(f"{s3_bucket}/data/train.parquet")
    assert train.num_rows == stats["splits"]["train"]
    assert all(f.startswith(f"{s3_bucket}/traffic/day=") for f in train["source_file"].to_pylist())  # the URI, named
    # The command line takes the URIs as they are.
    assert ingest_main(["--config", str(TINY_CONFIG), f"work_dir={tmp_path}", "tracking.enabled=false",
                        *wdc_overrides(), "--input", f"{s3_bucket}/traffic", "--out", f"{s3_bucket}/data2"]) == 0
    assert storage.is_file(f"{s3_bucket}/data2/stats.json")


def test_a_missing_s3_input_is_named(tmp_path, s3_bucket, capsys):
    assert ingest_main(["--config", str(TINY_CONFIG), f"work_dir={tmp_path}", "tracking.enabled=false",
                        "--input", f"{s3_bucket}/nothing-here", "--out", str(tmp_path / "out")]) == 2
    assert f"{s3_bucket}/nothing-here" in capsys.readouterr().err


def test_a_folder_is_trusted_only_once_its_commit_marker_is_there(tmp_path, s3_bucket):
    local = tmp_path / "export"
    (local / "base").mkdir(parents=True)
    (local / "manifest.json").write_text(json.dumps({"a": 1}))
    (local / "base" / "weights.bin").write_bytes(b"x" * 1000)
    dest = f"{s3_bucket}/models/export"
    storage.upload_dir(local, dest)
    assert storage.committed(dest) is not None
    back = storage.download_dir(dest, tmp_path / "back")
    assert (back / "base" / "weights.bin").read_bytes() == b"x" * 1000
    # A file changed or lost after the commit (a half-overwritten publication): not trusted any more.
    bucket, key = dest[len("s3://"):].split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{key}/base/weights.bin", Body=b"partial")
    assert storage.committed(dest) is None
    with pytest.raises(DataError, match="not a completely published folder"):
        storage.download_dir(dest, tmp_path / "again")


def test_mlflow_keeps_the_registered_model_on_s3_and_scoring_reads_it_back(tmp_path, s3_bucket):
    """tracking.artifact_uri=s3://...: the pyfunc and its export live in the bucket, the registry (sqlite)
    points there, and models:/ resolves by downloading from S3; the scores equal the local export's."""
    import numpy as np

    from serving.registry.cache import resolve_model
    from serving.scoring.table import score_table
    from tests.serving_testkit import canonical, export, trained_folder

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    export(trained_folder(tmp_path, "cls"), tmp_path / "export", tracking_uri=uri, name="relevance",
                 overrides=[f"tracking.artifact_uri={s3_bucket}/mlflow"])
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith("MLmodel") for k in keys) and any(k.endswith("factors.safetensors") for k in keys)
    assert not (tmp_path / "mlartifacts").exists()  # nothing was kept beside the database
    local, version = resolve_model("models:/relevance/1", uri, tmp_path / "cache")
    assert version == "relevance/1"
    table = canonical(wdc_raw(per_category=4))
    np.testing.assert_allclose(score_table(local, table)["score"].to_numpy(),
                               score_table(tmp_path / "export", table)["score"].to_numpy(), atol=1e-6)


def test_an_export_published_on_s3_scores_like_the_local_one(tmp_path, s3_bucket, monkeypatch):
    import numpy as np

    from serving.export.cli import main as export_main
    from serving.registry.cache import resolve_model
    from serving.scoring.table import score_table
    from tests.serving_testkit import canonical, export, trained_folder

    model = trained_folder(tmp_path, "mean")
    export(model, tmp_path / "local-export")
    monkeypatch.chdir(tmp_path)
    # Through the command line: --out keeps its s3:// (a Path would make it the local folder "s3:/...").
    assert export_main(["--run", str(model), "--out", f"{s3_bucket}/exports/relevance"]) == 0
    assert not (Path.cwd() / "s3:").exists()
    manifest = storage.read_json(f"{s3_bucket}/exports/relevance/manifest.json", "manifest")
    assert storage.committed(f"{s3_bucket}/exports/relevance") is not None
    local, version = resolve_model(f"{s3_bucket}/exports/relevance", cache_dir=tmp_path / "cache")
    assert version == manifest["model_version"]
    again, _ = resolve_model(f"{s3_bucket}/exports/relevance", cache_dir=tmp_path / "cache")
    assert again == local  # downloaded once, checked before every use
    table = canonical(wdc_raw(per_category=4))
    np.testing.assert_allclose(score_table(local, table)["score"].to_numpy(),
                               score_table(tmp_path / "local-export", table)["score"].to_numpy(), atol=1e-6)


def test_scoring_s3_to_s3_killed_and_resumed_scores_each_row_exactly_once(tmp_path, s3_bucket):
    """Input and output on S3; SIGKILL after some units are done; --resume keeps those and scores each row
    exactly once, equal to an uninterrupted local run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    import pyarrow.dataset as ds

    from serving.scoring.cli import main as score_main
    from tests.serving_testkit import SCENARIOS, export, trained_folder
    from tests.shared import REPO

    export(trained_folder(tmp_path, "cls"), tmp_path / "export")
    for i in range(2):
        fs, path = storage.resolve(f"{s3_bucket}/traffic/market=m{i}/part-0.parquet")
        pq.write_table(wdc_raw(per_category=20, categories=SCENARIOS, offset=20 * i), path, filesystem=fs,
                       row_group_size=6)
    args = ["--model", str(tmp_path / "export"), "--input", f"{s3_bucket}/traffic", "--quiet",
            "serving.chunk_rows=8", "serving.batch_size=4", "serving.unit_rows=6"]
    out = f"{s3_bucket}/scores"
    proc = subprocess.Popen([sys.executable, "-m", "serving.score", *args, "--output", out], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(storage.entries(f"{out}/_done")) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, f"ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = set(storage.entries(f"{out}/_done"))
    assert 2 <= len(before) < 20
    assert score_main(args + ["--output", out, "--resume"]) == 0
    markers = {n: storage.read_json(f"{out}/_done/{n}", "marker") for n in storage.entries(f"{out}/_done")}
    assert len(markers) == 20 and {markers[n]["pid"] for n in before} == {proc.pid}  # kept, not redone
    fs, path = storage.resolve(out)
    resumed = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    keys = list(zip(resumed["source_file"].to_pylist(), resumed["source_row"].to_pylist()))
    assert len(keys) == len(set(keys)) == 120
    assert set(resumed["market"].to_pylist()) == {"m0", "m1"}  # the partition layout, on S3 too
    assert score_main(args + ["--output", str(tmp_path / "clean")]) == 0
    clean = ds.dataset(tmp_path / "clean", format="parquet").to_table()
    a = resumed.sort_by([("source_file", "ascending"), ("source_row", "ascending")])
    b = clean.sort_by([("source_file", "ascending"), ("source_row", "ascending")])
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), atol=1e-6, rtol=0)


def test_the_whole_job_with_its_work_dir_on_s3_then_a_replay(tmp_path, s3_bucket, capsys):
    from job.run import main as job_main

    job = ["--config", str(TINY_CONFIG), f"work_dir={s3_bucket}/job", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    assert job_main(job) == 0
    names = {rel for rel, _ in storage.files(f"{s3_bucket}/job")}
    for expected in ("state/train.json", "state/promote.json", "data/stats.json", "export/_COMMITTED",
                     "export/manifest.json", "monitor/_COMMITTED", "monitor/report.html"):
        assert expected in names, expected
    assert any(n.startswith("scores/_done/") for n in names) and any(n.startswith("scores/part-") for n in names)
    capsys.readouterr()
    assert job_main(job) == 0  # the state lives on S3 too: a replay redoes nothing
    assert capsys.readouterr().err.count("up to date") == 7
