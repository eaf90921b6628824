"""Every row is accounted for, and gates fail loudly: labels at scoring time, quarantine/reject-rate gates,
all-null and absent columns, partition folders as inputs, and the exit codes of the ingest and scoring CLIs.

Ingestion tests write small Parquet files under tmp_path; scoring tests use real WDC rows and a tiny
exported model (serving_testkit)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from kernel.config import config_from_dict
from kernel.errors import ConfigError, DataError, RejectRateExceeded
from kernel.exit_codes import BAD_INPUT, DATA_GATE, OK
from pipeline.ingest import main as ingest_main
from pipeline.ingest import run_ingest
from pipeline.split import SPLITS
from serving.scoring.cli import main as score_main
from tests.serving_testkit import SCENARIOS, export, trained_folder, wdc_raw


def cfg_of(**data):
    return config_from_dict({"data": {"max_reject_rate": 1.0, **data}, "tracking": {"enabled": False}})


def rows(n: int, **overrides) -> pa.Table:
    """n clean canonical rows (distinct queries), with columns replaced/added by ``overrides``."""
    cols = {"query": [f"q{i}" for i in range(n)], "title": [f"t{i}" for i in range(n)],
            "description": [""] * n, "url": [""] * n, "label": pa.array([i % 2 for i in range(n)], pa.int64()),
            "scenario": ["us"] * n}
    cols.update(overrides)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def accepted_of(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / f"{s}.parquet") for s in SPLITS])


# ---------------------------------------------------------------------------------------------------------
# Ingestion


def test_all_null_columns_are_nulls_of_the_right_type(tmp_path):
    """A column written entirely of None (Arrow type null) is not a file error: required fields quarantine
    with their usual reason, optional ones are accepted as empty/default."""
    n = 6
    (tmp_path / "in").mkdir()
    pq.write_table(rows(n, title=pa.nulls(n)), tmp_path / "in" / "no_title.parquet")
    pq.write_table(rows(n, query=[f"other {i}" for i in range(n)]), tmp_path / "in" / "good.parquet")
    pq.write_table(rows(n, description=pa.nulls(n), url=pa.nulls(n), w=pa.nulls(n), req=pa.nulls(n)),
                   tmp_path / "no_optional.parquet")
    report = run_ingest(cfg_of(), tmp_path / "in", tmp_path / "a")
    assert report.by_reason == {"null_title": n} and report.rows_accepted == n
    q = pq.read_table(tmp_path / "a" / "quarantine.parquet")
    assert set(q["column"].to_pylist()) == {"title"}
    cfg = cfg_of(columns={"weight": "w", "keys": ["req"]})
    report = run_ingest(cfg, tmp_path / "no_optional.parquet", tmp_path / "b")
    assert report.rows_accepted == n and report.rows_quarantined == 0
    acc = accepted_of(tmp_path / "b")
    assert set(acc["description"].to_pylist()) == {""} and set(acc["url"].to_pylist()) == {""}
    assert set(acc["weight"].to_pylist()) == {1.0} and acc["req"].null_count == n


def test_all_null_label_quarantines_as_null_label(tmp_path):
    n = 4
    pq.write_table(rows(n, label=pa.nulls(n)), tmp_path / "x.parquet")
    with pytest.raises(DataError):  # every row bad: an error, not empty splits (see below)
        run_ingest(cfg_of(), tmp_path / "x.parquet", tmp_path / "out")
    q = pq.read_table(tmp_path / "out" / "_rejected" / "quarantine.parquet")
    assert q["reason"].to_pylist() == ["null_label"] * n and q["column"].to_pylist() == ["label"] * n


def test_reject_rate_failure_keeps_the_quarantine_and_the_earlier_outputs(tmp_path):
    out = tmp_path / "out"
    pq.write_table(rows(20), tmp_path / "good.parquet")
    run_ingest(cfg_of(), tmp_path / "good.parquet", out)  # an earlier good run
    before = {s: (out / f"{s}.parquet").read_bytes() for s in SPLITS}
    labels = pa.array([0, 1, 5, None] * 5, pa.int64())
    pq.write_table(rows(20, label=labels), tmp_path / "bad.parquet")
    with pytest.raises(RejectRateExceeded) as err:
        run_ingest(cfg_of(max_reject_rate=0.25), tmp_path / "bad.parquet", out)
    rejected = out / "_rejected"
    assert str(rejected / "quarantine.parquet") in str(err.value)
    q = pq.read_table(rejected / "quarantine.parquet")
    assert sorted(set(q["reason"].to_pylist())) == ["bad_label", "null_label"] and q.num_rows == 10
    stats = json.loads((rejected / "stats.json").read_text())
    assert stats["rows_in"] == 20 and stats["rows_quarantined"] == 10
    assert {s: (out / f"{s}.parquet").read_bytes() for s in SPLITS} == before  # earlier outputs untouched
    # A later good run clears the stale _rejected folder.
    run_ingest(cfg_of(), tmp_path / "good.parquet", out)
    assert not rejected.exists()


def test_bad_type_names_the_column_in_the_quarantine_and_the_message(tmp_path):
    pq.write_table(rows(20, label=None, rating=["1", "0", "yes", "1", "0"] * 4), tmp_path / "x.parquet")
    cfg = cfg_of(max_reject_rate=0.05, columns={"label": "rating"})
    with pytest.raises(RejectRateExceeded) as err:
        run_ingest(cfg, tmp_path / "x.parquet", tmp_path / "out")
    assert "row 2: bad_type in column 'rating'" in str(err.value), str(err.value)
    q = pq.read_table(tmp_path / "out" / "_rejected" / "quarantine.parquet")
    assert q.schema.field("column").type == pa.string()
    assert set(zip(q["reason"].to_pylist(), q["column"].to_pylist())) == {("bad_type", "rating")}


def test_duplicates_have_an_empty_column_and_bad_utf8_names_its_column(tmp_path):
    t = rows(4, title=pa.array([b"a", b"b\xff", b"c", b"a"], pa.binary()),
             query=["q0", "q1", "q2", "q0"], label=pa.array([1, 0, 1, 1], pa.int64()))
    pq.write_table(t, tmp_path / "x.parquet")
    run_ingest(cfg_of(), tmp_path / "x.parquet", tmp_path / "out")
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").sort_by("source_row")
    assert list(zip(q["reason"].to_pylist(), q["column"].to_pylist())) == [("invalid_utf8", "title"),
                                                                         ("duplicate", "")]


def test_every_row_bad_is_an_error_even_with_the_gate_open(tmp_path):
    pq.write_table(rows(5, query=pa.array([None] * 5, pa.string())), tmp_path / "x.parquet")
    with pytest.raises(DataError) as err:
        run_ingest(cfg_of(max_reject_rate=1.0), tmp_path / "x.parquet", tmp_path / "out")
    assert not isinstance(err.value, RejectRateExceeded)
    msg = str(err.value)
    assert str(tmp_path / "x.parquet") in msg and "null_query" in msg and "_rejected" in msg, msg
    assert (tmp_path / "out" / "_rejected" / "quarantine.parquet").is_file()
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_reject_rate_equal_to_the_threshold_passes(tmp_path):
    one = rows(20, label=pa.array([7] + [0, 1] * 9 + [1], pa.int64()))  # 1 bad row in 20 = 5%
    two = rows(20, label=pa.array([7, 7] + [0, 1] * 9, pa.int64()))  # 2 in 20 = 10%
    pq.write_table(one, tmp_path / "one.parquet")
    pq.write_table(two, tmp_path / "two.parquet")
    report = run_ingest(cfg_of(max_reject_rate=0.05), tmp_path / "one.parquet", tmp_path / "a")
    assert report.reject_rate == 0.05 and report.rows_quarantined == 1
    with pytest.raises(RejectRateExceeded):
        run_ingest(cfg_of(max_reject_rate=0.05), tmp_path / "two.parquet", tmp_path / "b")


def test_absent_default_optional_columns_are_empty_and_named_ones_say_how_to_unset(tmp_path):
    pq.write_table(rows(6, description=None, url=None), tmp_path / "x.parquet")
    report = run_ingest(cfg_of(), tmp_path / "x.parquet", tmp_path / "out")  # no config change needed
    assert report.rows_accepted == 6
    assert set(accepted_of(tmp_path / "out")["description"].to_pylist()) == {""}
    with pytest.raises(DataError) as err:
        run_ingest(cfg_of(columns={"description": "body"}), tmp_path / "x.parquet", tmp_path / "o2")
    msg = str(err.value)
    assert "'body'" in msg and "data.columns.description: null" in msg, msg


def test_a_scenario_source_set_by_the_user_replaces_the_default_column():
    c = cfg_of(columns={"scenario_from_partition": "market"}).data.columns
    assert (c.scenario, c.scenario_from_partition) == (None, "market")
    c = cfg_of(columns={"scenario_constant": "search"}).data.columns
    assert (c.scenario, c.scenario_constant) == (None, "search")
    with pytest.raises(ConfigError) as err:
        cfg_of(columns={"scenario": "category", "scenario_constant": "search"})
    msg = str(err.value)
    assert "scenario='category'" in msg and "scenario_constant='search'" in msg and ": null" in msg, msg
    with pytest.raises(ConfigError, match="scenario_from_partition"):
        cfg_of(columns={"scenario": None})


def write_market_hive(root: Path) -> None:
    for market, n in {"us": 12, "uk": 8}.items():
        (root / f"market={market}").mkdir(parents=True)
        pq.write_table(rows(n, scenario=None, query=[f"{market} {i}" for i in range(n)]),
                       root / f"market={market}" / "part-0.parquet")


def test_ingesting_one_partition_folder_or_file_takes_the_scenario_from_its_path(tmp_path):
    write_market_hive(tmp_path / "traffic")
    cfg = cfg_of(columns={"scenario_from_partition": "market"})
    report = run_ingest(cfg, tmp_path / "traffic" / "market=us", tmp_path / "a")
    assert report.scenarios == ["us"] and report.rows_accepted == 12
    report = run_ingest(cfg, tmp_path / "traffic" / "market=uk" / "part-0.parquet", tmp_path / "b")
    assert report.scenarios == ["uk"] and report.rows_accepted == 8
    # data.filters on the key still prune: the us folder has no uk rows.
    with pytest.raises(DataError, match="no rows"):
        run_ingest(cfg_of(columns={"scenario_from_partition": "market"}, filters={"market": ["uk"]}),
                   tmp_path / "traffic" / "market=us", tmp_path / "c")


def test_ingest_cli_exit_codes(tmp_path, capsys):
    pq.write_table(rows(20, label=pa.array([7, 7] + [0, 1] * 9, pa.int64())), tmp_path / "x.parquet")
    common = ["--input", str(tmp_path / "x.parquet"), "tracking.enabled=false", f"work_dir={tmp_path / 'w'}"]
    assert ingest_main(common + ["--out", str(tmp_path / "a"), "data.max_reject_rate=0.05"]) == DATA_GATE
    assert "data.max_reject_rate" in capsys.readouterr().err
    assert ingest_main(common + ["--out", str(tmp_path / "b"), "data.max_reject_rate=0.1"]) == OK
    pq.write_table(rows(3, query=None), tmp_path / "y.parquet")
    assert ingest_main(["--input", str(tmp_path / "y.parquet"), "--out", str(tmp_path / "c"),
                        "tracking.enabled=false"]) == BAD_INPUT
    assert "'query'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Scoring


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    export(trained_folder(root, "mean"), root / "export")
    return root / "export"


def score(export_dir: Path, inputs: list, out: Path, *extra: str) -> int:
    return score_main(["--model", str(export_dir), "--output", str(out), "--quiet",
                       "--input", *map(str, inputs), *extra])


def scored_of(out: Path) -> pa.Table:
    return ds.dataset(out, format="parquet").to_table().sort_by([("source_file", "ascending"),
                                                                  ("source_row", "ascending")])


def test_scoring_never_drops_rows_over_the_label(tmp_path, export_dir):
    raw = wdc_raw(per_category=14, categories=SCENARIOS[:2]).slice(0, 20)
    raw = pa.concat_tables([raw, wdc_raw(per_category=20, categories=SCENARIOS[2:])])  # 40 rows
    words = raw.set_column(2, "label", pa.array(["yes", "no"] * 20))
    pq.write_table(words, tmp_path / "words.parquet")
    assert score(export_dir, [tmp_path / "words.parquet"], tmp_path / "s1") == OK
    s = scored_of(tmp_path / "s1")
    assert s.num_rows == 40 and s["label"].null_count == 40 and all(s["label_invalid"].to_pylist())
    assert not (tmp_path / "s1" / "_quarantine").exists() or \
        ds.dataset(tmp_path / "s1" / "_quarantine", format="parquet").count_rows() == 0
    # Null and out-of-domain labels: still scored; only a present-but-unusable value is flagged.
    labels = [1, None, 7, 0] * 10
    pq.write_table(raw.set_column(2, "label", pa.array(labels, pa.int64())), tmp_path / "mixed.parquet")
    assert score(export_dir, [tmp_path / "mixed.parquet"], tmp_path / "s2") == OK
    s = scored_of(tmp_path / "s2")
    assert s.num_rows == 40
    assert s["label"].to_pylist() == [1, None, None, 0] * 10
    assert s["label_invalid"].to_pylist() == [False, False, True, False] * 10
    # Ingestion (training data) still quarantines such rows.
    from tests.serving_testkit import tiny_config

    cfg = tiny_config(tmp_path)
    cfg.data.max_reject_rate = 1.0
    report = run_ingest(cfg, tmp_path / "mixed.parquet", tmp_path / "ingested")
    assert report.by_reason == {"null_label": 10, "bad_label": 10}


def test_quarantine_rate_gate_keeps_the_scores_and_exits_data_gate(tmp_path, export_dir, capsys):
    known = wdc_raw(per_category=10, categories=["cameras"])
    unknown = wdc_raw(per_category=10, categories=["watches"])  # unseen by the model: quarantined
    pq.write_table(pa.concat_tables([known, unknown]), tmp_path / "half.parquet")
    out = tmp_path / "scores"
    assert score(export_dir, [tmp_path / "half.parquet"], out) == DATA_GATE
    err = capsys.readouterr().err
    for word in ("50.00%", "serving.max_quarantine_rate", "5.00%", "unknown_scenario", str(out)):
        assert word in err, err
    assert scored_of(out).num_rows == 10  # what was scored is written
    q = ds.dataset(out / "_quarantine", format="parquet").to_table()
    assert q.num_rows == 10 and set(q["column"].to_pylist()) == {"category"}
    assert set(q.schema.names) >= {"reason", "column", "source_file", "source_row"}
    assert score(export_dir, [tmp_path / "half.parquet"], tmp_path / "s2", "serving.max_quarantine_rate=0.5") == OK
    # With local worker processes the parent judges the whole job (the workers themselves succeed).
    assert score(export_dir, [tmp_path / "half.parquet"], tmp_path / "w2", "--workers", "2") == DATA_GATE
    assert "serving.max_quarantine_rate" in capsys.readouterr().err and scored_of(tmp_path / "w2").num_rows == 10


def test_quarantine_rate_equal_to_the_threshold_passes(tmp_path, export_dir):
    known = wdc_raw(per_category=19, categories=["shoes"])
    one_unknown = wdc_raw(per_category=1, categories=["watches"])  # 1 of 20 rows = 5%
    pq.write_table(pa.concat_tables([known, one_unknown]), tmp_path / "x.parquet")
    assert score(export_dir, [tmp_path / "x.parquet"], tmp_path / "a", "serving.max_quarantine_rate=0.05") == OK
    assert score(export_dir, [tmp_path / "x.parquet"], tmp_path / "b", "serving.max_quarantine_rate=0.04") == DATA_GATE


def test_unreadable_input_leaves_no_output_folder(tmp_path, export_dir, capsys):
    (tmp_path / "notes.parquet").write_text("query,title\nq,t\n")
    out = tmp_path / "scores"
    assert score(export_dir, [tmp_path / "notes.parquet"], out) == BAD_INPUT
    assert "not a readable Parquet file" in capsys.readouterr().err
    assert not out.exists()
    # A failure after the folder was made (the model's config check) removes it too ...
    pq.write_table(wdc_raw(per_category=3, categories=["shoes"]), tmp_path / "ok.parquet")
    assert score(export_dir, [tmp_path / "ok.parquet"], out, "serving.unknown_scenario=fallback",
                 "serving.fallback_scenario=nope") == BAD_INPUT
    assert not out.exists()
    # ... but never a folder that was there before.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert score(export_dir, [tmp_path / "notes.parquet"], out) == BAD_INPUT
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_scoring_one_partition_folder_takes_the_scenario_from_its_path(tmp_path, export_dir):
    traffic = tmp_path / "traffic"
    for cat in SCENARIOS:
        (traffic / f"category={cat}").mkdir(parents=True)
        pq.write_table(wdc_raw(per_category=6, categories=[cat]).drop_columns(["category"]),
                       traffic / f"category={cat}" / "part-0.parquet")
    over = ["data.columns.scenario=null", "data.columns.scenario_from_partition=category"]
    assert score(export_dir, [traffic / "category=shoes"], tmp_path / "one", *over) == OK
    s = scored_of(tmp_path / "one")
    assert s.num_rows == 6 and set(s["scenario"].to_pylist()) == {"shoes"}
    assert score(export_dir, [traffic], tmp_path / "all", *over) == OK
    assert sorted(set(scored_of(tmp_path / "all")["scenario"].to_pylist())) == SCENARIOS
