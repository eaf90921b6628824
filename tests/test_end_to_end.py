"""The whole scheduled job on a tiny random-init model: generate → ingest → train → export → score → monitor →
promote, and what a scheduler sees when it runs the job again: nothing redone when nothing changed, the
steps whose inputs changed (and everything after them) redone, and the real outcome reported every time."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from job.run import main
from job.summary import format_summary
from kernel.exit_codes import BAD_INPUT, GATE_FAILED, OK
from kernel.metric_names import DATA, OTHER_GROUPS
from kernel.provenance import package_version
from tests.shared import LOG_LINE, TINY_CONFIG

TINY = TINY_CONFIG
STEPS = ("generate", "ingest", "train", "export", "score", "monitor", "promote")


def ran(out: str) -> list[str]:
    return [s for s in STEPS if f"[{s}] running" in out]


def test_whole_job_then_reruns_redo_exactly_what_changed(tmp_path, capsys):
    work = tmp_path / "job"
    job = ["--config", str(TINY), f"work_dir={work}"]
    # The first night: a gate no tiny model can pass (every scenario's AUC >= 0.99 for a first champion).
    assert main([*job, "monitoring.min_auc=0.99"]) == GATE_FAILED
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert ran(err) == list(STEPS) and "=== summary ===" in out and "macro" in out
    check_logs(err)
    # The summary printed is the rendering of <run root>/summary.json, which names the data of every figure.
    summary = json.loads((work / "summary.json").read_text())
    assert out.rstrip("\n").endswith(format_summary(summary))
    assert summary["exit_code"] == GATE_FAILED and summary["version"] == package_version()
    assert summary["quality"]["data"] == "test_split" and "test_split AUC" in out
    assert summary["promotion"]["eval_data"] == "test_split" and "(gate on test_split)" in out
    test_rows = pq.read_table(work / "data" / "test.parquet").num_rows
    scores = pq.read_table(sorted((work / "scores").glob("part-*.parquet")))
    assert scores.num_rows == test_rows  # one score per held-out row
    scenarios = json.loads((work / "export" / "task_map.json").read_text())["scenarios"]
    assert set(scores.column("scenario").to_pylist()) <= set(scenarios)
    for copy in (work / "train" / "model" / "task_map.json", work / "export" / "task_map.json"):
        assert copy.read_bytes() == (work / "data" / "task_map.json").read_bytes()  # written once by ingestion
    assert set(scores.column("model_version").to_pylist()) == {"tiny/1"}

    check_lineage(work, expected_decision="not promoted")

    # Replayed as it is: nothing is redone, and the failed gate is still a failed gate.
    assert main([*job, "monitoring.min_auc=0.99"]) == GATE_FAILED
    err = capsys.readouterr().err
    assert ran(err) == [] and err.count("up to date") == 7 and "promotion gate failed" in err

    # Only the gate's setting changes: only promotion runs again, and passes.
    assert main(job) == OK
    err = capsys.readouterr().err
    assert ran(err) == ["promote"] and "changed: config monitoring.min_auc" in err
    client = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"

    # A training setting changes: training and everything after it run again; ingestion does not. Whether the
    # retrained tiny model passes the gate against the champion is the gate's business; a replay says the same.
    code = main([*job, "train.max_steps=12"])
    assert code in (OK, GATE_FAILED)
    err = capsys.readouterr().err
    assert ran(err) == ["train", "export", "score", "monitor", "promote"]
    assert "changed: config train" in err
    train = json.loads((work / "state" / "train.json").read_text())
    assert train["info"]["steps"] == 12
    train_run = client.get_run(train["info"]["run_id"])
    assert any(k.startswith("val/auc/") for k in train_run.data.metrics)  # per-scenario validation AUC
    # The morning report compares the candidate with the champion on the same rows, and shows the trend.
    report = json.loads((work / "monitor" / "summary.json").read_text())
    assert report["model_version"] == "tiny/2" and report["champion"]["version"] == "tiny/1"
    assert len(report["history"]) >= 1 and report["history"][-1]["model_version"] == "tiny/1"
    champion = "2" if code == OK else "1"
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == champion
    assert set(pq.read_table(work / "scores").column("model_version").to_pylist()) == {"tiny/2"}
    assert main([*job, "train.max_steps=12"]) == code and ran(capsys.readouterr().err) == []


def check_logs(err: str) -> None:
    """Every line the job wrote to stderr is a log record (or the indented continuation of one): a timestamp,
    a level and the step; the known-harmless lines of MLflow and DeepSpeed are not there."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(LOG_LINE.match(line) or line.startswith("  ") for line in lines), \
        [line for line in lines if not (LOG_LINE.match(line) or line.startswith("  "))][:5]
    steps = {LOG_LINE.match(line).group(3) for line in lines if LOG_LINE.match(line)}
    assert set(STEPS) <= steps  # each step's lines carry its name
    for noise in ("untested optimizer", "Creating initial MLflow database tables", "built successfully",
                  "Attempting to get learning rate", "Validating input example"):
        assert noise not in err


def check_metric_names(runs) -> None:
    """One naming scheme for every metric of every run: <data>/<metric>[/<scenario>] (kernel.metric_names)."""
    names = {k for r in runs for k in r.data.metrics}
    groups = {k.split("/")[0] for k in names}
    assert names and all("/" in k for k in names) and groups <= set(DATA) | set(OTHER_GROUPS), groups
    assert {"source", "train", "val", "test_split"} <= groups and "traffic" not in groups  # no score_input here


def check_lineage(work, expected_decision: str) -> None:
    """One parent run for the job, a child per stage; the registered version is a pyfunc of the training run,
    the runs record their datasets (with schema and profile), the test-split metrics and their source; the
    version's description says why, on which data."""
    client = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "job"]
    assert len(parents) == 1 and parents[0].data.tags["exit_code"] == str(GATE_FAILED)
    children = {r.data.tags.get("stage"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"ingest", "train", "export", "score", "monitor", "promote"}
    train = children["train"]
    assert all(r.data.tags["mlflow.source.name"] for r in runs)  # what the UI's "Source" shows
    assert {d.dataset.name for d in train.inputs.dataset_inputs} == {"train", "valid"}
    assert len(train.inputs.dataset_inputs[0].dataset.digest) == 16
    assert {d.dataset.name for d in children["ingest"].inputs.dataset_inputs} == {"source"}
    assert {d.dataset.name for d in children["score"].inputs.dataset_inputs} == {"test_split"}
    check_metric_names(runs)
    assert "test_split/auc_macro" in train.data.metrics
    assert any(k.startswith("test_split/auc/") for k in train.data.metrics)
    assert all(r.data.tags.get("ads_relevance.version") == package_version() for r in runs)
    # Each dataset carries its schema and profile; the training split's profile, recomputed from its file.
    valid = pq.read_table(work / "data" / "valid.parquet")
    for d in train.inputs.dataset_inputs:
        schema, profile = json.loads(d.dataset.schema), json.loads(d.dataset.profile)
        assert {"query", "label", "scenario"} <= {c["name"] for c in schema["mlflow_colspec"]}
        if d.dataset.name == "valid":
            scen, labels = valid["scenario"].to_pylist(), valid["label"].to_pylist()
            assert profile["rows"] == valid.num_rows
            assert profile["rows_per_scenario"] == {s: scen.count(s) for s in set(scen)}
            for s in set(scen):
                mine = [y for x, y in zip(scen, labels) if x == s]
                assert profile["label_rate_per_scenario"][s] == pytest.approx(sum(mine) / len(mine))
    source = json.loads(children["ingest"].inputs.dataset_inputs[0].dataset.profile)
    assert source["rows"] == json.loads((work / "data" / "stats.json").read_text())["rows_in"]
    version = client.get_model_version("tiny", "1")
    assert version.run_id == train.info.run_id  # the registered version links to the run that trained it
    assert version.tags["export_run_id"] == children["export"].info.run_id
    description = version.description
    assert f"**Promotion: {expected_decision}" in description
    assert "| scenario | test_split AUC | 95% CI | rows |" in description and "Evaluated on test_split" in description
    for scenario in json.loads((work / "data" / "task_map.json").read_text())["scenarios"]:
        assert f"| {scenario} |" in description


def test_a_run_key_gives_each_scheduled_run_its_own_replayable_state(tmp_path, capsys):
    src = tmp_path / "incoming"
    job = ["--config", str(TINY), f"work_dir={tmp_path / 'job'}", "--only", "ingest"]
    for night in ("2026-11-30", "2026-12-01"):
        from kernel.config import SyntheticConfig
        from pipeline.synthetic import generate

        generate(src / night / "ads.parquet", SyntheticConfig(rows_per_scenario=60, seed=len(night)))
    src_override = f"data.source={src}/{{run_date}}"
    assert main([*job, src_override, "--run-date", "2026-11-30"]) == OK
    assert ran(capsys.readouterr().err) == ["ingest"]
    assert main([*job, src_override, "--run-date", "2026-11-30"]) == OK  # a replay: nothing to do
    assert "[ingest] up to date" in capsys.readouterr().err
    assert main([*job, src_override, "--run-date", "2026-12-01"]) == OK  # the next night: its own data
    assert ran(capsys.readouterr().err) == ["ingest"]
    for night in ("2026-11-30", "2026-12-01"):
        state = json.loads((tmp_path / "job" / "runs" / night / "state" / "ingest.json").read_text())
        assert state["info"]["rows_in"] == 240
    # New data in the same night's folder (a late file): ingestion sees it and runs again.
    generate(src / "2026-12-01" / "late.parquet", SyntheticConfig(rows_per_scenario=10, seed=9))
    assert main([*job, src_override, "--run-date", "2026-12-01"]) == OK
    err = capsys.readouterr().err
    assert ran(err) == ["ingest"] and "changed: input data" in err
    assert main([*job, src_override, "--run-date", "../escape"]) == BAD_INPUT


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    assert main(["--config", str(TINY), f"work_dir={tmp_path}", "train.nope=1"]) == BAD_INPUT
    assert "train.nope" in capsys.readouterr().err
