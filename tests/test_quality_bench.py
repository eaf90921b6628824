"""The quality benchmark's code path on a tiny random BERT: real DeepSpeed, real Parquet, real MLflow (sqlite)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from benchmarks import quality
from benchmarks.quality_report import BEGIN, END, insert_block, mean_std, paired_differences, summarize
from kernel.config import load_config
from modeling.inject import adapter_param_count
from modeling.model import build_model
from tests.shared import TINY_CONFIG as TINY
from tests.shared import WDC


def test_matched_rank_is_the_closest_over_all_ranks():
    rng = random.Random(0)
    for _ in range(200):
        shapes = [(rng.randint(1, 300), rng.randint(1, 300)) for _ in range(rng.randint(1, 6))]
        per_rank = sum(i + o for i, o in shapes)
        target = rng.randint(1, 40 * per_rank)
        r = quality.matched_lora_rank(shapes, target)
        best = min(abs(k * per_rank - target) for k in range(1, 50))
        assert r >= 1 and abs(r * per_rank - target) == best


def test_parameter_formulas_match_the_built_models():
    cfg = load_config(TINY, ["adapter.targets=[bert_all]"])
    shapes = quality.adapter_shapes(cfg, num_tasks=4)
    assert len(shapes) == 6 * cfg.model.random_config["num_hidden_layers"]
    target = quality.mtl_adapter_params(shapes, cfg, 4)
    assert adapter_param_count(build_model(cfg, 4))[0] == target
    r = quality.matched_lora_rank(shapes, target)
    lora = load_config(TINY, ["adapter.targets=[bert_all]", *quality.method_overrides("lora_matched", cfg, r)])
    assert lora.adapter.r == r and lora.adapter.alpha == cfg.adapter.alpha  # only the rank changes
    assert adapter_param_count(build_model(lora, 4))[0] == r * sum(i + o for i, o in shapes)


def test_wdc_splits_are_kept_and_no_evaluated_pair_was_trained_on(tmp_path):
    """The real WDC files (first rows of each) through the column mapping: given splits kept, overlaps dropped."""
    root = tmp_path / "wdc"
    for f in sorted(WDC.glob("*/*.parquet")):
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        table = pq.read_table(f).slice(0, 150)
        if f.stem == "test":  # plant a pair that is also in train: it must not be evaluated
            train = pq.read_table(f.parent / "train.parquet").slice(0, 1)
            table = pa.concat_tables([table, train.cast(table.schema)])
        pq.write_table(table, root / f.parent.name / f.name)
    cfg = load_config(None, [*quality.WDC_COLUMNS, f"data.scenarios=[{', '.join(p.name for p in sorted(root.iterdir()))}]"])
    info = quality.prepare_wdc(cfg, root, tmp_path / "data")
    splits = {s: pq.read_table(tmp_path / "data" / f"{s}.parquet") for s in ("train", "valid", "test")}
    for name, table in splits.items():
        raw = sum(pq.read_metadata(f).num_rows for f in root.glob(f"*/{name}.parquet"))
        assert info[name]["rows_in"] == raw == info[name]["accepted"] + info[name]["quarantined"]
        assert table.num_rows == info[name]["rows"] == info[name]["accepted"] - info[name].get("dropped_seen_in_train", 0)
        assert sorted(set(table["scenario"].to_pylist())) == cfg.data.scenarios
        assert all(Path(p).parent.parent == root and Path(p).name == f"{name}.parquet"
                   for p in table["source_file"].to_pylist())
        # Shuffled: the first rows already hold more than one category.
        assert len(set(table["scenario"].slice(0, 100).to_pylist())) > 1
    assert info["test"]["dropped_seen_in_train"] >= 4  # at least the planted pairs
    seen = quality._pair_keys(splits["train"])
    for name in ("valid", "test"):
        assert not pc.any(pc.is_in(quality._pair_keys(splits[name]), value_set=seen)).as_py()


def test_benchmark_end_to_end_writes_tables_plot_and_nested_runs(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    (docs / "quality.md").write_text(f"# Quality\n\nprose above\n\n{BEGIN}\nold\n{END}\n\nprose below\n")
    argv = ["--config", str(TINY), "--datasets", "synthetic", "--methods", "mtl_lora", "lora", "--seeds", "0",
            "--steps", "3", "--max-length", "32", "--eval-rows", "64", "--device", "cpu", "--out", str(out),
            "--docs", str(docs), "data.synthetic.rows_per_scenario=150", "train.micro_batch_size=8"]
    assert quality.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("mtl_lora", 0), ("lora", 0)]
    test_rows = pq.read_metadata(out / "synthetic" / "data" / "test.parquet").num_rows
    cfg = load_config(TINY, ["features.max_length=32"])
    shapes = quality.adapter_shapes(cfg, num_tasks=4)
    for r in runs:
        assert r["test_rows"] == test_rows and r["steps"] == 3  # every test row scored once
        scored = [a for a in r["test_auc"].values() if a is not None]
        assert len(r["test_auc"]) == 4 and scored
        assert r["test_auc_macro"] == pytest.approx(sum(scored) / len(scored))
        assert r["trainable_params"] > r["adapter_params"] > 0
    assert runs[0]["adapter_params"] == quality.mtl_adapter_params(shapes, cfg, 4)
    assert runs[1]["adapter_params"] == cfg.adapter.r * sum(i + o for i, o in shapes)

    # MLflow: one parent, one child per run (nested through mlflow.parentRunId), test metrics on the child.
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    parent_id = (out / "parent_run_id").read_text().strip()
    exp = client.get_experiment_by_name("quality-benchmark")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {c.info.run_id for c in children} == {r["run_id"] for r in runs}
    for c in children:
        row = next(r for r in runs if r["run_id"] == c.info.run_id)
        assert c.info.status == "FINISHED" and c.data.tags["method"] == row["method"]
        assert c.data.metrics["test/auc_macro"] == pytest.approx(row["test_auc_macro"])
    assert {a.path for a in client.list_artifacts(parent_id, "report")} >= {"report/quality.md", "report/quality.png"}

    # Reports: the block replaced between the markers, prose kept; a real PNG.
    doc = (docs / "quality.md").read_text()
    assert doc.startswith("# Quality\n\nprose above") and doc.rstrip().endswith("prose below") and "old" not in doc
    assert "| MTL-LoRA |" in doc and "| LoRA (same r) |" in doc and results["command"] in doc
    for png in (out / "quality.png", docs / "quality.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerun with the same settings: nothing retrains, the same parent; other settings are refused.
    assert quality.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    assert len(client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")) == 2
    assert quality.main([*argv[:argv.index("--steps")], "--steps", "4", *argv[argv.index("--steps") + 2:]]) == 2


def test_summary_statistics_and_pairing():
    runs = [{"dataset": "d", "method": m, "seed": s, "r": 8, "adapter_params": 10, "trainable_params": 12,
             "test_auc": {"a": auc, "b": None}, "test_auc_macro": auc, "train_s": 1.0, "samples_per_s": None}
            for m, s, auc in [("lora", 1, 0.7), ("mtl_lora", 0, 0.8), ("mtl_lora", 1, 0.9), ("lora", 0, 0.75)]]
    summary = summarize({"runs": runs})["d"]
    assert list(summary) == ["mtl_lora", "lora"]  # table order, whatever the run order
    assert mean_std(summary["mtl_lora"]["macro"]) == pytest.approx((0.85, 0.0707107), abs=1e-6)
    assert paired_differences(summary["mtl_lora"], summary["lora"]) == pytest.approx([0.05, 0.2])  # by seed


def test_insert_block_creates_then_replaces(tmp_path):
    doc = tmp_path / "q.md"
    insert_block(doc, "first")
    insert_block(doc, "second")
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and "second" in text and "first" not in text
