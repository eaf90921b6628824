"""Ingestion on real Parquet under tmp_path: every row accounted for, bad input named, leak-free splits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from kernel.config import SyntheticConfig, config_from_dict
from kernel.errors import ConfigError, DataError, RejectRateExceeded
from kernel.hashing import stable_hash
from pipeline.ingest import OUTPUT_FILES, main, read_validated, run_ingest
from pipeline.reader import ParquetSource, build_filter
from pipeline.split import SPLITS, assign_splits
from pipeline.synthetic import generate

MAX_CHARS = 60


def make_cfg(**data) -> object:
    base = {"max_chars": MAX_CHARS, "overlong": "reject", "max_reject_rate": 1.0, "batch_rows": 64}
    base.update(data)
    return config_from_dict({"data": base})


def read_outputs(out: Path) -> tuple[pa.Table, pa.Table]:
    accepted = pa.concat_tables([pq.read_table(out / f"{s}.parquet") for s in SPLITS])
    return accepted, pq.read_table(out / "quarantine.parquet")


def messy_files(folder: Path, seed: int) -> dict[tuple[str, int], str | None]:
    """Two files with one known defect per bad row; returns the expected reason per (file, row)."""
    rng = np.random.default_rng(seed)
    n = 300
    query = [f"query {i} {rng.integers(10**6)}" for i in range(n)]
    title = [f"Title {i}".encode() for i in range(n)]
    desc = [f"description {i}" for i in range(n)]
    label = [int(x) for x in rng.integers(0, 2, n)]
    scenario = [str(x) for x in rng.choice(["us", "uk"], n)]
    expected: list[str | None] = [None] * n
    defects = {
        "null_query": lambda i: query.__setitem__(i, None),
        "empty_query": lambda i: query.__setitem__(i, " \t "),
        "null_title": lambda i: title.__setitem__(i, None),
        "empty_title": lambda i: title.__setitem__(i, b""),
        "invalid_utf8": lambda i: title.__setitem__(i, b"caf\xe9 \xff broken"),
        "bad_label": lambda i: label.__setitem__(i, int(rng.choice([2, -1, 7]))),
        "null_label": lambda i: label.__setitem__(i, None),
        "unknown_scenario": lambda i: scenario.__setitem__(i, "fr"),
        "null_scenario": lambda i: scenario.__setitem__(i, None),
        "overlong": lambda i: desc.__setitem__(i, "x" * (MAX_CHARS + 1)),
    }
    bad_rows = rng.choice(n, size=60, replace=False)
    for k, i in enumerate(bad_rows):
        reason = list(defects)[k % len(defects)]
        defects[reason](int(i))
        expected[int(i)] = reason
    clean = [i for i in range(n) if expected[i] is None]
    # An exact duplicate inside file a: the later copy goes.
    src, dst = clean[0], clean[1]
    query[dst], title[dst], desc[dst], label[dst], scenario[dst] = query[src], title[src], desc[src], label[src], scenario[src]
    expected[dst] = "duplicate"
    a = folder / "a.parquet"
    pq.write_table(pa.table({
        "query": pa.array(query, pa.string()), "title": pa.array(title, pa.binary()), "description": desc,
        "url": pa.array([""] * n), "label": pa.array(label, pa.int64()), "scenario": scenario,
    }), a, row_group_size=50)
    out = {(str(a), i): r for i, r in enumerate(expected)}
    # File b: exact copies of rows of a (duplicates), copies with the other label (conflicts), new rows,
    # and a label column stored as text.
    dups, conflicts = clean[2:22], clean[22:32]
    rows_b: list[tuple] = []
    for i in dups:
        rows_b.append((query[i], title[i], desc[i], str(label[i]), scenario[i], "duplicate"))
    for i in conflicts:
        rows_b.append((query[i], title[i], desc[i], str(1 - label[i]), scenario[i], "conflicting_label"))
        out[(str(a), i)] = "conflicting_label"
    for j in range(30):
        rows_b.append((f"fresh {j}", f"Fresh title {j}".encode(), "", [" 1 ", "0", "1.0"][j % 3], "uk", None))
    rows_b.append(("typed 1", b"T", "", "yes", "us", "bad_type"))
    rows_b.append(("typed 2", b"T", "", "", "us", "bad_type"))
    b = folder / "b.parquet"
    cols = list(zip(*rows_b))
    pq.write_table(pa.table({
        "query": pa.array(cols[0], pa.string()), "title": pa.array(cols[1], pa.binary()), "description": cols[2],
        "url": pa.array([""] * len(rows_b)), "label": pa.array(cols[3], pa.string()), "scenario": cols[4],
    }), b)
    out.update({(str(b), i): r[5] for i, r in enumerate(rows_b)})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_row_is_accepted_or_quarantined_with_its_reason(tmp_path, seed):
    data = tmp_path / "in"
    data.mkdir()
    expected = messy_files(data, seed)
    report = run_ingest(make_cfg(scenarios=["uk", "us"]), data, tmp_path / "out")
    accepted, quarantined = read_outputs(tmp_path / "out")

    assert report.rows_in == len(expected)
    assert report.rows_accepted + report.rows_quarantined == report.rows_in
    assert (accepted.num_rows, quarantined.num_rows) == (report.rows_accepted, report.rows_quarantined)
    got = {(f, r): None for f, r in zip(accepted["source_file"].to_pylist(), accepted["source_row"].to_pylist())}
    got.update({(f, r): why for f, r, why in zip(quarantined["source_file"].to_pylist(),
                                                quarantined["source_row"].to_pylist(),
                                                quarantined["reason"].to_pylist())})
    assert len(got) == accepted.num_rows + quarantined.num_rows  # no row twice
    assert got == expected
    counts = pc.value_counts(quarantined["reason"]).to_pylist()
    assert report.by_reason == {c["values"]: c["counts"] for c in counts}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_in"] == report.rows_in
    assert sum(s["quarantined"] for s in stats["by_scenario"].values()) == report.rows_quarantined
    # The invalid bytes survive in the quarantine, escaped, and every accepted label is 0/1.
    bad_titles = pc.filter(quarantined["title"], pc.equal(quarantined["reason"], "invalid_utf8")).to_pylist()
    assert bad_titles and all("\\xff" in t for t in bad_titles)
    assert set(accepted["label"].to_pylist()) <= {0, 1}


def test_overlong_text_is_truncated_and_flagged(tmp_path):
    long = "é" * (MAX_CHARS + 10)
    pq.write_table(pa.table({"query": ["short", long], "title": ["t1", "t2"], "description": [long, None],
                             "url": [None, ""], "label": [0, 1], "scenario": ["us", "us"]}), tmp_path / "x.parquet")
    report = run_ingest(make_cfg(overlong="truncate"), tmp_path / "x.parquet", tmp_path / "out")
    accepted, _ = read_outputs(tmp_path / "out")
    rows = {r["source_row"]: r for r in accepted.to_pylist()}
    assert report.rows_quarantined == 0 and len(rows) == 2
    assert rows[0]["truncated"] and rows[0]["description"] == "é" * MAX_CHARS
    assert rows[1]["truncated"] and rows[1]["query"] == "é" * MAX_CHARS and rows[1]["description"] == ""
    assert report.stats["truncated_rows"] == 2
    assert report.by_scenario["us"]["text_chars"]["query"]["max"] == MAX_CHARS


def test_graded_labels_weights_keys_and_constant_scenario(tmp_path):
    pq.write_table(pa.table({
        "q": ["a", "b", "c", "d", "e", "f"], "ad": ["t"] * 6, "grade": [0.0, 2.0, 3.0, 4.0, float("nan"), 3.5],
        "w": [1.0, 0.5, 2.0, -1.0, 1.0, None], "req": pa.array([10, 11, 12, 13, 14, 15], pa.int64()),
    }), tmp_path / "graded.parquet")
    cfg = config_from_dict({"data": {"max_reject_rate": 1.0, "columns": {
        "query": "q", "title": "ad", "description": None, "url": None, "label": "grade", "label_threshold": 2.5,
        "scenario": None, "scenario_constant": "search", "weight": "w", "keys": ["req"]}}})
    report = run_ingest(cfg, tmp_path / "graded.parquet", tmp_path / "out")
    accepted, quarantined = read_outputs(tmp_path / "out")
    got = {r["req"]: (r["label"], r["weight"]) for r in accepted.to_pylist()}
    assert got == {10: (0, 1.0), 11: (0, 0.5), 12: (1, 2.0)}
    assert accepted.schema.field("req").type == pa.int64()
    assert dict(zip(quarantined["req"].to_pylist(), quarantined["reason"].to_pylist())) == {
        "13": "bad_weight", "14": "bad_label", "15": "bad_weight"}
    assert report.scenarios == ["search"]


def write_hive(root: Path) -> dict[str, int]:
    sizes = {"us": 120, "uk": 80, "de": 50}
    for market, n in sizes.items():
        (root / f"market={market}").mkdir(parents=True)
        pq.write_table(pa.table({
            "query": [f"{market} q{i}" for i in range(n)], "title": [f"ad {i}" for i in range(n)],
            "label": pa.array([i % 2 for i in range(n)], pa.int8()), "rank": pa.array(list(range(n)), pa.int64()),
        }), root / f"market={market}" / "part-0.parquet", row_group_size=20)
    return sizes


def test_hive_partitions_give_the_scenario_and_filters_prune_partitions_and_row_groups(tmp_path):
    sizes = write_hive(tmp_path / "hive")
    cols = {"description": None, "url": None, "scenario": None, "scenario_from_partition": "market"}
    cfg = make_cfg(columns=cols, filters={"market": ["us", "de"], "rank": list(range(30, 45))})
    src = ParquetSource.open(tmp_path / "hive")
    parts = src.parts(build_filter(cfg.data.filters))
    assert sorted(p.partition["market"] for p in parts) == ["de", "us"]  # uk never opened
    assert all(p.row_groups == [1, 2] for p in parts)  # rows 30..44 live in row groups 1 and 2 only
    report = run_ingest(cfg, tmp_path / "hive", tmp_path / "out")
    accepted, _ = read_outputs(tmp_path / "out")
    assert report.rows_in == report.rows_accepted == 2 * 15
    for row in accepted.to_pylist():  # source_row is the row's position in its file, despite the filter
        assert row["query"] == f"{row['scenario']} q{row['source_row']}" and 30 <= row["source_row"] < 45
    # Without a filter every partition comes in, scenarios from the path.
    report = run_ingest(make_cfg(columns=cols), tmp_path / "hive", tmp_path / "all")
    assert {s: v["rows"] for s, v in report.by_scenario.items()} == sizes


def only_inputs_left(tmp_path: Path, inputs: set[str]) -> bool:
    return {p.name for p in tmp_path.iterdir()} == inputs


@pytest.mark.parametrize("case", ["corrupt", "not_parquet", "missing_column", "wrong_type"])
def test_broken_input_names_file_and_column_and_leaves_nothing(tmp_path, case):
    data = tmp_path / "in"
    data.mkdir()
    good = pa.table({"query": ["q"], "title": ["t"], "description": [""], "url": [""], "label": [1], "scenario": ["us"]})
    pq.write_table(good, data / "a.parquet")
    bad = data / "b.parquet"
    if case == "corrupt":
        bytes_ = (data / "a.parquet").read_bytes()
        bad.write_bytes(bytes_[: len(bytes_) // 2] + b"\x00" * 16 + bytes_[-8:])
        words = [str(bad)]
    elif case == "not_parquet":
        bad = data / "notes.csv"
        bad.write_text("query,title\nq,t\n")
        words = [str(bad), "not a readable Parquet file"]
    elif case == "missing_column":
        pq.write_table(good.drop_columns(["title"]), bad)
        words = [str(bad), "'title'", "missing"]
    else:
        pq.write_table(good.set_column(0, "query", pa.array([7], pa.int64())), bad)
        words = [str(bad), "'query'", "int64"]
    with pytest.raises(DataError) as err:
        run_ingest(make_cfg(), data, tmp_path / "out")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert only_inputs_left(tmp_path, {"in"})
    assert only_inputs_left(data, {"a.parquet", bad.name})


def test_reject_rate_over_threshold_fails_clearly_and_writes_only_the_rejected_rows(tmp_path):
    pq.write_table(pa.table({"query": ["a", "b", "c", None], "title": ["t"] * 4, "description": [""] * 4,
                             "url": [""] * 4, "label": [0, 1, 5, 1], "scenario": ["us"] * 4}), tmp_path / "x.parquet")
    with pytest.raises(RejectRateExceeded) as err:
        run_ingest(make_cfg(max_reject_rate=0.25), tmp_path / "x.parquet", tmp_path / "out")
    msg = str(err.value)
    assert "50.00%" in msg and "25.00%" in msg and "bad_label" in msg and "null_query" in msg and "row 2" in msg
    assert "in column 'label'" in msg and "in column 'query'" in msg
    # No splits: only the quarantine and its counts, kept for inspection under out/_rejected.
    assert only_inputs_left(tmp_path, {"x.parquet", "out"}) and only_inputs_left(tmp_path / "out", {"_rejected"})
    assert only_inputs_left(tmp_path / "out" / "_rejected", {"quarantine.parquet", "stats.json"})


def test_bad_filter_and_split_key_are_config_errors(tmp_path):
    generate(tmp_path / "s.parquet", SyntheticConfig(rows_per_scenario=50))
    with pytest.raises(ConfigError, match="data.filters"):
        run_ingest(make_cfg(filters={"nope": ["x"]}), tmp_path / "s.parquet", tmp_path / "out")
    with pytest.raises(ConfigError, match="data.split.key"):
        run_ingest(make_cfg(split={"key": "nope"}), tmp_path / "s.parquet", tmp_path / "out")


def test_stable_hash_is_independent_of_layout_and_type():
    values = [f"query number {i}" for i in range(20000)] + ["", "ü ñ 東京"]
    h = stable_hash(pa.array(values))
    assert h.dtype == np.uint64 and len(np.unique(h)) == len(values)
    chunked = pa.chunked_array([pa.array(values[:7]), pa.array(values[7:])])
    assert np.array_equal(stable_hash(chunked), h)
    assert np.array_equal(stable_hash(pa.array(values).slice(5)), h[5:])
    assert np.array_equal(stable_hash(pa.array(values, pa.large_string())), h)
    assert np.array_equal(stable_hash(pa.array([v.encode() for v in values], pa.binary())), h)
    assert np.array_equal(stable_hash(pa.array(values).dictionary_encode()), h)
    with_null = stable_hash(pa.array(["a", None, "a", None]))
    assert with_null[0] == with_null[2] and with_null[1] == with_null[3] != with_null[0]


def test_split_fractions_follow_the_config():
    h = stable_hash(pa.array([f"k{i}" for i in range(50000)]))
    codes = assign_splits(h, 0.2, 0.1, seed=3)
    frac = np.bincount(codes, minlength=3) / len(codes)
    assert np.allclose(frac, [0.7, 0.2, 0.1], atol=0.01)
    assert not np.array_equal(codes, assign_splits(h, 0.2, 0.1, seed=4))


def test_split_is_leak_free_deterministic_and_layout_independent(tmp_path):
    generate(tmp_path / "s.parquet", SyntheticConfig(rows_per_scenario=400, seed=1))
    cfg = make_cfg(max_chars=1000, columns={"keys": ["request_id"]})
    run_ingest(cfg, tmp_path / "s.parquet", tmp_path / "one")
    run_ingest(cfg, tmp_path / "s.parquet", tmp_path / "two")
    split_of = {}
    for s in SPLITS:
        t1, t2 = pq.read_table(tmp_path / "one" / f"{s}.parquet"), pq.read_table(tmp_path / "two" / f"{s}.parquet")
        assert t1.equals(t2)
        for q in set(t1["query"].to_pylist()):
            assert split_of.setdefault(q, s) == s, f"query {q!r} is in two splits"
    # The same rows, shuffled into three files: every query keeps its split.
    table = pq.read_table(tmp_path / "s.parquet")
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    (tmp_path / "parts").mkdir()
    for i in range(3):
        pq.write_table(table.slice(i * 600, 600), tmp_path / "parts" / f"p{i}.parquet")
    run_ingest(cfg, tmp_path / "parts", tmp_path / "three")
    for s in SPLITS:
        for q in pq.read_table(tmp_path / "three" / f"{s}.parquet")["query"].to_pylist():
            assert split_of[q] == s


def test_stats_match_the_written_rows(tmp_path):
    generate(tmp_path / "s.parquet", SyntheticConfig(rows_per_scenario=300, seed=2))
    report = run_ingest(make_cfg(max_chars=1000), tmp_path / "s.parquet", tmp_path / "out")
    accepted, _ = read_outputs(tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats == report.stats and report.scenarios == ["de", "jp", "uk", "us"]
    for name, s in stats["by_scenario"].items():
        rows = accepted.filter(pc.equal(accepted["scenario"], name))
        assert s["rows"] == rows.num_rows
        assert s["positive_rate"] == pytest.approx(np.mean(rows["label"].to_numpy()), abs=1e-6)
        for field in ("query", "title", "description"):
            lengths = pc.utf8_length(rows[field]).to_numpy()
            for q in (5, 50, 95, 99):
                assert s["text_chars"][field][f"p{q:02d}"] == np.quantile(lengths, q / 100, method="inverted_cdf")
    assert sum(stats["splits"].values()) == report.rows_accepted
    assert json.loads((tmp_path / "out" / "task_map.json").read_text())["scenarios"] == report.scenarios


def test_stats_are_logged_to_a_real_mlflow(tmp_path):
    from mlflow import MlflowClient

    from kernel.mlflow_client import MlflowTracker

    generate(tmp_path / "s.parquet", SyntheticConfig(rows_per_scenario=100))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "ingest-test")
    tracker.start(run_name="ingest")
    report = run_ingest(make_cfg(max_chars=1000), tmp_path / "s.parquet", tmp_path / "out", tracker=tracker)
    tracker.end()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["source/rows_in"] == report.rows_in
    assert run.data.metrics["source/positive_rate/us"] == pytest.approx(report.by_scenario["us"]["positive_rate"])
    logged = client.download_artifacts(tracker.run_id, "ingest/stats.json", str(tmp_path / "dl"))
    assert json.loads(Path(logged).read_text()) == report.stats


def test_read_validated_streams_every_row_once_for_scoring(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    expected = messy_files(data, seed=5)
    unlabeled = pa.table({"query": ["x", "y", "z"], "title": ["t", "", "t"], "description": ["", "", ""],
                          "url": ["", "", ""], "scenario": ["us", "us", "de"]})
    pq.write_table(unlabeled, data / "c.parquet")
    cfg = make_cfg()
    pairs = list(read_validated(cfg, data, scenarios=["uk", "us"]))
    accepted = pa.Table.from_batches([a for a, _ in pairs])
    quarantined = pa.Table.from_batches([q for _, q in pairs])
    assert accepted.num_rows + quarantined.num_rows == len(expected) + 3
    seen = list(zip(accepted["source_file"].to_pylist(), accepted["source_row"].to_pylist()))
    seen += list(zip(quarantined["source_file"].to_pylist(), quarantined["source_row"].to_pylist()))
    assert len(set(seen)) == len(seen)
    reasons = dict(zip(zip(quarantined["source_file"].to_pylist(), quarantined["source_row"].to_pylist()),
                       quarantined["reason"].to_pylist()))
    c = str(data / "c.parquet")
    assert reasons[(c, 1)] == "empty_title" and reasons[(c, 2)] == "unknown_scenario"
    assert "duplicate" not in reasons.values()  # no cross-file checks by default: one answer per input row
    unl = accepted.filter(pc.equal(accepted["source_file"], c))
    assert unl["label"].null_count == unl.num_rows == 1
    # With dedupe, the known duplicates and conflicts are quarantined too.
    pairs = list(read_validated(cfg, data, scenarios=["uk", "us"], dedupe=True))
    q = pa.Table.from_batches([q for _, q in pairs])
    want = {k: v for k, v in expected.items() if v in ("duplicate", "conflicting_label")}
    got = {(f, r): why for f, r, why in zip(q["source_file"].to_pylist(), q["source_row"].to_pylist(),
                                           q["reason"].to_pylist()) if why in ("duplicate", "conflicting_label")}
    assert got == want


def test_cli_ingests_synthetic_data(tmp_path, capsys):
    work = tmp_path / "work"
    rc = main(["--input", "synthetic", "--out", str(tmp_path / "out"), f"work_dir={work}", "tracking.enabled=false",
               "data.synthetic.rows_per_scenario=60"])
    assert rc == 0 and "240 rows in" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUT_FILES)
    assert main(["--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "tracking.enabled=false"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "python -m pipeline.ingest" in capsys.readouterr().out


def test_dedupe_compares_whole_fields_and_keeps_the_first():
    from pipeline.dedupe import find_duplicates
    from pipeline.validate import CODE

    t = pa.table({"query": ["a b", "a", "a b", "a b", "q", "q"], "title": ["c", "b c", "c", "c", "t", "t"],
                  "description": [""] * 6, "url": [""] * 6, "scenario": ["us"] * 5 + ["uk"],
                  "label": pa.array([1, 1, 1, 0, 0, 1], pa.int8())})
    # rows 0, 2, 3 share every field but disagree on the label; 4 and 5 differ by scenario only.
    codes = find_duplicates(t)
    conflict = CODE["conflicting_label"]
    assert codes.tolist() == [conflict, 0, conflict, conflict, 0, 0]
    assert find_duplicates(t.slice(0, 3)).tolist() == [0, 0, CODE["duplicate"]]
