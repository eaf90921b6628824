"""train.compare: the job trains each listed method on the same data and budget, exports the one with the best
validation macro AUC, and records the evidence; every number is checked against an independent recomputation."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from job.run import main
from kernel.exit_codes import OK
from tests.serving_testkit import training_logits
from tests.shared import TINY_CONFIG


def test_compare_mode_exports_the_winner_on_validation_with_its_evidence(tmp_path, capsys):
    work = tmp_path / "job"
    assert main(["--config", str(TINY_CONFIG), f"work_dir={work}", "train.compare=[mtl_lora, lora]",
                 "train.max_steps=8", "train.eval_every=8", "--only", "generate,ingest,train,export"]) == OK
    out = capsys.readouterr().err
    assert "compare:" in out and "wins on validation macro AUC" in out
    info = json.loads((work / "state" / "train.json").read_text())["info"]
    evidence = info["compare"]
    valid = pq.read_table(work / "data" / "valid.parquet")
    labels, scenarios = valid["label"].to_numpy(), np.asarray(valid["scenario"].to_pylist())
    macro = {}
    for method in ("mtl_lora", "lora"):
        logits = training_logits(work / "train" / method / "model", valid)  # the method's own model, re-scored
        aucs = [roc_auc_score(labels[scenarios == s], logits[scenarios == s]) for s in sorted(set(scenarios))
                if 0 < labels[scenarios == s].sum() < (scenarios == s).sum()]
        macro[method] = float(np.mean(aucs))
        assert evidence["methods"][method]["auc_macro"] == pytest.approx(macro[method], abs=1e-6)
    winner = max(macro, key=macro.get)
    assert evidence["winner"] == winner and evidence["ranked"][0] == winner
    pair = evidence["pairs"][f"{winner}-{evidence['ranked'][1]}"]
    assert pair["delta"] == pytest.approx(macro[winner] - min(macro.values()), abs=1e-6)
    assert pair["ci_low"] <= pair["delta"] <= pair["ci_high"]
    # The winner's folder is what was exported.
    trained = json.loads((work / "train" / "model" / "metrics.json").read_text())
    assert trained == json.loads((work / "train" / winner / "model" / "metrics.json").read_text())
    assert json.loads((work / "export" / "manifest.json").read_text())["adapter_method"] == winner
    # The evidence is in MLflow, on both methods' runs.
    client = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.stage = 'train'")
    assert {r.data.tags["compare_method"] for r in runs} == {"mtl_lora", "lora"}
    assert all(r.data.tags["compare_winner"] == winner for r in runs)
    assert info["run_id"] in {r.info.run_id for r in runs if r.data.tags["compare_method"] == winner}
