"""The quality benchmark's code path on a tiny random BERT: real DeepSpeed, real Parquet, real MLflow (sqlite)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from benchmarks import protocol, quality, quality_data
from benchmarks.protocol import mean_std
from benchmarks.quality_report import BEGIN, insert_block
from benchmarks.quality_tables import paired_differences, summarize
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
        r = protocol.matched_lora_rank(shapes, target)
        best = min(abs(k * per_rank - target) for k in range(1, 50))
        assert r >= 1 and abs(r * per_rank - target) == best


def test_parameter_formulas_match_the_built_models():
    cfg = load_config(TINY, ["adapter.targets=[bert_all]"])
    shapes = protocol.adapter_shapes(cfg, num_tasks=4)
    assert len(shapes) == 6 * cfg.model.random_config["num_hidden_layers"]
    target = protocol.mtl_adapter_params(shapes, cfg, 4)
    assert adapter_param_count(build_model(cfg, 4))[0] == target
    r = protocol.matched_lora_rank(shapes, target)
    lora = load_config(TINY, ["adapter.targets=[bert_all]", *protocol.method_overrides("lora_matched", cfg, r)])
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
    scenarios = ", ".join(p.name for p in sorted(root.iterdir()))
    cfg = load_config(None, [*quality_data.WDC_COLUMNS, f"data.scenarios=[{scenarios}]"])
    info = quality_data.prepare_wdc(cfg, root, tmp_path / "data")
    splits = {s: pq.read_table(tmp_path / "data" / f"{s}.parquet") for s in ("train", "valid", "test")}
    for name, table in splits.items():
        raw = sum(pq.read_metadata(f).num_rows for f in root.glob(f"*/{name}.parquet"))
        assert info[name]["rows_in"] == raw == info[name]["accepted"] + info[name]["quarantined"]
        kept = info[name]["accepted"] - info[name].get("dropped_seen_in_train", 0)
        assert table.num_rows == info[name]["rows"] == kept
        assert sorted(set(table["scenario"].to_pylist())) == cfg.data.scenarios
        assert all(Path(p).parent.parent == root and Path(p).name == f"{name}.parquet"
                   for p in table["source_file"].to_pylist())
        # Shuffled: the first rows already hold more than one category.
        assert len(set(table["scenario"].slice(0, 100).to_pylist())) > 1
    assert info["test"]["dropped_seen_in_train"] >= 4  # at least the planted pairs
    seen = quality_data.pair_keys(splits["train"])
    for name in ("valid", "test"):
        assert not pc.any(pc.is_in(quality_data.pair_keys(splits[name]), value_set=seen)).as_py()


# --- the protocol, end to end on the tiny config ------------------------------------------------------------

GRID_ARGV = ["--config", str(TINY), "--grid", "--conflicts", "0", "1", "--imbalances", "1", "--methods", "mtl_lora",
             "lora", "--lrs", "1e-3", "5e-3", "--seeds", "0", "1", "--budgets", "3", "--max-length", "32",
             "--eval-rows", "64", "--diagnostics-every", "2", "--device", "cpu", "--docs-name", "grid",
             "data.synthetic.rows_per_scenario=150", "train.micro_batch_size=8"]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """2 grid cells × 2 methods × 2 lrs × 2 seeds of 3 steps (16 tiny trials), reports into a docs folder."""
    root = tmp_path_factory.mktemp("grid")
    out, docs = root / "out", root / "docs"
    docs.mkdir()
    (docs / "quality.md").write_text("# Quality\n\nprose above\n\n<!-- grid:begin -->\nold\n<!-- grid:end -->\n\n"
                                     "prose below\n")
    argv = [*GRID_ARGV, "--out", str(out), "--docs", str(docs)]
    assert quality.main(argv) == 0
    return argv, out, docs, json.loads((out / "results.json").read_text())


def _mine(results, dataset, budget, method):
    return [t for t in results["trials"] if (t["dataset"], t["budget"], t["method"]) == (dataset, budget, method)]


def test_every_method_gets_the_same_trials_and_the_best_validation_lr_is_tested_once(grid_run):
    _, out, _, results = grid_run
    trials = results["trials"]
    assert len(trials) == 2 * 2 * 2 * 2
    assert {(t["dataset"], t["method"]) for t in trials} == {
        (d, m) for d in ("synthetic-c0-i1", "synthetic-c1-i1") for m in ("mtl_lora", "lora")}
    for dataset in ("synthetic-c0-i1", "synthetic-c1-i1"):
        for method in ("mtl_lora", "lora"):
            mine = _mine(results, dataset, "3", method)
            assert sorted((t["lr"], t["seed"]) for t in mine) == [(1e-3, 0), (1e-3, 1), (5e-3, 0), (5e-3, 1)]
            # Direct recomputation: mean validation macro AUC over the seeds, best lr (ties: the smaller).
            mean_val = {lr: sum(t["val_auc_macro"] for t in mine if t["lr"] == lr) / 2 for lr in (1e-3, 5e-3)}
            best = max(sorted(mean_val), key=lambda lr: (round(mean_val[lr], 12), -lr))
            assert results["selected"][f"{dataset}|3|{method}"]["lr"] == best
            tested = [t for t in mine if "test_auc_macro" in t]
            assert sorted(t["seed"] for t in tested) == [0, 1] and all(t["lr"] == best for t in tested)
            for t in tested:
                scored = [a for a in t["test_auc"].values() if a is not None]
                assert t["test_auc_macro"] == pytest.approx(sum(scored) / len(scored))
                assert t["test_rows"] == pq.read_metadata(out / dataset / "data" / "test.parquet").num_rows
            # Every trial: one validation at the end of its 3 steps, diagnostics at init and on the cadence.
            for t in mine:
                assert t["steps"] == 3 and t["best_step"] == 3 and [s for s, _ in t["val_curve"]] == [3]
                assert set(t["diag"]) == {"0", "2", "3"} and "diag/grad_norm/head" in t["diag"]["0"]
            assert ("diag/entropy_mean" in mine[0]["diag"]["0"]) == (method == "mtl_lora")
    # The grid cells carry their dials into the generator.
    raw = pq.read_table(out / "synthetic-c1-i1" / "raw.parquet")
    assert results["grid"]["synthetic-c1-i1"] == {"conflict": 1.0, "imbalance": 1.0} and raw.num_rows == 600
    assert results["train_rows"]["synthetic-c1-i1"] == {
        s: n for s, n in zip(*np.unique(pq.read_table(out / "synthetic-c1-i1" / "data" / "train.parquet")["scenario"]
                                        .to_numpy(zero_copy_only=False), return_counts=True))}


def test_paired_differences_and_the_heat_map_match_a_direct_recomputation(grid_run):
    from benchmarks.protocol import chosen, paired_scenario
    from benchmarks.quality_tables import grid_deltas

    _, out, docs, results = grid_run

    def tested(dataset, method):
        return {t["seed"]: t for t in _mine(results, dataset, "3", method) if "test_auc_macro" in t}

    deltas = grid_deltas(results)["3"]["cells"]
    text = (out / "quality.md").read_text()
    for dataset, cell in (("synthetic-c0-i1", (0.0, 1.0)), ("synthetic-c1-i1", (1.0, 1.0))):
        a, b = tested(dataset, "mtl_lora"), tested(dataset, "lora")
        direct = {s: a[s]["test_auc_macro"] - b[s]["test_auc_macro"] for s in (0, 1)}
        assert deltas[cell] == pytest.approx(direct)
        m, sd = mean_std(list(direct.values()))
        assert f"{m:+.4f} ± {sd:.4f} ({sum(v > 0 for v in direct.values())} of 2)" in text
        for sc in a[0]["test_auc"]:
            want = {s: a[s]["test_auc"][sc] - b[s]["test_auc"][sc] for s in (0, 1)
                    if a[s]["test_auc"][sc] is not None and b[s]["test_auc"][sc] is not None}
            assert paired_scenario(chosen(results)[(dataset, "3", "mtl_lora")],
                                   chosen(results)[(dataset, "3", "lora")], sc) == pytest.approx(want)
    assert "| imbalance \\ conflict | 0 | 1 |" in text and "Training rows:" in text
    for png in (out / "quality_grid.png", docs / "grid_grid.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = (docs / "quality.md").read_text()
    assert doc.startswith("# Quality\n\nprose above") and doc.rstrip().endswith("prose below") and "\nold\n" not in doc
    assert results["commands"][0]["command"] in doc and results["commands"][0]["wall_s"] > 0


def test_mlflow_children_resume_plan_and_settings(grid_run, capsys):
    argv, out, _, results = grid_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    parent_id = (out / "parent_run_id").read_text().strip()
    exp = client.get_experiment_by_name("quality-benchmark")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {c.info.run_id for c in children} == {t["run_id"] for t in results["trials"]}
    for c in children:
        t = next(t for t in results["trials"] if t["run_id"] == c.info.run_id)
        assert c.info.status == "FINISHED"
        assert c.data.tags["method"] == t["method"] and float(c.data.tags["lr"]) == t["lr"]
        if "test_auc_macro" in t:  # only the chosen trials were scored on test
            assert c.data.metrics["test_split/auc_macro"] == pytest.approx(t["test_auc_macro"])
        else:
            assert "test_split/auc_macro" not in c.data.metrics
        assert "diag/grad_norm/total" in c.data.metrics
    # Rerun: nothing trains again; --plan lists what a further seed would add; other settings are refused.
    assert quality.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["trials"] == results["trials"] and len(again["commands"]) == 2
    assert "0 trials trained" in capsys.readouterr().out
    assert quality.main([*argv, "--plan", "--seeds", "0", "1", "2"]) == 0
    assert "8 trials to run (16 done)" in capsys.readouterr().out
    # Shards split the plan's trials (seed is the innermost loop: shard 3/3 of 3 seeds is every seed-2 trial).
    assert quality.main([*argv, "--plan", "--seeds", "0", "1", "2", "--shard", "3/3"]) == 0
    assert "8 trials to run (16 done)" in capsys.readouterr().out
    assert quality.main([*argv, "--plan", "--seeds", "0", "1", "2", "--shard", "2/3"]) == 0
    assert "0 trials to run (16 done)" in capsys.readouterr().out
    # A narrower lr grid later (as for variants at the chosen lr) trains nothing new and chooses over every lr
    # the folder holds: each method keeps the lr its whole grid chose.
    lrs = argv.index("--lrs")
    for narrow in ("1e-3", "5e-3"):
        assert quality.main([*argv[:lrs], "--lrs", narrow, *argv[lrs + 3:]]) == 0
        assert "0 trials trained" in capsys.readouterr().out
        narrowed = json.loads((out / "results.json").read_text())
        assert narrowed["selected"] == results["selected"] and narrowed["trials"] == results["trials"]
    assert quality.main([*argv, "--max-length", "24"]) == 2
    assert "other settings (max_length)" in capsys.readouterr().err


def test_early_stopping_budget_variants_and_a_diverging_lr(tmp_path, capsys):
    from benchmarks.protocol import config_knows

    out = tmp_path / "out"
    # lr 1e30 without clipping turns the loss into NaN within a few steps: a failed trial, not a failed benchmark.
    argv = ["--config", str(TINY), "--datasets", "synthetic", "--methods", "mtl_lora", "--lrs", "1e-3", "1e30",
            "--seeds", "0", "--budgets", "es12", "--es-eval-every", "2", "--es-patience", "1", "--max-length", "32",
            "--eval-rows", "64", "--device", "cpu", "--out", str(out), "--variants", "tasklr10x",
            "nofield:adapter.no_such_field=1", "winit0.1", "data.synthetic.rows_per_scenario=150",
            "train.micro_batch_size=8", "train.grad_clip=0.0", "train.warmup_steps=0"]
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert "variant nofield skipped: the config does not know adapter.no_such_field yet" in printed
    assert ("variant winit0.1 skipped" in printed) == (not config_knows("adapter.w_init_scale"))
    results = json.loads((out / "results.json").read_text())
    failed = [t for t in results["trials"] if t["lr"] == 1e30]
    ran = 2 + config_knows("adapter.w_init_scale")  # mtl_lora, +tasklr10x, and +winit0.1 once the config knows it
    assert len(failed) == ran and all(t["diverged"] and t["val_auc_macro"] is None for t in failed)
    assert all(results["selected"][f"synthetic|es12|{m}"]["lr"] == 1e-3 for m in ("mtl_lora", "mtl_lora+tasklr10x"))
    assert not any("test_auc_macro" in t for t in failed)
    by_method = {t["method"]: t for t in results["trials"] if t["lr"] == 1e-3}
    assert "mtl_lora+nofield" not in by_method and {"mtl_lora", "mtl_lora+tasklr10x"} <= set(by_method)
    for t in by_method.values():
        steps = [s for s, _ in t["val_curve"]]
        assert steps == list(range(2, t["steps"] + 1, 2)) and t["steps"] <= 12
        aucs = [a for _, a in t["val_curve"]]
        assert t["val_auc_macro"] == max(aucs) and t["best_step"] == steps[aucs.index(max(aucs))]
        if t["steps"] < 12:  # stopped early: the last validation (patience 1) brought no gain
            assert aucs[-1] <= max(aucs[:-1])
    cfg = load_config(Path(by_method["mtl_lora+tasklr10x"]["model_dir"]) / "config.yaml")
    assert cfg.train.task_lr == pytest.approx(1e-2) and cfg.train.lr == 1e-3 and cfg.train.early_stopping_patience == 1
    assert results["variants"]["mtl_lora+tasklr10x"] == ["train.task_lr=10xlr"]
    text = (out / "quality.md").read_text()
    assert "MTL-LoRA [tasklr10x]" in text and "| failed |" in text


def test_protocol_rules():
    from benchmarks.protocol import Variant, paired, parse_budget, parse_variant, select_lr
    from kernel.errors import ConfigError

    assert parse_budget("250") == protocol.Budget("250", 250, False)
    assert parse_budget("es") == protocol.Budget("es2000", 2000, True) and parse_budget("es600").max_steps == 600
    assert "train.early_stopping_patience=0" in parse_budget("250").overrides(100, 3)
    assert "train.eval_every=100" in parse_budget("es600").overrides(100, 3)
    with pytest.raises(ConfigError):
        parse_budget("lots")
    assert parse_variant("tau1").overrides == ("adapter.tau=1.0",)
    v = parse_variant("mine:adapter.tau=0.5; train.task_lr=3xlr")
    assert v == Variant("mine", ("adapter.tau=0.5", "train.task_lr=3xlr")) and v.method == "mtl_lora+mine"
    assert v.resolved(1e-3) == ["adapter.tau=0.5", f"train.task_lr={3e-3!r}"]
    with pytest.raises(ConfigError):
        parse_variant("nope")
    trials = [{"lr": lr, "seed": s, "val_auc_macro": v} for lr, s, v in
              [(1e-3, 0, 0.80), (1e-3, 1, 0.90), (2e-3, 0, 0.86), (2e-3, 1, 0.84), (5e-4, 0, 0.85), (5e-4, 1, 0.85)]]
    assert select_lr(trials, [5e-4, 1e-3, 2e-3], [0, 1]) == 5e-4  # three-way tie at 0.85: the smallest lr
    trials[0]["val_auc_macro"] = 0.81
    assert select_lr(trials, [5e-4, 1e-3, 2e-3], [0, 1]) == 1e-3
    assert select_lr(trials, [5e-4, 1e-3, 2e-3], [0, 1, 2]) is None  # seed 2 not in yet: nothing chosen
    trials[1]["val_auc_macro"] = None  # a trial without a validation AUC cannot win
    assert select_lr(trials, [5e-4, 1e-3, 2e-3], [0, 1]) == 5e-4
    trials[1]["val_auc_macro"], trials[2]["val_auc_macro"] = 0.99, 0.88
    assert select_lr(trials, [5e-4, 1e-3, 2e-3], [0, 1]) == 1e-3  # (0.81 + 0.99) / 2 = 0.90 > 0.86
    assert paired({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.85, 2: None, 3: 0.1}) == pytest.approx({0: 0.05})


def test_summary_statistics_and_pairing():
    runs = [{"dataset": "d", "method": m, "seed": s, "r": 8, "adapter_params": 10, "trainable_params": 12,
             "test_auc": {"a": auc, "b": None}, "test_auc_macro": auc, "train_s": 1.0, "samples_per_s": None}
            for m, s, auc in [("lora", 1, 0.7), ("mtl_lora", 0, 0.8), ("mtl_lora", 1, 0.9), ("lora", 0, 0.75)]]
    summary = summarize({"runs": runs})["d"]
    assert list(summary) == ["mtl_lora", "lora"]  # table order, whatever the run order
    assert mean_std(summary["mtl_lora"]["macro"]) == pytest.approx((0.85, 0.0707107), abs=1e-6)
    assert paired_differences(summary["mtl_lora"], summary["lora"]) == pytest.approx([0.05, 0.2])  # by seed


def test_earlier_results_files_still_render(tmp_path):
    """results.json of the one-lr protocol (docs/quality.md's tables) re-renders without training."""
    from benchmarks.quality_report import write_reports

    runs = [{"dataset": "wdc", "method": m, "seed": s, "r": 8, "adapter_params": 10, "trainable_params": 12,
             "test_auc": {"a": auc, "b": auc - 0.1}, "test_auc_macro": auc - 0.05, "train_s": 1.0, "samples_per_s": 2.0}
            for m, s, auc in [("mtl_lora", 0, 0.8), ("mtl_lora", 1, 0.9), ("lora", 0, 0.75), ("lora", 1, 0.8)]]
    results = {"settings": {"config": "c", "overrides": [], "steps": 250, "max_length": 48, "eval_rows": 256},
               "data": {}, "runs": runs, "command": "python -m benchmarks.quality --steps 250"}
    paths = write_reports(results, tmp_path)
    text = (tmp_path / "quality.md").read_text()
    assert "| MTL-LoRA | 8 |" in text and "| LoRA (same r) | +0.0750 ± 0.0354 | 2 of 2 seeds |" in text
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG" and len(paths) == 2


def test_insert_block_creates_then_replaces(tmp_path):
    doc = tmp_path / "q.md"
    insert_block(doc, "first")
    insert_block(doc, "second")
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and "second" in text and "first" not in text
