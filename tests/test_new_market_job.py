"""A new market through the scheduled job, the starting model as the train step's input, and the promotion gate
with a new scenario (checked against an independent recomputation of its AUC)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from job.run import fingerprint, main
from job.state import StepRecord
from job.steps import JobContext, JobPaths
from kernel.config import config_from_dict, load_config
from kernel.exit_codes import OK
from monitoring.promote import evaluate, gate
from serving.scoring.table import score_table
from tests.shared import TINY_CONFIG as TINY


def test_a_new_market_joins_the_champion_overnight(tmp_path, capsys):
    """Night 1: three markets, promoted. Night 2: only the new market's rows; task_only from the champion; the
    gate compares the known markets on night 1's test split (bit-identical) and holds the new one to min_auc."""
    work = tmp_path / "job"
    # A gate that int8 passes: night 1 serves some markets in int8, and night 2 must serve them alike.
    job = ["--config", str(TINY), f"work_dir={work}", "serving.precision_gate.max_abs_dp=1.0",
           "serving.precision_gate.max_auc_change=1.0"]
    assert main([*job, "--run-date", "n1", "data.filters={scenario: [de, jp, uk]}"]) == OK
    night1_test = work / "runs" / "n1" / "data" / "test.parquet"
    night2 = [*job, "--run-date", "n2", "data.filters={scenario: [us]}", "data.synthetic.seed=11",
              "train.init_from=models:/tiny@champion", "train.adapt=task_only", "train.warm.steps=6",
              "train.task_lr=0.05", f"monitoring.gate_eval=[{night1_test}]"]
    assert main(night2) == OK
    assert "3 known scenarios, new: ['us']" in capsys.readouterr().err  # the trainer's log
    n2 = work / "runs" / "n2"
    manifest = json.loads((n2 / "export" / "manifest.json").read_text())
    assert manifest["started_from"]["version"] == "1" and manifest["started_from"]["scenarios"] == ["de", "jp", "uk"]
    assert json.loads((n2 / "export" / "task_map.json").read_text())["scenarios"] == ["de", "jp", "uk", "us"]
    client = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "2"
    train_run = client.get_run(json.loads((n2 / "state" / "train.json").read_text())["info"]["run_id"])
    tags = train_run.data.tags
    assert (tags["init_from"], tags["init_version"], tags["adapt"], tags["new_scenarios"]) == \
        ("models:/tiny@champion", "1", "task_only", "us")
    promote = json.loads((n2 / "state" / "promote.json").read_text())["info"]
    assert promote["metrics"]["new_scenarios"] == ["us"]
    assert {s: d["delta"] for s, d in promote["metrics"]["delta"].items()} == {"de": 0.0, "jp": 0.0, "uk": 0.0}
    assert promote["metrics"]["candidate"]["us"]["n"] == pq.read_table(n2 / "data" / "test.parquet").num_rows
    served = [json.loads((work / "runs" / night / "export" / "manifest.json").read_text())["onnx"]["serve"]
              for night in ("n1", "n2")]
    assert {s: served[1][s] for s in ("de", "jp", "uk")} == served[0]
    # Through export and batch scoring, the known markets' scores are bit-identical to the champion's.
    old = pq.read_table(night1_test)
    scores = [score_table(work / "runs" / night / "export", old)["score"].to_numpy(zero_copy_only=False)
              for night in ("n1", "n2")]
    assert len(scores[0]) == old.num_rows and np.isfinite(scores[0]).all() and np.array_equal(*scores)
    # Replayed: the champion alias now names this night's own model, which is not a new starting model.
    assert main(night2) == OK
    assert capsys.readouterr().err.count("up to date") == 7


def _registry_with_two_versions(tmp_path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("m")
    for _ in range(2):
        run = client.create_run(exp).info.run_id
        client.create_model_version("m", f"runs:/{run}/model", run)
    return uri, client


def test_the_train_step_reruns_when_the_starting_model_changes(tmp_path):
    uri, client = _registry_with_two_versions(tmp_path)
    cfg = load_config(TINY, [f"work_dir={tmp_path}", f"tracking.uri={uri}", "train.init_from=models:/m@champion"])
    ingest = StepRecord("f", {}, "ingest-output", 0)
    ctx = JobContext(JobPaths(cfg), {"ingest": ingest}, lineage=None)
    client.set_registered_model_alias("m", "champion", "1")
    first = fingerprint(ctx, "train")
    client.set_registered_model_alias("m", "champion", "2")  # another night promoted another model
    moved = fingerprint(ctx, "train")
    assert moved.digest != first.digest and moved.changes_since(first.parts()) == ["input data"]
    # This run started from version 1 and registered version 2 itself: its own promotion is not a new start.
    ctx.records["train"] = StepRecord("f", {}, "o", 0, info={"started_from": {"version": "1"}})
    ctx.records["export"] = StepRecord("f", {}, "o", 0, info={"version": "2"})
    assert fingerprint(ctx, "train").digest == first.digest


def test_the_gate_holds_a_new_scenario_to_min_auc_and_the_known_ones_to_the_champion():
    rng = np.random.default_rng(0)
    n = 300
    labels = {s: rng.integers(0, 2, n) for s in ("de", "jp", "us")}
    champ_scores = {s: np.clip(labels[s] * 0.3 + rng.random(n) * 0.7, 0, 1) for s in ("de", "jp")}
    new_scores = np.clip(labels["us"] * 0.2 + rng.random(n) * 0.8, 0, 1)
    new_auc = roc_auc_score(labels["us"], new_scores)  # the independent recomputation

    def arrays(scores: dict) -> tuple:
        names = list(scores)
        return (np.repeat(names, n), np.concatenate([labels[s] for s in names]),
                np.concatenate([scores[s] for s in names]))

    champ_rows = arrays({**champ_scores, "us": np.full(n, np.nan)})  # the champion cannot score the new market
    cand = {**champ_scores, "us": new_scores}  # task_only: the known markets' scores unchanged

    def decide(min_auc: float, candidate: dict, require=None) -> list[str]:
        cfg = config_from_dict({"monitoring": {"min_auc": min_auc, "bootstrap_rounds": 50}})
        c_per, c_invalid = evaluate(*arrays(candidate), cfg)
        h_per, _ = evaluate(*champ_rows, cfg)
        assert c_per["us"]["auc"] == pytest.approx(new_auc, abs=1e-12)
        return gate(c_per, c_invalid, h_per, cfg, require)[0]

    assert decide(new_auc - 0.01, cand) == []
    reasons = decide(new_auc + 0.01, cand)
    assert len(reasons) == 1 and "'us'" in reasons[0] and "min_auc" in reasons[0] and "new scenario" in reasons[0]
    worse = {**cand, "de": np.clip(1 - champ_scores["de"], 0, 1)}  # a known market regresses
    assert [r for r in decide(new_auc - 0.01, worse) if "'de'" in r]
    missing = decide(new_auc - 0.01, cand, require=["de", "jp", "uk"])  # the champion also serves uk
    assert len(missing) == 1 and "'uk'" in missing[0] and "monitoring.gate_eval" in missing[0]
