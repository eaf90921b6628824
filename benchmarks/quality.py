"""Quality benchmark: does MTL-LoRA beat LoRA on multi-scenario data, at a comparable parameter count?

    python -m benchmarks.quality --help
    python -m benchmarks.quality --datasets wdc synthetic --methods mtl_lora lora lora_matched per_task_lora \
        --seeds 0 1 2 --steps 250 --max-length 48 --eval-rows 256 --device cpu --out runs/quality250 --docs docs
    python -m benchmarks.quality --datasets wdc --methods mtl_lora --out runs/q-tau1 adapter.tau=1.0  # a variant
    python -m benchmarks.quality --datasets synthetic --methods mtl_lora lora --seeds 0 --steps 20 \
        --out runs/quality-smoke --config configs/tiny.yaml          # the whole chain in a minute

Every method trains on the same base model, data, sampler, steps, batch and learning rate (the config,
``configs/demo.yaml`` by default, plus any trailing ``key=value`` overrides), once per seed:

    mtl_lora       MTL-LoRA as configured (r, n_up, tau, full Λ)
    lora           one shared LoRA at the same r
    lora_matched   one shared LoRA whose r makes its adapter parameters closest to MTL-LoRA's
                   (only r changes: alpha stays, so s = alpha / r shrinks as r grows)
    per_task_lora  an independent LoRA per scenario at the same r

Datasets: ``wdc`` is ``<repo root>/../shared/data/wdc_products`` (four product categories, each a scenario),
read through the ingestion column mapping (left -> query, right -> title, category -> scenario) with its
own train/valid/test files kept as the splits; valid/test pairs that also occur in train are dropped, so
no evaluated pair was trained on. ``synthetic`` is the demo generator's four markets (``data.synthetic``),
ingested with the config's hash split. Validation (capped, ``--eval-rows``) runs once, at the end; the
test split is scored once per run.

Written to ``--out``: results.json (one entry per finished run; a rerun with the same settings skips
those), quality.md (tables) and quality.png. ``--docs DIR`` also puts the plot in DIR/quality.png and the
tables between the markers of DIR/quality.md. Every run is an MLflow child run (tag mlflow.parentRunId)
of one parent run per output folder; tracking URI: --tracking-uri, default sqlite:///<out>/mlflow.db.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.atomic import atomic_path, write_json_atomic
from kernel.config import Config, add_config_args, load_config
from kernel.errors import ConfigError, RelevanceError

ROOT = Path(__file__).resolve().parents[1]
WDC_ROOT = ROOT.parent / "shared" / "data" / "wdc_products"
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
METHODS = ("mtl_lora", "lora", "lora_matched", "per_task_lora")
DATASETS = ("wdc", "synthetic")
WDC_COLUMNS = ["data.columns.query=left", "data.columns.title=right", "data.columns.description=null",
               "data.columns.url=null", "data.columns.scenario=category", "data.columns.label=label"]


# --- data ----------------------------------------------------------------------------------------------

def prepare_wdc(cfg: Config, root: Path, out: Path) -> dict:
    """Ingest each of root's train/valid/test splits (all categories together) through the column mapping.

    Each split is its own ingest with split fractions 0, so every accepted row stays in its given split;
    each split is then put in a stable pseudo-random order (by a hash of the pair).
    Returns the counts per split: rows in, accepted, quarantined, and pairs dropped as seen in train.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from kernel.hashing import stable_hash
    from kernel.task_map import TaskMap
    from pipeline.ingest import run_ingest
    from pipeline.split import SPLITS

    files = {s: sorted(root.glob(f"*/{s}.parquet")) for s in SPLITS}
    if not all(files.values()):
        raise ConfigError(f"{root}: expected <category>/{{train,valid,test}}.parquet files")
    single = load_config(None, [*WDC_COLUMNS, "data.split.valid_fraction=0", "data.split.test_fraction=0"])
    single.data.scenarios = list(cfg.data.scenarios)
    tables, info = {}, {}
    for split in SPLITS:
        with tempfile.TemporaryDirectory(prefix=f"wdc-{split}-") as tmp:
            src = Path(tmp) / "src"
            src.mkdir()
            for f in files[split]:  # <category>.parquet links, so one ingest dedupes across categories
                (src / f"{f.parent.name}.parquet").symlink_to(f.resolve())
            report = run_ingest(single, src, Path(tmp) / "ingested")
            table = pq.read_table(Path(tmp) / "ingested" / "train.parquet")
        real = [str(root / Path(p).stem / f"{split}.parquet") for p in table["source_file"].to_pylist()]
        tables[split] = table.set_column(table.schema.get_field_index("source_file"), "source_file",
                                         pa.array(real, type=table.schema.field("source_file").type))
        info[split] = {"rows_in": report.rows_in, "accepted": report.rows_accepted,
                       "quarantined": report.rows_quarantined, "by_reason": report.by_reason}
    seen = _pair_keys(tables["train"])
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        table = tables[split]
        if split != "train":
            keep = pc.invert(pc.is_in(_pair_keys(table), value_set=seen))
            info[split]["dropped_seen_in_train"] = table.num_rows - pc.sum(keep.cast("int64")).as_py()
            table = table.filter(keep)
        # Categories arrive one after another; a stable shuffle lets a capped validation see all of them.
        table = table.take(np.argsort(stable_hash(_pair_keys(table)), kind="stable"))
        with atomic_path(out / f"{split}.parquet") as tmp:
            pq.write_table(table, tmp)
        info[split]["rows"] = table.num_rows
    TaskMap(list(cfg.data.scenarios)).save(out / "task_map.json")  # what ingestion writes beside the splits
    return info


def _pair_keys(table):
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(table["query"], table["title"], "\x1f")


def prepare_synthetic(cfg: Config, out: Path) -> dict:
    """The demo generator's markets (cfg.data.synthetic), ingested with the config's hash split."""
    from pipeline.ingest import run_ingest
    from pipeline.synthetic import generate

    raw = generate(out.parent / "raw.parquet", cfg.data.synthetic)
    report = run_ingest(cfg, raw, out)
    return {"rows_in": report.rows_in, "accepted": report.rows_accepted, "splits": report.splits}


def dataset_overrides(dataset: str) -> list[str]:
    if dataset == "wdc":
        scenarios = sorted(p.name for p in WDC_ROOT.iterdir() if p.is_dir()) if WDC_ROOT.is_dir() else []
        if not scenarios:
            raise ConfigError(f"dataset wdc: no category folders under {WDC_ROOT}")
        return [*WDC_COLUMNS, f"data.scenarios=[{', '.join(scenarios)}]"]
    return []


def prepare(dataset: str, cfg: Config, work: Path) -> Path:
    """The dataset's train/valid/test folder under ``work`` (built once; prepared.json marks it done)."""
    data_dir = work / "data"
    if not (data_dir / "prepared.json").is_file():
        info = prepare_wdc(cfg, WDC_ROOT, data_dir) if dataset == "wdc" else prepare_synthetic(cfg, data_dir)
        write_json_atomic(data_dir / "prepared.json", info)
    return data_dir


# --- methods and parameter matching ---------------------------------------------------------------------

def adapter_shapes(cfg: Config, num_tasks: int) -> list[tuple[int, int]]:
    """(in, out) of every layer the config's targets adapt."""
    from modeling.inject import adapter_layers
    from modeling.model import build_model

    model = build_model(cfg, num_tasks)
    return [(m.base_layer.in_features, m.base_layer.out_features) for m in adapter_layers(model).values()]


def mtl_adapter_params(shapes: list[tuple[int, int]], cfg: Config, num_tasks: int) -> int:
    from modeling.mtl_lora import expected_trainable_params

    a = cfg.adapter
    return sum(expected_trainable_params(i, o, a.r, num_tasks, a.n_up, "mtl_lora", a.lambda_type) for i, o in shapes)


def matched_lora_rank(shapes: list[tuple[int, int]], target: int) -> int:
    """The rank r >= 1 whose shared-LoRA adapter count, r · Σ(in + out), is closest to ``target``."""
    from modeling.mtl_lora import expected_trainable_params

    per_rank = sum(expected_trainable_params(i, o, 1, 1, 1, "lora") for i, o in shapes)
    low = max(1, target // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - target), r))


def method_overrides(method: str, cfg: Config, matched_r: int) -> list[str]:
    if method not in METHODS:
        raise ConfigError(f"--methods: unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "lora_matched":  # only r changes; alpha stays, as with PEFT's LoraConfig(r=..., lora_alpha=...)
        return ["adapter.method=lora", f"adapter.r={matched_r}"]
    return [f"adapter.method={method}"]


# --- one run -------------------------------------------------------------------------------------------

def score_test(model_dir: Path, data_dir: Path, precision: str) -> tuple[dict, int, int]:
    """Test-split metrics of a trained-model folder, plus its (adapter, trainable) parameter counts."""
    import pyarrow.parquet as pq
    import torch

    from features.tokenize import build_features
    from modeling.artifact import load_trained
    from modeling.base import load_tokenizer
    from modeling.inject import adapter_param_count
    from training.evaluate import evaluate

    cfg, task_map, model = load_trained(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tok = load_tokenizer(cfg)
    test = build_features(pq.read_table(data_dir / "test.parquet"), tok, task_map, cfg.features.max_length,
                          cache_dir=Path(cfg.work_dir) / "features_cache")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        metrics = evaluate(model, test, task_map, 128, tok.pad_token_id, device)
    n_adapter, _ = adapter_param_count(model)
    n_trainable = sum(p.numel() for p in model.trainable_parameters().values())
    return metrics, n_adapter, n_trainable


def run_one(cfg: Config, data_dir: Path, run_dir: Path, tracker) -> dict:
    """Train, score the test split, log test metrics into ``tracker``; the run's row of results.json."""
    import shutil

    from training.evaluate import flat_metrics
    from training.trainer import train

    t0 = time.perf_counter()
    result = train(cfg, data_dir, run_dir, tracker=tracker)
    train_s = time.perf_counter() - t0
    test, n_adapter, n_trainable = score_test(result.model_dir, data_dir, cfg.train.precision)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # DeepSpeed states: not needed, large
    rate = _last_metric(tracker, "train/samples_per_s")
    tracker.log_metrics({**flat_metrics(test, "test"), "time/train_s": train_s,
                         "params/adapter_trainable": n_adapter, "params/trainable_total": n_trainable})
    return {"r": cfg.adapter.r, "adapter_params": n_adapter, "trainable_params": n_trainable,
            "train_s": train_s, "samples_per_s": rate, "steps": result.steps,
            "val_auc_macro": (result.best_metrics or {}).get("auc_macro"),
            "test_auc": {s: e["auc"] for s, e in test["scenarios"].items()}, "test_auc_macro": test["auc_macro"],
            "test_rows": test["n"]}


def _last_metric(tracker, key: str) -> float | None:
    client = getattr(tracker, "client", None)
    if client is None:
        return None
    history = client.get_metric_history(tracker.run_id, key)
    return max(history, key=lambda m: m.step).value if history else None


# --- the whole benchmark ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per run (batch: train.micro_batch_size)")
    p.add_argument("--max-length", type=int, default=48, help="tokens per (query, ad) pair")
    p.add_argument("--eval-rows", type=int, default=256, help="validation rows per scenario scored at the end of training")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="runs/quality", help="output folder (results.json, tables, plot, runs)")
    p.add_argument("--docs", default="", help="also write DIR/quality.png and the tables into DIR/quality.md")
    p.add_argument("--tracking-uri", default="", help="MLflow URI (default: sqlite:///<out>/mlflow.db)")
    p.add_argument("--experiment", default="quality-benchmark")
    return p


def _set_device(device: str) -> None:
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # One in-process DeepSpeed "world" of size 1 for every run.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _load_results(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {"settings": settings, "data": {}, "runs": []}
    results = json.loads(path.read_text())
    if results["settings"] != settings:
        changed = sorted(k for k in settings if results["settings"].get(k) != settings[k])
        raise ConfigError(f"{path} was made with other settings ({', '.join(changed)}): use another --out")
    return results


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict:
    from benchmarks.quality_report import write_reports
    from kernel.mlflow_client import MlflowTracker

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"config": args.config or "configs/demo.yaml", "overrides": list(args.overrides), "steps": args.steps, "max_length": args.max_length,
                "eval_rows": args.eval_rows}
    results = _load_results(out / "results.json", settings)
    uri = args.tracking_uri or f"sqlite:///{out.resolve() / 'mlflow.db'}"
    parent = MlflowTracker(uri, args.experiment)
    parent_file = out / "parent_run_id"
    parent.start(run_name=f"quality {out.name}", run_id=parent_file.read_text().strip() if parent_file.is_file() else None,
                 params={k: json.dumps(v) for k, v in settings.items()})
    parent_file.write_text(parent.run_id)
    done = {(r["dataset"], r["method"], r["seed"]) for r in results["runs"]}
    try:
        for dataset in args.datasets:
            base = [f"work_dir={out / dataset}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                    f"train.checkpoint_every={args.steps}", "train.keep_checkpoints=1",
                    f"train.eval_rows_per_scenario={args.eval_rows}", f"features.max_length={args.max_length}",
                    *dataset_overrides(dataset), *args.overrides]
            cfg = load_config(args.config or DEFAULT_CONFIG, base)
            data_dir = prepare(dataset, cfg, out / dataset)
            results["data"][dataset] = json.loads((data_dir / "prepared.json").read_text())
            from training.trainer import task_map_for

            num_tasks = len(task_map_for(cfg, data_dir))
            shapes = adapter_shapes(cfg, num_tasks)
            matched_r = matched_lora_rank(shapes, mtl_adapter_params(shapes, cfg, num_tasks))
            for seed in args.seeds:
                for method in args.methods:
                    if (dataset, method, seed) in done:
                        continue
                    run_cfg = load_config(args.config or DEFAULT_CONFIG,
                                          [*base, *method_overrides(method, cfg, matched_r), f"train.seed={seed}"])
                    name = f"{dataset}/{method}/seed{seed}"
                    print(f"== {name}", flush=True)
                    child = MlflowTracker(uri, args.experiment)
                    child.start(run_name=name, tags={"mlflow.parentRunId": parent.run_id, "dataset": dataset,
                                                     "method": method, "seed": str(seed)})
                    try:
                        row = run_one(run_cfg, data_dir, out / dataset / "runs" / f"{method}-seed{seed}", child)
                    except BaseException:
                        child.end("FAILED")
                        raise
                    child.end()
                    results["runs"].append({"dataset": dataset, "method": method, "seed": seed,
                                            "run_id": child.run_id, **row})
                    write_json_atomic(out / "results.json", results)
                    print(f"   test macro AUC {row['test_auc_macro']:.4f}  {row['train_s']:.0f} s", flush=True)
                    gc.collect()
        results["command"] = "python -m benchmarks.quality " + shlex.join(argv)
        write_json_atomic(out / "results.json", results)
        paths = write_reports(results, out, Path(args.docs) if args.docs else None)
        for p in paths:
            parent.log_artifact(p, "report")
        parent.log_artifact(out / "results.json", "report")
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end()
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.steps < 1 or not args.seeds:
            raise ConfigError("--steps must be >= 1 and --seeds needs at least one seed")
        _set_device(args.device)
        run_benchmark(args, argv)
    except RelevanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
