"""Drift against the training reference and the monitoring check job, on real Parquet and real MLflow."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from evaluation.drift import drift_report, load_reference, reference_profile, save_reference
from evaluation.metrics import scenario_metrics
from kernel.config import config_from_dict
from kernel.errors import DataError
from kernel.mlflow_client import MlflowTracker
from monitoring.check import EXIT_BREACH, EXIT_INPUT, EXIT_OK, main, run
from tests.monitoring_testkit import CATEGORIES, DATA, overlap_scores


def scored_split(split: str) -> pa.Table:
    """Real WDC pairs in the batch-scoring output layout (scenario, score, label, query, title, ...)."""
    parts = []
    for cat in CATEGORIES:
        t = pq.read_table(DATA / cat / f"{split}.parquet")
        parts.append(pa.table({
            "scenario": t["category"], "score": pa.array(overlap_scores(t["left"].to_pylist(), t["right"].to_pylist()),
                                                         pa.float32()),
            "label": t["label"], "query": t["left"], "title": t["right"],
            "model_version": pa.array(["1"] * len(t)), "fallback": pa.array([False] * len(t)),
        }))
    return pa.concat_tables(parts)


def keyed(t: pa.Table, split: str = "valid") -> pa.Table:
    """With the row key batch scoring writes: each row's input file and its position in that file
    (scored_split concatenates the category files in order, so the position is the rank within its scenario)."""
    scn = t["scenario"].to_numpy(zero_copy_only=False).astype(str)
    rows = np.zeros(len(t), np.int64)
    for name in np.unique(scn):
        rows[scn == name] = np.arange((scn == name).sum())
    files = pa.array([str(DATA / s / f"{split}.parquet") for s in scn])
    return t.append_column("source_file", files).append_column("source_row", pa.array(rows))


def token_jaccard(left: list[str], right: list[str]) -> np.ndarray:
    """Another real, weaker model to play the champion: the Jaccard overlap of alphanumeric tokens alone."""
    out = np.empty(len(left))
    for i, (a, b) in enumerate(zip(left, right)):
        ta, tb = set(re.findall(r"[a-z0-9]+", a.lower())), set(re.findall(r"[a-z0-9]+", b.lower()))
        out[i] = len(ta & tb) / max(len(ta | tb), 1)
    return out


def profile_of(t: pa.Table, cfg) -> dict:
    return reference_profile(t["scenario"].to_numpy(zero_copy_only=False), t["score"].to_numpy(),
                             pc.utf8_length(t["query"]).to_numpy(), pc.utf8_length(t["title"]).to_numpy(),
                             bins=cfg.monitoring.drift_bins)


def drift_of(ref: dict, t: pa.Table, cfg, quarantine_rate=None) -> dict:
    return drift_report(ref, t["scenario"].to_numpy(zero_copy_only=False), t["score"].to_numpy(),
                        pc.utf8_length(t["query"]).to_numpy(), pc.utf8_length(t["title"]).to_numpy(),
                        quarantine_rate, cfg.monitoring)


def with_scores(t: pa.Table, scenario: str, fn) -> pa.Table:
    """Replace the scores of one scenario by fn(scores)."""
    s = t["score"].to_numpy().astype(np.float64)
    m = t["scenario"].to_numpy(zero_copy_only=False) == scenario
    s[m] = fn(s[m])
    return t.set_column(t.column_names.index("score"), "score", pa.array(s, pa.float32()))


@pytest.fixture(scope="module")
def valid() -> pa.Table:
    return scored_split("valid")


@pytest.fixture
def cfg():
    return config_from_dict({"monitoring": {"bootstrap_rounds": 50}})


@pytest.fixture
def reference(valid, cfg, tmp_path) -> Path:
    return save_reference(profile_of(valid, cfg), tmp_path / "reference.json")


def test_reference_against_itself_has_zero_psi(valid, cfg, reference):
    ref = load_reference(reference)
    json.dumps(ref)
    rep = drift_of(ref, valid, cfg)
    assert rep["breaches"] == [] and rep["unseen_scenarios"] == [] and rep["missing_scenarios"] == []
    for d in rep["scenarios"].values():
        assert d["judged"]
        assert d["psi_score"] == pytest.approx(0.0, abs=1e-12)
        assert d["psi_query_len"] == pytest.approx(0.0, abs=1e-12)


def test_each_kind_of_drift_breaches_and_names_its_scenario(valid, cfg, reference):
    ref = load_reference(reference)
    shifted = with_scores(valid, "shoes", lambda s: np.clip(s + 0.4, 0, 1))
    rep = drift_of(ref, shifted, cfg)
    assert len(rep["breaches"]) == 1 and "'shoes'" in rep["breaches"][0] and "score PSI" in rep["breaches"][0]
    assert all(d["psi_score"] >= 0 for d in rep["scenarios"].values())

    m = pc.equal(valid["scenario"], "watches")
    longer = valid.set_column(valid.column_names.index("title"), "title",
                              pc.if_else(m, pc.binary_join_element_wise(valid["title"], valid["title"], " "),
                                         valid["title"]))
    rep = drift_of(ref, longer, cfg)
    assert [b for b in rep["breaches"] if "title length" in b and "'watches'" in b] and len(rep["breaches"]) == 1

    toys = valid.slice(0, 150).set_column(0, "scenario", pa.array(["toys"] * 150))
    rep = drift_of(ref, pa.concat_tables([valid, toys]), cfg, quarantine_rate=0.2)
    assert rep["unseen_scenarios"] == ["toys"]
    assert any("not seen in training" in b and "toys" in b for b in rep["breaches"])
    assert any("quarantine rate 20.00%" in b for b in rep["breaches"])


def test_small_scenarios_are_reported_but_not_judged(valid, cfg, reference):
    ref = load_reference(reference)
    few = with_scores(valid.filter(pc.equal(valid["scenario"], "shoes")).slice(0, 30), "shoes", lambda s: s * 0 + 1)
    rep = drift_of(ref, few, cfg)
    d = rep["scenarios"]["shoes"]
    assert d["n"] == 30 and not d["judged"] and d["psi_score"] > cfg.monitoring.psi_threshold
    assert rep["breaches"] == [] and set(rep["missing_scenarios"]) == set(CATEGORIES) - {"shoes"}


def test_check_reads_partitioned_files_and_reports_every_row(valid, cfg, reference, tmp_path):
    # The same rows, shuffled and split over hive partitions: drift is exactly zero, metrics as computed directly.
    shuffled = valid.take(np.random.default_rng(0).permutation(len(valid)))
    scored = tmp_path / "scored"
    pq.write_to_dataset(shuffled, scored, partition_cols=["scenario"])
    summary = run(cfg, scored, reference, tmp_path / "out").info["summary"]
    assert summary["breaches"] == [] and summary["rows"] == summary["labelled_rows"] == len(valid)
    direct = scenario_metrics(valid["scenario"].to_numpy(zero_copy_only=False), valid["label"].to_numpy(),
                              valid["score"].to_numpy(), bootstrap_rounds=0)
    for name, m in summary["metrics"].items():
        assert m["auc"] == pytest.approx(direct[name]["auc"]) and m["n"] == direct[name]["n"]
    assert sum(d["n"] for d in summary["drift"]["scenarios"].values()) == len(valid)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == len(valid)


def test_quarantine_folder_of_batch_scoring_output_is_found(valid, cfg, reference, tmp_path):
    scored = tmp_path / "scores"
    (scored / "_quarantine").mkdir(parents=True)
    pq.write_table(valid.slice(100), scored / "part-00000-a.parquet")
    pq.write_table(valid.slice(0, 100).drop_columns(["score"]), scored / "_quarantine" / "part-00000-a.parquet")
    summary = run(cfg, scored, reference, tmp_path / "out").info["summary"]
    assert summary["rows"] == len(valid) - 100
    assert summary["drift"]["quarantine_rate"] == pytest.approx(100 / len(valid))


def test_report_embeds_existing_plots_and_highlights_breaches(valid, cfg, reference, tmp_path):
    path = tmp_path / "scored.parquet"
    pq.write_table(with_scores(valid, "cameras", lambda s: 1 - s), path)
    outcome = run(cfg, path, reference, tmp_path / "out")
    summary = outcome.info["summary"]
    assert outcome.exit_code == EXIT_BREACH and outcome.info["breaches"] == summary["breaches"]
    html = (tmp_path / "out" / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    # per scenario: reliability + histogram, ROC + PR; no history given: no trend plot
    assert len(images) == 2 * len(CATEGORIES) and all((tmp_path / "out" / i).stat().st_size > 1000 for i in images)
    assert sum(i.endswith("_curves.png") for i in images) == len(CATEGORIES)
    assert {p.name for p in (tmp_path / "out" / "plots").iterdir()} == {Path(i).name for i in images}
    assert html.count('class="breach"') >= 1 and "cameras" in summary["breaches"][0]
    for name in CATEGORIES:
        assert f'<td class="name">{name}' in html
    assert not list((tmp_path / "out").rglob(".*tmp*"))  # no temporary files left behind


def test_unlabelled_rows_only_count_for_drift(valid, cfg, reference, tmp_path):
    labels = pc.if_else(pc.equal(valid["scenario"], "watches"), pa.scalar(None, pa.int8()), valid["label"])
    t = valid.set_column(valid.column_names.index("label"), "label", labels)
    pq.write_table(t, tmp_path / "partly.parquet")
    summary = run(cfg, tmp_path / "partly.parquet", reference, tmp_path / "a").info["summary"]
    assert "watches" not in summary["metrics"] and "watches" in summary["drift"]["scenarios"]
    assert summary["labelled_rows"] == len(valid) - pc.sum(pc.equal(valid["scenario"], "watches")).as_py()
    pq.write_table(valid.drop_columns(["label"]), tmp_path / "unlabelled.parquet")
    summary = run(cfg, tmp_path / "unlabelled.parquet", reference, tmp_path / "b").info["summary"]
    assert summary["metrics"] is None and summary["labelled_rows"] == 0 and summary["breaches"] == []


def test_main_exit_codes_and_error_messages(valid, reference, tmp_path, capsys):
    ok, drifted, bad = tmp_path / "ok.parquet", tmp_path / "drifted.parquet", tmp_path / "bad.parquet"
    pq.write_table(valid, ok)
    pq.write_table(with_scores(valid, "shoes", lambda s: np.clip(s + 0.4, 0, 1)), drifted)
    args = ["--reference", str(reference), "--out", str(tmp_path / "o"), "monitoring.bootstrap_rounds=20"]
    assert main(["--scored", str(ok), *args]) == EXIT_OK
    assert main(["--scored", str(drifted), *args]) == EXIT_BREACH
    assert "BREACH: scenario 'shoes'" in capsys.readouterr().err
    pq.write_table(with_scores(valid, "watches", lambda s: s + 2), bad)
    assert main(["--scored", str(bad), *args]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert str(bad) in err and "column score" in err and "row" in err
    quarantine = tmp_path / "quarantine.parquet"
    pq.write_table(valid.slice(0, len(valid) // 10), quarantine)  # ~9% of all rows > 5%
    assert main(["--scored", str(ok), "--quarantine", str(quarantine), *args]) == EXIT_BREACH
    assert main(["--scored", str(ok), *args, "monitoring.no_such_key=1"]) == EXIT_INPUT


def test_report_is_logged_to_the_mlflow_run(valid, reference, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ads-relevance", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    pq.write_table(valid, tmp_path / "scored.parquet")
    rc = main(["--scored", str(tmp_path / "scored.parquet"), "--reference", str(reference), "--out",
               str(tmp_path / "o"), "--tracking-uri", uri, "--run-id", run_id, "monitoring.bootstrap_rounds=20"])
    assert rc == EXIT_OK
    logged = {f.path for f in client.list_artifacts(run_id, "monitoring")}
    assert {"monitoring/report.html", "monitoring/summary.json", "monitoring/plots"} <= logged
    # per scenario: reliability, ROC/PR and (a tracking URI: history read, empty here) the trend
    assert len(client.list_artifacts(run_id, "monitoring/plots")) == 3 * len(CATEGORIES)
    run = client.get_run(run_id)
    assert run.data.metrics["traffic/breaches"] == 0
    assert 0.5 < run.data.metrics["traffic/auc_macro"] <= 1 and run.info.status == "FINISHED"
    # found again by the history reader: stage tag, and the version from the scores' model_version column
    assert run.data.tags["stage"] == "monitor" and run.data.tags["model_version"] == "1"


def test_model_version_is_in_summary_header_and_run_tags(valid, cfg, reference, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, "ads-relevance")
    tracker.start(run_name="monitoring-check")
    pq.write_table(valid, tmp_path / "scored.parquet")
    summary = run(cfg, tmp_path / "scored.parquet", reference, tmp_path / "a", tracker=tracker,
                  model_version="ads-relevance/3").info["summary"]
    tracker.end()
    html = (tmp_path / "a" / "report.html").read_text()
    assert summary["model_version"] == "ads-relevance/3"
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["model_version"] == "ads-relevance/3"
    assert '<header id="report-header">' in html and '<b id="model-version">ads-relevance/3</b>' in html
    tags = tracker.client.get_run(tracker.run_id).data.tags
    assert (tags["stage"], tags["model_version"], tags["model_name"]) == ("monitor", "ads-relevance/3",
                                                                          "ads-relevance")
    assert "champion_version" not in tags
    # default: the scores' own model_version column ("1"); no such column: unknown
    assert run(cfg, tmp_path / "scored.parquet", reference, tmp_path / "b").info["summary"]["model_version"] == "1"
    pq.write_table(valid.drop_columns(["model_version"]), tmp_path / "bare.parquet")
    assert run(cfg, tmp_path / "bare.parquet", reference, tmp_path / "c").info["summary"]["model_version"] is None
    assert '<b id="model-version">unknown</b>' in (tmp_path / "c" / "report.html").read_text()


def test_champion_rows_are_matched_on_the_row_key_or_the_error_says_why(valid, cfg, reference, tmp_path):
    cand = keyed(valid)
    pq.write_table(cand, tmp_path / "cand.parquet")
    champ = cand.set_column(cand.column_names.index("score"), "score",
                            pa.array(token_jaccard(cand["query"].to_pylist(), cand["title"].to_pylist()),
                                     pa.float32()))

    def check(champion, scored=tmp_path / "cand.parquet"):
        return run(cfg, scored, reference, tmp_path / "o", champion=champion).info["summary"]

    pq.write_table(valid, tmp_path / "unkeyed.parquet")  # the candidate needs the key too
    with pytest.raises(DataError, match=r"unkeyed.parquet: scored input lacks columns \['source_file', 'source_row'\]"):
        check({"scored": tmp_path / "cand.parquet"}, tmp_path / "unkeyed.parquet")
    pq.write_table(pa.concat_tables([champ, champ.slice(0, 5)]), tmp_path / "dup.parquet")
    with pytest.raises(DataError, match=r"dup.parquet \(champion's scores\): the row key .* is not unique: 5 "):
        check({"scored": tmp_path / "dup.parquet"})
    other = champ.set_column(champ.column_names.index("source_file"), "source_file",
                             pc.binary_join_element_wise("elsewhere/", champ["scenario"], ""))
    pq.write_table(other, tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r"other.parquet .*no row matches the 4939 labelled scored rows"):
        check({"scored": tmp_path / "other.parquet"})
    shifted = champ.set_column(champ.column_names.index("source_row"), "source_row",
                               pc.add(champ["source_row"], 1))  # keys that point at the neighbouring rows
    pq.write_table(shifted, tmp_path / "shifted.parquet")
    with pytest.raises(DataError, match=r"shifted.parquet .*column label differs .* rows matched on"):
        check({"scored": tmp_path / "shifted.parquet"})
    with pytest.raises(DataError, match=r"champion: needs 'scored' .* lacks \['source_row'\]"):
        check({"source_file": cand["source_file"].to_numpy(zero_copy_only=False), "score": np.zeros(len(cand))})
    # in memory, in another order, a subset: matched by key all the same
    order = np.random.default_rng(0).permutation(len(champ))[:3000]
    sub = champ.take(order)
    arrays = check({"version": "v2", "source_file": sub["source_file"].to_numpy(zero_copy_only=False),
                    "source_row": sub["source_row"].to_numpy(), "score": sub["score"].to_numpy()})["champion"]
    pq.write_table(sub, tmp_path / "sub.parquet")
    from_file = check({"scored": tmp_path / "sub.parquet", "version": "v2"})["champion"]
    assert arrays["rows_matched"] == 3000 and arrays["candidate_rows_unmatched"] == len(cand) - 3000
    assert arrays["scenarios"] == from_file["scenarios"]


def test_main_compares_with_the_champions_scores(valid, reference, tmp_path):
    cand = keyed(valid)
    champ = cand.set_column(cand.column_names.index("score"), "score",
                            pa.array(token_jaccard(cand["query"].to_pylist(), cand["title"].to_pylist()),
                                     pa.float32()))
    champ = champ.set_column(champ.column_names.index("model_version"), "model_version",
                             pa.array(["ads-relevance/2"] * len(champ)))
    pq.write_table(cand, tmp_path / "cand.parquet")
    pq.write_table(champ, tmp_path / "champ.parquet")
    rc = main(["--scored", str(tmp_path / "cand.parquet"), "--reference", str(reference), "--out",
               str(tmp_path / "o"), "--model-version", "ads-relevance/3", "--champion-scored",
               str(tmp_path / "champ.parquet"), "monitoring.bootstrap_rounds=20"])
    assert rc == EXIT_OK  # the comparison informs, it never breaches
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["model_version"] == "ads-relevance/3"
    assert summary["champion"]["version"] == "ads-relevance/2"  # from the champion's model_version column
    assert summary["champion"]["rows_matched"] == len(valid) and set(summary["champion"]["scenarios"]) == set(CATEGORIES)
    html = (tmp_path / "o" / "report.html").read_text()
    assert '<table id="champion">' in html and '<b id="champion-version">ads-relevance/2</b>' in html



def test_length_psi_has_no_false_alarm_between_held_out_splits(tmp_path):
    """Valid and test splits of the demo data (grouped by query, so head queries make them clumpy) come
    from one distribution: bins sized to the sample keep their length PSI under the alarm level, while a
    real shift of the same rows still crosses it."""
    from evaluation.drift import bin_fractions, psi, quantile_bins
    from kernel.config import SyntheticConfig
    from kernel.hashing import stable_hash
    from pipeline.split import assign_splits
    from pipeline.synthetic import generate

    table = pq.read_table(generate(tmp_path / "ads.parquet", SyntheticConfig(rows_per_scenario=3000, seed=7)))
    split = assign_splits(stable_hash(table["query"]), 0.1, 0.1, seed=0)
    scenario = np.asarray(table["scenario"].to_pylist())
    lengths = pc.utf8_length(table["query"]).to_numpy()
    for name in np.unique(scenario):
        ref, new = (lengths[(scenario == name) & (split == code)] for code in (1, 2))
        profile = quantile_bins(ref, 10)
        assert psi(profile["fractions"], bin_fractions(new, profile["cuts"])) < 0.25, name
        assert psi(profile["fractions"], bin_fractions(new + 8, profile["cuts"])) > 0.25, name
