"""Batch scoring CLI on real WDC rows: every input row is scored or quarantined exactly once, scores equal the
training-time model's, unknown scenarios fall back (flagged) or go to quarantine, and shards are disjoint
across workers. The kill/resume test lives in test_score_resume.py, Ray in test_score_ray.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from serving.layout import read_manifest
from serving.scoring.cli import main
from serving.scoring.table import score_table
from tests.serving_testkit import (
    SCENARIOS,
    canonical,
    export,
    sigmoid,
    tiny_config,
    trained_folder,
    training_logits,
    wdc_raw,
)
from tests.shared import log_messages


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    model_dir = trained_folder(root, "mean")
    export(model_dir, root / "export")
    return model_dir, root / "export"


def write_inputs(folder, with_bad_rows: bool = True) -> list:
    """Three shards of real WDC rows with a pass-through key; shard 2 also holds an unseen scenario
    (watches) and a row whose query is null (fails ingestion's validation)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, cats in enumerate([["cameras"], ["computers", "shoes"], ["shoes", "watches"]]):
        raw = wdc_raw(per_category=9, categories=cats, offset=3 * i)
        raw = raw.append_column("pair_id", pa.array(np.arange(raw.num_rows) + 1000 * i, pa.int64()))
        if with_bad_rows and i == 2:
            left = raw["left"].to_pylist()
            left[4] = None
            raw = raw.set_column(0, "left", pa.array(left, pa.string()))
        paths.append(folder / f"day{i}.parquet")
        pq.write_table(raw, paths[-1], row_group_size=7)  # several row groups per shard
    return paths


def read_output(out) -> pa.Table:
    return ds.dataset(out, format="parquet").to_table().sort_by([("source_file", "ascending"),
                                                                  ("source_row", "ascending")])


def test_scores_every_row_once_and_match_training_model(tmp_path, exported, capsys):
    model_dir, export_dir = exported
    paths = write_inputs(tmp_path / "in")
    out = tmp_path / "scores"
    # 10 of 54 rows are quarantined on purpose: raise the gate (serving.max_quarantine_rate, default 5%).
    assert main(["--model", str(export_dir), "--output", str(out), "--quiet", "--input", str(tmp_path / "in"),
                 "data.columns.keys=[pair_id]", "serving.max_quarantine_rate=0.5"]) == 0  # overrides after --input
    printed = capsys.readouterr().err
    assert "quarantined" in printed and "rows/s" in printed

    scored, quarantine = read_output(out), ds.dataset(out / "_quarantine", format="parquet").to_table()
    rows_in = sum(pq.read_metadata(p).num_rows for p in paths)
    assert scored.num_rows + quarantine.num_rows == rows_in  # nothing silently lost
    keys = list(zip(scored["source_file"].to_pylist(), scored["source_row"].to_pylist()))
    keys += list(zip(quarantine["source_file"].to_pylist(), quarantine["source_row"].to_pylist()))
    assert len(set(keys)) == rows_in  # ... and nothing twice
    assert sorted(quarantine["reason"].to_pylist()) == ["null_query"] + ["unknown_scenario"] * 9
    assert set(scored["scenario"].to_pylist()) == set(SCENARIOS) and not any(scored["fallback"].to_pylist())
    assert set(scored["model_version"].to_pylist()) == {read_manifest(export_dir)["model_version"]}
    # Files of 9 or 18 rows (row groups of 7) under serving.unit_rows: one unit each, rows in input order.
    for i, p in enumerate(paths):
        part = pq.read_table(out / f"part-{i:05d}-0000-{p.stem}.parquet")
        assert part["source_row"].to_pylist() == sorted(part["source_row"].to_pylist())
        assert (out / "_done" / f"part-{i:05d}-0000-{p.stem}.json").is_file()
    # Pass-through key intact; scores equal the unmerged training-time model on the same rows.
    tables = [pq.read_table(p) for p in paths]
    raw = pa.concat_tables([t.append_column("source_row", pa.array(np.arange(t.num_rows), pa.int64()))
                            .append_column("source_file", pa.array([str(p.resolve())] * t.num_rows))
                            for t, p in zip(tables, paths)])
    raw = raw.filter(pc.and_(pc.is_in(raw["category"], pa.array(SCENARIOS)), pc.is_valid(raw["left"])))
    raw = raw.sort_by([("source_file", "ascending"), ("source_row", "ascending")])
    assert scored["pair_id"].to_pylist() == raw["pair_id"].to_pylist()
    ref = sigmoid(training_logits(model_dir, canonical(raw)))
    np.testing.assert_allclose(scored["score"].to_numpy(), ref, atol=1e-5, rtol=0)
    # score_table (used by monitoring) gives the same scores for the same canonical rows.
    table = score_table(export_dir, canonical(raw))
    np.testing.assert_allclose(table["score"].to_numpy(), scored["score"].to_numpy(), atol=1e-6, rtol=0)


def test_unknown_scenario_falls_back_flagged(tmp_path, exported):
    _, export_dir = exported
    write_inputs(tmp_path / "in", with_bad_rows=False)
    out = tmp_path / "scores"
    assert main(["--model", str(export_dir), "--input", str(tmp_path / "in" / "day2.parquet"), "--output", str(out),
                 "--quiet", "serving.unknown_scenario=fallback", "serving.fallback_scenario=computers"]) == 0
    scored = read_output(out)
    watches = pc.equal(scored["scenario"], "watches")
    assert scored.num_rows == 18 and pc.sum(watches).as_py() == 9
    assert scored.filter(watches)["fallback"].to_pylist() == [True] * 9
    assert set(scored.filter(watches)["scored_as"].to_pylist()) == {"computers"}
    assert not any(scored.filter(pc.invert(watches))["fallback"].to_pylist())
    # A fallback row scores exactly as the same text labelled with the fallback scenario.
    raw = wdc_raw(per_category=9, categories=["watches"], offset=6)
    as_computers = canonical(raw).set_column(5, "scenario", pa.array(["computers"] * 9))
    expected = score_table(export_dir, as_computers)["score"].to_numpy()
    np.testing.assert_allclose(scored.filter(watches)["score"].to_numpy(), expected, atol=1e-6, rtol=0)


def test_scores_ingestion_output_as_is(tmp_path, exported):
    from pipeline.ingest import run_ingest

    model_dir, export_dir = exported
    pq.write_table(wdc_raw(per_category=40), tmp_path / "raw.parquet")
    run_ingest(tiny_config(tmp_path), tmp_path / "raw.parquet", tmp_path / "data")  # maps left/right/category
    test = pq.read_table(tmp_path / "data" / "test.parquet")
    assert test.num_rows > 0
    assert main(["--model", str(export_dir), "--input", str(tmp_path / "data" / "test.parquet"),
                 "--output", str(tmp_path / "scores"), "--quiet"]) == 0
    scored = read_output(tmp_path / "scores")
    assert scored["source_row"].to_pylist() == list(range(test.num_rows))
    assert scored["label"].to_pylist() == test["label"].to_pylist()
    np.testing.assert_allclose(scored["score"].to_numpy(), sigmoid(training_logits(model_dir, test)), atol=1e-5,
                               rtol=0)


def test_workers_take_disjoint_units_and_match_single_process(tmp_path, exported):
    _, export_dir = exported
    write_inputs(tmp_path / "in")  # files of 9, 18, 18 rows in row groups of 7: with unit_rows=7, 2 + 3 + 3 units
    common = ["--model", str(export_dir), "--input", str(tmp_path / "in"), "--quiet", "serving.max_quarantine_rate=0.5",
              "serving.unit_rows=7"]
    assert main(common + ["--output", str(tmp_path / "one")]) == 0
    assert main(common + ["--output", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = read_output(tmp_path / "one"), read_output(tmp_path / "two")
    assert one.drop_columns(["score"]).equals(two.drop_columns(["score"]))
    np.testing.assert_allclose(one["score"].to_numpy(), two["score"].to_numpy(), atol=1e-6, rtol=0)
    # Units go round robin over the workers: each file is scored by both processes.
    marks = [json.loads(p.read_text()) for p in (tmp_path / "two" / "_done").glob("*.json")]
    assert len(marks) == 8 and all(len({m["pid"] for m in marks if m["file"] == f}) == 2 for f in range(3))
    # By hand: rank 1 of 2 scores only the odd units of the job (1, 3, 5, 7).
    assert main(common + ["--output", str(tmp_path / "rank1"), "--rank", "1", "--world-size", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "rank1").glob("part-*.parquet")) == [
        "part-00000-0001-day0.parquet", "part-00001-0001-day1.parquet", "part-00002-0000-day2.parquet",
        "part-00002-0002-day2.parquet"]


def test_help_lists_every_output_column(capsys):
    from serving.scoring.outputs import OUTPUT_COLUMNS

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out.split("Output columns, in order:", 1)[1]
    assert [line.split()[0] for line in listed.strip().splitlines()[1:]] == [name for name, _, _ in OUTPUT_COLUMNS]


def test_bad_input_names_file_and_column(tmp_path, exported, capsys):
    _, export_dir = exported
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"right": ["a"], "category": ["shoes"]}), bad)
    assert main(["--model", str(export_dir), "--input", str(bad), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "'left'" in err
    assert main(["--model", str(export_dir), "--input", str(tmp_path / "missing"), "--output",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    good = write_inputs(tmp_path / "in")[0]
    assert main(["--model", str(export_dir), "--input", str(good), "--output", str(tmp_path / "o"), "--quiet",
                 "serving.unknown_scenario=fallback", "serving.fallback_scenario=nope"]) == 2
    assert "serving.fallback_scenario: 'nope'" in capsys.readouterr().err


def test_resume_with_another_model_rescores_instead_of_mixing_versions(tmp_path, exported):
    _, export_dir = exported
    write_inputs(tmp_path / "in", with_bad_rows=False)
    out = tmp_path / "scores"
    args = ["--model", str(export_dir), "--output", str(out), "--quiet", "--input", str(tmp_path / "in"), "--resume",
            "serving.max_quarantine_rate=0.5"]  # day2's 9 watches rows are quarantined
    assert main(args + ["--model-version", "v1"]) == 0
    assert set(read_output(out).column("model_version").to_pylist()) == {"v1"}
    assert main(args + ["--model-version", "v2"]) == 0  # e.g. the job re-exported, then resumed scoring
    assert set(read_output(out).column("model_version").to_pylist()) == {"v2"}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A model exported with --valid (calibration + per-scenario thresholds) and registered (sqlite)."""
    root = tmp_path_factory.mktemp("calibrated")
    valid = root / "valid.parquet"
    pq.write_table(canonical(wdc_raw("valid", per_category=40)), valid)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model_dir = trained_folder(root, "cls")
    export(model_dir, root / "export", valid=valid, tracking_uri=uri, name="relevance")
    return model_dir, root / "export", uri


def test_output_has_raw_and_calibrated_scores_a_decision_and_the_registry_version(tmp_path, calibrated):
    """Every score column against an independent recomputation: sigmoid of the training model's logits, the
    calibration map applied to that, and the manifest's per-scenario thresholds applied to the calibrated score."""
    from evaluation.calibration import ScenarioCalibrator

    model_dir, export, _ = calibrated
    raw = wdc_raw(per_category=10)
    pq.write_table(raw, tmp_path / "in.parquet")
    assert main(["--model", str(export), "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o"),
                 "--quiet", "serving.calibrate=true"]) == 0
    got = pq.read_table(tmp_path / "o").sort_by("source_row")
    expect_raw = sigmoid(training_logits(model_dir, canonical(raw)))
    np.testing.assert_allclose(got["score_raw"].to_numpy(), expect_raw, atol=1e-5)
    scen = np.asarray(got["scored_as"].to_pylist())
    expect_cal = ScenarioCalibrator.load(export / "calibration.json").apply(scen, got["score_raw"].to_numpy())
    np.testing.assert_allclose(got["score_calibrated"].to_numpy(), expect_cal, atol=1e-6)
    np.testing.assert_array_equal(got["score"].to_numpy(), got["score_calibrated"].to_numpy())  # calibrate on
    thresholds = read_manifest(export)["thresholds"]["f1_max_calibrated"]
    served = got["score"].to_numpy().astype(np.float64)
    expect_decision = [None if s not in thresholds else bool(c >= thresholds[s]) for s, c in zip(scen, served)]
    assert got["decision"].to_pylist() == expect_decision and any(expect_decision) and not all(expect_decision)
    assert set(got["model_version"].to_pylist()) == {"relevance/1"}  # the folder knows its registered version


def _max_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    tp = float((predicted & (labels == 1)).sum())
    return 2 * tp / max(float(predicted.sum()) + float((labels == 1).sum()), 1e-12)


@pytest.mark.parametrize("calibrate", [False, True])
def test_decision_is_the_served_score_against_a_threshold_fitted_on_that_kind_of_score(tmp_path, calibrated,
                                                                                        calibrate):
    """``decision`` follows ``score`` whether score is raw (the default) or calibrated: within a scenario every
    decided row scores at least as high as every undecided one, and the threshold is the scenario's max-F1 cut
    of the same kind of score on the validation split (recomputed here by brute force over every cut)."""
    _, export, _ = calibrated
    raw = wdc_raw(per_category=15)
    pq.write_table(raw, tmp_path / "in.parquet")
    assert main(["--model", str(export), "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o"),
                 "--quiet", f"serving.calibrate={str(calibrate).lower()}"]) == 0
    got = pq.read_table(tmp_path / "o").sort_by("source_row")
    score, decision = got["score"].to_numpy(), np.asarray(got["decision"].to_pylist())
    kind = "score_calibrated" if calibrate else "score_raw"
    np.testing.assert_array_equal(score, got[kind].to_numpy())
    scen = np.asarray(got["scored_as"].to_pylist())
    for s in SCENARIOS:
        m = scen == s
        yes, no = score[m][decision[m] == True], score[m][decision[m] == False]  # noqa: E712 - object array
        assert len(yes) + len(no) == m.sum() and (not len(yes) or not len(no) or yes.min() >= no.max())
    # The threshold: the best F1 on the fixture's validation split (its served scores of this kind), found
    # here by trying every cut rather than by the export's precision-recall curve.
    thresholds = read_manifest(export)["thresholds"]["f1_max_calibrated" if calibrate else "f1_max_raw"]
    vrows = canonical(wdc_raw("valid", per_category=40))
    vscen = np.asarray(vrows["scenario"].to_pylist())
    vscore = score_table(export, vrows, calibrate=calibrate)["score"].to_numpy().astype(np.float64)
    labels = vrows["label"].to_numpy()
    for s in SCENARIOS:
        m = vscen == s
        best = max(_max_f1(labels[m], vscore[m] >= t) for t in np.unique(vscore[m]))
        assert _max_f1(labels[m], vscore[m] >= thresholds[s]) == pytest.approx(best, abs=1e-9), s


def test_the_input_partition_layout_is_kept(tmp_path, exported):
    _, export = exported
    for market, cats in (("us", ["cameras", "shoes"]), ("uk", ["computers"])):
        for day in ("1", "2"):
            folder = tmp_path / "traffic" / f"market={market}" / f"day={day}"
            folder.mkdir(parents=True)
            pq.write_table(wdc_raw(per_category=3, categories=cats, offset=int(day)), folder / "part-0.parquet")
    assert main(["--model", str(export), "--input", str(tmp_path / "traffic"), "--output", str(tmp_path / "o"),
                 "--quiet"]) == 0
    outputs = sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*.parquet")
                     if not p.relative_to(tmp_path / "o").parts[0].startswith("_"))
    assert [o.rsplit("/", 1)[0] for o in outputs] == ["market=uk/day=1", "market=uk/day=2", "market=us/day=1",
                                                    "market=us/day=2"]
    table = ds.dataset(tmp_path / "o", format="parquet", partitioning="hive").to_table()
    assert set(table["market"].to_pylist()) == {"us", "uk"} and table.num_rows == 18
    # One partition folder alone keeps its own place in the layout.
    assert main(["--model", str(export), "--input", str(tmp_path / "traffic" / "market=us"), "--output",
                 str(tmp_path / "o2"), "--quiet"]) == 0
    assert sorted(p.parent.name for p in (tmp_path / "o2" / "market=us").rglob("part-*.parquet")) == ["day=1", "day=2"]


def test_units_pack_whole_row_groups_in_order():
    from serving.scoring.plan import Shard, plan_units

    a, b, c = Shard(0, Path("a.parquet")), Shard(1, Path("b.parquet")), Shard(2, Path("c.parquet"))
    units = plan_units([a, b, c], [[7, 7, 7, 7, 7, 7, 3], [100], []], unit_rows=15)
    assert [(u.shard.index, u.index, u.ordinal, u.first_group, u.end_group, u.first_row, u.num_rows)
            for u in units] == [
        (0, 0, 0, 0, 2, 0, 14), (0, 1, 1, 2, 4, 14, 14), (0, 2, 2, 4, 6, 28, 14), (0, 3, 3, 6, 7, 42, 3),
        (1, 0, 4, 0, 1, 0, 100),   # a row group larger than unit_rows is a unit alone, never split
        (2, 0, 5, 0, 0, 0, 0)]     # a file without row groups: one empty unit (it still gets its output)
    assert units[1].name == "part-00000-0001-a"
    assert [len(plan_units([a], [[7] * 6], n)) for n in (1, 7, 14, 42, 10**6)] == [6, 6, 3, 1, 1]


def one_file_of_row_groups(path, rows_per_group: int = 7) -> pa.Table:
    """45 real WDC rows (15 per scenario, grouped by scenario) with a pass-through key, 7 rows per row group."""
    raw = wdc_raw(per_category=15)
    raw = raw.append_column("pair_id", pa.array(np.arange(raw.num_rows), pa.int64()))
    pq.write_table(raw, path, row_group_size=rows_per_group)
    return raw


def test_one_file_is_split_into_units_that_score_like_the_whole_file(tmp_path, exported, capsys):
    _, export_dir = exported
    one_file_of_row_groups(tmp_path / "x.parquet")  # row groups of 7: 7 7 7 7 7 7 3
    common = ["--model", str(export_dir), "--input", str(tmp_path / "x.parquet"), "--quiet",
              "data.columns.keys=[pair_id]"]
    assert main(common + ["--output", str(tmp_path / "whole")]) == 0  # default unit_rows: one unit
    assert main(common + ["--output", str(tmp_path / "units"), "serving.unit_rows=15"]) == 0
    assert "in 4/4 shards" in log_messages(capsys.readouterr().err)[-1]
    whole, units = read_output(tmp_path / "whole"), read_output(tmp_path / "units")
    assert sorted(p.name for p in (tmp_path / "whole").glob("*.parquet")) == ["part-00000-0000-x.parquet"]
    assert units["source_row"].to_pylist() == list(range(45)) == units["pair_id"].to_pylist()  # each row once
    assert whole.drop_columns(["score", "score_raw"]).equals(units.drop_columns(["score", "score_raw"]))
    np.testing.assert_allclose(units["score"].to_numpy(), whole["score"].to_numpy(), atol=1e-6, rtol=0)
    # One output per unit, in input order, keeping each row's number inside the file; markers say what
    # each unit covers and which process scored it.
    for i, (lo, hi) in enumerate([(0, 14), (14, 28), (28, 42), (42, 45)]):
        part = pq.read_table(tmp_path / "units" / f"part-00000-{i:04d}-x.parquet")
        assert part["source_row"].to_pylist() == list(range(lo, hi))
        marker = json.loads((tmp_path / "units" / "_done" / f"part-00000-{i:04d}-x.json").read_text())
        assert marker["rows"] == [lo, hi] and marker["rows_in"] == marker["scored"] == hi - lo
        assert marker["row_groups"] == [2 * i, min(2 * i + 2, 7)] and marker["pid"] == os.getpid()
    # data.filters prunes row groups at read time; the plan (from the footer) stays the same.
    assert main(common + ["--output", str(tmp_path / "shoes"), "serving.unit_rows=15",
                          "data.filters={category: [shoes]}"]) == 0
    shoes = read_output(tmp_path / "shoes")
    assert set(shoes["scenario"].to_pylist()) == {"shoes"} and shoes["source_row"].to_pylist() == list(range(30, 45))
    assert len(list((tmp_path / "shoes" / "_done").glob("*.json"))) == 4


def test_rescoring_with_another_unit_size_or_over_the_old_layout_keeps_one_score_per_row(tmp_path, exported):
    _, export_dir = exported
    one_file_of_row_groups(tmp_path / "x.parquet")
    out = tmp_path / "scores"
    common = ["--model", str(export_dir), "--input", str(tmp_path / "x.parquet"), "--quiet", "--output", str(out)]
    assert main(common + ["serving.unit_rows=15"]) == 0  # 4 units
    # The layout before units: one output and marker per file, named part-<file>-<stem> (here a copy of all
    # rows, as that layout held them).
    pq.write_table(read_output(out), out / "part-00000-x.parquet")
    (out / "_done" / "part-00000-x.json").write_text(json.dumps({"model_version": "old", "rows_in": 45}))
    # Resume with 2 units of another extent: units 0000/0001 are redone, 0002/0003 and the old file removed.
    assert main(common + ["--resume", "serving.unit_rows=30"]) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000-0000-x.parquet", "part-00000-0001-x.parquet"]
    assert sorted(p.name for p in (out / "_done").glob("*.json")) == ["part-00000-0000-x.json",
                                                                      "part-00000-0001-x.json"]
    assert read_output(out)["source_row"].to_pylist() == list(range(45))
    assert [json.loads(p.read_text())["rows"] for p in sorted((out / "_done").glob("*.json"))] == [[0, 28], [28, 45]]
    # Another job's file in the same folder (another stem) is left alone.
    pq.write_table(read_output(out).slice(0, 1), out / "part-00000-0000-other.parquet")
    assert main(common + ["--resume", "serving.unit_rows=30"]) == 0
    assert (out / "part-00000-0000-other.parquet").is_file()


def test_query_len_and_title_len_are_the_lengths_as_read_not_after_the_cut(tmp_path, exported):
    """Text over data.max_chars is cut before scoring; query_len and title_len must still show the input's
    own length (drift monitoring watches for extreme inputs), and the rows stay scored."""
    _, export_dir = exported
    raw = wdc_raw(per_category=3, categories=["cameras"])
    left, right = raw["left"].to_pylist(), raw["right"].to_pylist()
    left[0], right[1] = "q" * 100_000, "t " * 2_500
    raw = raw.set_column(raw.schema.get_field_index("left"), "left", pa.array(left, pa.string()))
    raw = raw.set_column(raw.schema.get_field_index("right"), "right", pa.array(right, pa.string()))
    (tmp_path / "in").mkdir()
    pq.write_table(raw, tmp_path / "in" / "long.parquet")
    out = tmp_path / "scores"
    assert main(["--model", str(export_dir), "--input", str(tmp_path / "in"), "--output", str(out), "--quiet",
                 "data.max_chars=1000"]) == 0
    scored = read_output(out)
    assert scored.num_rows == 3 and scored["status"].to_pylist() == ["scored"] * 3
    assert scored["query_len"].to_pylist() == [len(q) for q in left]
    assert scored["title_len"].to_pylist() == [len(t) for t in right]
    assert scored["query_len"].to_pylist()[0] == 100_000 and scored["title_len"].to_pylist()[1] == 5_000
