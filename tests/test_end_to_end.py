"""The whole scheduled job on a tiny random-init model: generate → ingest → train → export → score → monitor → promote."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from mlflow import MlflowClient

from pipeline.run import EXIT_BAD_INPUT, EXIT_OK, main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_whole_job_then_restart_skips_finished_steps(tmp_path, capsys):
    work = tmp_path / "job"
    assert main(["--config", str(TINY), f"work_dir={work}"]) == EXIT_OK
    out = capsys.readouterr().out
    for step in ("generate", "ingest", "train", "export", "score", "monitor", "promote"):
        assert (work / "state" / f"{step}.json").is_file(), step
    assert "=== summary ===" in out and "macro" in out

    # One score per held-out row, each with its scenario and the registered model version.
    test_rows = pq.read_table(work / "data" / "test.parquet").num_rows
    scores = pq.read_table(sorted((work / "scores").glob("part-*.parquet")))
    assert scores.num_rows == test_rows
    assert set(scores.column("scenario").to_pylist()) <= set(json.loads((work / "export" / "manifest.json").read_text())["task_map"])

    # The registry holds the model, and the gate made it champion (tiny config: min_auc 0).
    client = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    # Per-scenario validation AUC was logged by training.
    train_run = client.get_run(json.loads((work / "state" / "train.json").read_text())["run_id"])
    assert any(k.startswith("val/auc/") for k in train_run.data.metrics)

    # A rerun (as after a crash) redoes nothing that finished.
    assert main(["--config", str(TINY), f"work_dir={work}"]) == EXIT_OK
    assert capsys.readouterr().out.count("already done") == 7


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    assert main(["--config", str(TINY), f"work_dir={tmp_path}", "train.nope=1"]) == EXIT_BAD_INPUT
    assert "train.nope" in capsys.readouterr().err
