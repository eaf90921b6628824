"""Quality benchmark: does MTL-LoRA beat LoRA on multi-scenario data, at a comparable parameter count?

    python -m benchmarks.quality --help
    python -m benchmarks.quality --datasets wdc --methods mtl_lora lora lora_matched --budgets 250 \
        --lrs 5e-4 1e-3 2e-3 --seeds 0 1 2 --device cpu --out runs/q2-wdc-250        # the protocol
    python -m benchmarks.quality --datasets wdc --methods mtl_lora lora --budgets es2000 --shard 1/4 \
        --out runs/q2-wdc-es                          # early stopping, in 4 commands (shards 1/4 ... 4/4)
    python -m benchmarks.quality --datasets wdc --methods mtl_lora lora --variants tau1 n1 diag tasklr10x \
        --budgets 250 --out runs/q2-wdc-250           # variants, paired with the same folder's MTL-LoRA and LoRA
    python -m benchmarks.quality --grid --conflicts 0 0.5 1 --imbalances 1 10 --datasets wdc --methods mtl_lora \
        lora --budgets 250 --out runs/q2-grid         # conflict × scarcity heat map, WDC as the real-data row
    python -m benchmarks.quality ... --plan           # the trials still to run, and an estimate of their time
    python -m benchmarks.quality --datasets synthetic --methods mtl_lora lora --seeds 0 --budgets 20 \
        --lrs 1e-3 --out runs/quality-smoke --config configs/tiny.yaml               # the whole chain in a minute

Protocol (``benchmarks.protocol`` holds its rules as pure functions):

- Every method trains on the same base model, data, sampler, batch and budget (the config,
  ``configs/demo.yaml`` by default, plus trailing ``key=value`` overrides), once per (learning rate, seed).
- **Learning rate.** ``--lrs`` is the same grid for every method: the same number of tuning trials each.
  A later command on the same folder may add trials (variants at the lr MTL-LoRA chose, say); each method's
  lr is chosen over every lr its folder holds for it, and the report lists each method's grid.
  It sets ``train.lr`` (the head and MTL-LoRA's task group follow it unless set apart). The chosen lr has
  the best validation macro AUC averaged over the seeds; only its trials are scored on the test split,
  once each.
- **Budgets** (``--budgets``): ``250`` is a fixed 250 steps, validated once at the end (the final model is
  tested); ``es`` / ``es2000`` trains up to 2000 steps with validation every ``--es-eval-every`` steps and
  early stopping after ``--es-patience`` validations without a gain, then tests the best checkpoint.
  Validation is capped at ``--eval-rows`` rows per scenario (stratified, the same rows every time).
- **Pairing.** Runs with the same seed share the scenario draw order and the head initialisation, so
  differences are paired by seed; per-scenario differences are reported next to each scenario's
  training rows.
- **Variants** (``--variants``) are MTL-LoRA with extra overrides, within the paper's method (tau, n_up,
  lambda_type, task_lr, ...: ``benchmarks.protocol.VARIANTS``, or ``NAME:key=value;key=value``), each
  reported as a paired delta against MTL-LoRA and LoRA. A variant whose keys the config does not know yet
  (``adapter.w_init_scale``, ``train.task_warmup_steps``) is skipped with a message.
- **Diagnostics.** Every trial logs ``training.diagnostics`` (MTL-LoRA: mixing entropy, sharing of the B_i,
  Λ drift; every method: gradient norms per optimizer group) at init and every ``--diagnostics-every``
  steps; results.json keeps them per trial.
- A trial whose loss turns NaN/inf (an unstable lr) is kept as failed (no validation AUC), not fatal.

Methods:

    mtl_lora       MTL-LoRA as configured (r, n_up, tau, full Λ)
    lora           one shared LoRA at the same r
    lora_matched   one shared LoRA whose r makes its adapter parameters closest to MTL-LoRA's
                   (only r changes: alpha stays, so s = alpha / r shrinks as r grows)
    per_task_lora  an independent LoRA per scenario at the same r
    (any other adapter.method the config knows, trained as configured)

Datasets: ``wdc`` is ``<repo root>/../shared/data/wdc_products`` (four product categories, each a scenario),
read through the ingestion column mapping (left -> query, right -> title, category -> scenario) with its
own train/valid/test files kept as the splits; valid/test pairs that also occur in train are dropped, so
no evaluated pair was trained on. ``synthetic`` is the demo generator's four markets (``data.synthetic``),
ingested with the config's hash split. ``--grid`` adds one synthetic dataset per (conflict, imbalance)
cell of the generator's dials (``pipeline.synthetic``), named ``synthetic-c<conflict>-i<imbalance>``.

Written to ``--out``: results.json (every finished trial; a rerun with the same settings skips those, and
several commands, for example one per dataset or method, may share one folder), quality.md (tables),
quality.png and, with grid cells, quality_grid.png (the heat map of MTL-LoRA minus LoRA). ``--docs DIR``
also puts the plots in DIR and the tables between the ``<!-- NAME:begin -->`` markers of DIR/quality.md
(``--docs-name``). Every trial is an MLflow child run (tag mlflow.parentRunId) of one parent run per
output folder; tracking URI: --tracking-uri, default sqlite:///<out>/mlflow.db. Each command prints its
wall time, which results.json also keeps.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import time
import typing
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.protocol import Budget, Variant, parse_budget, parse_variant, select_lr, unknown_keys
from kernel.atomic import atomic_path, write_json_atomic
from kernel.config import AdapterConfig, Config, add_config_args, load_config
from kernel.errors import ConfigError, RelevanceError, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
WDC_ROOT = ROOT.parent / "shared" / "data" / "wdc_products"
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
BASE_METHODS = ("mtl_lora", "lora", "lora_matched", "per_task_lora")
# Any further adapter.method the config knows (a method outside the paper lives there, never as mtl_lora).
METHODS = BASE_METHODS + tuple(m for m in typing.get_args(typing.get_type_hints(AdapterConfig)["method"])
                               if m not in BASE_METHODS)
DATASETS = ("wdc", "synthetic")
DEFAULT_LRS = (5e-4, 1e-3, 2e-3)
PROTOCOL = 2  # results.json layout: trials + selected (1: one run per method and seed, benchmarks before)
# --plan's default cost of one training step: MiniLM, batch 32, max length 48, bf16 on the 2 cores when they
# are otherwise idle (docs/quality.md: 1000 steps in 320-412 s per run, validation and set-up included).
SEC_PER_STEP = 0.42
TRIAL_OVERHEAD_S = 15.0  # with SEC_PER_STEP: engine set-up, final validation and checkpoint of one trial
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


def grid_cell(conflict: float, imbalance: float) -> str:
    """The dataset name of one cell of the synthetic dials: synthetic-c0.5-i10."""
    return f"synthetic-c{conflict:g}-i{imbalance:g}"


def parse_grid_cell(dataset: str) -> tuple[float, float] | None:
    """(conflict, imbalance) of a grid-cell dataset name, None for any other dataset."""
    if not dataset.startswith("synthetic-c") or "-i" not in dataset:
        return None
    c, i = dataset[len("synthetic-c"):].split("-i", 1)
    return float(c), float(i)


def dataset_overrides(dataset: str) -> list[str]:
    if dataset == "wdc":
        scenarios = sorted(p.name for p in WDC_ROOT.iterdir() if p.is_dir()) if WDC_ROOT.is_dir() else []
        if not scenarios:
            raise ConfigError(f"dataset wdc: no category folders under {WDC_ROOT}")
        return [*WDC_COLUMNS, f"data.scenarios=[{', '.join(scenarios)}]"]
    cell = parse_grid_cell(dataset)
    if cell is not None:
        return [f"data.synthetic.conflict={cell[0]!r}", f"data.synthetic.imbalance={cell[1]!r}"]
    return []


def prepare(dataset: str, cfg: Config, work: Path) -> Path:
    """The dataset's train/valid/test folder under ``work`` (built once; prepared.json marks it done)."""
    data_dir = work / "data"
    if not (data_dir / "prepared.json").is_file():
        info = prepare_wdc(cfg, WDC_ROOT, data_dir) if dataset == "wdc" else prepare_synthetic(cfg, data_dir)
        write_json_atomic(data_dir / "prepared.json", info)
    return data_dir


def train_rows(data_dir: Path) -> dict[str, int]:
    """Training rows per scenario (after ingestion and the split)."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for s in pq.read_table(data_dir / "train.parquet", columns=["scenario"])["scenario"].to_pylist():
        counts[s] = counts.get(s, 0) + 1
    return dict(sorted(counts.items()))


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


def trial_overrides(method: str, variants: dict[str, Variant], cfg: Config, matched_r: int, lr: float,
                    seed: int, diagnostics_every: int) -> list[str]:
    """What one trial adds to the dataset's overrides: lr, the method (or MTL-LoRA variant), seed, diagnostics.

    The variant's overrides come after train.lr, so that a variant's own train.task_lr (say) applies.
    """
    method_args = ([*method_overrides("mtl_lora", cfg, matched_r), *variants[method].resolved(lr)]
                   if method in variants else method_overrides(method, cfg, matched_r))
    return [f"train.lr={lr!r}", *method_args, f"train.seed={seed}", f"train.diagnostics_every={diagnostics_every}"]


# --- one trial -------------------------------------------------------------------------------------------

class _DiagCapture:
    """A tracker proxy: forwards everything, and keeps the diag/... metrics as {step: {key: value}}."""

    def __init__(self, inner):
        self._inner = inner
        self.diag: dict[str, dict[str, float]] = {}

    def log_metrics(self, metrics: dict, step: int | None = None, **kw) -> None:
        picked = {k: float(v) for k, v in metrics.items() if k.startswith("diag/") and v is not None}
        if picked and step is not None:
            self.diag.setdefault(str(step), {}).update(picked)
        self._inner.log_metrics(metrics, step=step, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def train_trial(cfg: Config, data_dir: Path, run_dir: Path, tracker) -> dict:
    """Train one (method, lr, seed) and keep what selection needs: validation AUCs, steps, time, diagnostics."""
    from training.trainer import train

    capture = _DiagCapture(tracker)
    t0 = time.perf_counter()
    result = train(cfg, data_dir, run_dir, tracker=capture)
    train_s = time.perf_counter() - t0
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # DeepSpeed states: not needed, large
    best = result.best_metrics or {}
    saved = json.loads((result.model_dir / "metrics.json").read_text()) if result.model_dir.is_dir() else {}
    return {"r": cfg.adapter.r, "train_s": train_s, "samples_per_s": _last_metric(tracker, "train/samples_per_s"),
            "steps": result.steps, "best_step": saved.get("step"), "val_auc_macro": best.get("auc_macro"),
            "val_auc": {s: e["auc"] for s, e in best.get("scenarios", {}).items()},
            "val_curve": [[h["step"], h["auc_macro"]] for h in result.history],
            "diag": capture.diag, "model_dir": str(result.model_dir)}


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



def _last_metric(tracker, key: str) -> float | None:
    client = getattr(tracker, "client", None)
    if client is None:
        return None
    history = client.get_metric_history(tracker.run_id, key)
    return max(history, key=lambda m: m.step).value if history else None



def score_trial(trial: dict, data_dir: Path, precision: str, tracker) -> dict:
    """Score the chosen trial's model on the test split (once), log it into the trial's MLflow run."""
    from training.evaluate import flat_metrics

    test, n_adapter, n_trainable = score_test(Path(trial["model_dir"]), data_dir, precision)
    tracker.log_metrics({**flat_metrics(test, "test"), "params/adapter_trainable": n_adapter,
                         "params/trainable_total": n_trainable})
    return {"adapter_params": n_adapter, "trainable_params": n_trainable,
            "test_auc": {s: e["auc"] for s, e in test["scenarios"].items()}, "test_auc_macro": test["auc_macro"],
            "test_rows": test["n"]}


# --- the whole benchmark ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from benchmarks.protocol import DEFAULT_ES_MAX_STEPS, VARIANTS

    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--datasets", nargs="*", default=None, choices=DATASETS,
                   help="default: wdc synthetic (with --grid: none besides the grid cells)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default: mtl_lora lora lora_matched (with --grid: mtl_lora lora)")
    p.add_argument("--variants", nargs="*", default=[], metavar="NAME[:k=v;k=v]",
                   help=f"MTL-LoRA variants, paired against mtl_lora and lora; known: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help=f"learning-rate grid, the same for every method (default {' '.join(map(str, DEFAULT_LRS))}; "
                        "with --grid: the config's train.lr)")
    p.add_argument("--budgets", nargs="+", default=None, metavar="STEPS|es[MAX]",
                   help=f"fixed step counts and/or es (early stopping, up to {DEFAULT_ES_MAX_STEPS} steps) or es<MAX>; "
                        "default 250")
    p.add_argument("--steps", type=int, default=None, help="shorthand for --budgets STEPS")
    p.add_argument("--es-eval-every", type=int, default=100, help="early-stopping budgets: validate every k steps")
    p.add_argument("--es-patience", type=int, default=3, help="early-stopping budgets: validations without gain")
    p.add_argument("--max-length", type=int, default=48, help="tokens per (query, ad) pair")
    p.add_argument("--eval-rows", type=int, default=256, help="validation rows per scenario (stratified cap)")
    p.add_argument("--diagnostics-every", type=int, default=50,
                   help="MTL-LoRA runs: log training.diagnostics every k steps and at init (0: off)")
    p.add_argument("--grid", action="store_true", help="add the synthetic conflict × imbalance cells as datasets")
    p.add_argument("--conflicts", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    p.add_argument("--imbalances", nargs="+", type=float, default=[1.0, 10.0])
    p.add_argument("--shard", default="1/1", metavar="K/N",
                   help="run only every N-th trial of the plan, starting with the K-th (run the N shards of one "
                        "--out one after another: each selects and tests what its trials complete)")
    p.add_argument("--plan", action="store_true", help="print the trials still to run and an estimate; train nothing")
    p.add_argument("--sec-per-step", type=float, default=0.0,
                   help=f"--plan's training cost per step (default: measured from results.json, else {SEC_PER_STEP})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="runs/quality", help="output folder (results.json, tables, plots, runs)")
    p.add_argument("--docs", default="", help="also write the plots into DIR and the tables into DIR/quality.md")
    p.add_argument("--docs-name", default="quality", help="marker name in DIR/quality.md and plot file stem")
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
        return {"protocol": PROTOCOL, "settings": settings, "data": {}, "train_rows": {}, "grid": {},
                "variants": {}, "trials": [], "selected": {}, "commands": []}
    results = json.loads(path.read_text())
    if results.get("protocol") != PROTOCOL:
        raise ConfigError(f"{path} was written by the earlier one-lr protocol (re-render it with "
                          "python -m benchmarks.quality_report): use another --out")
    # The lr grid is not a setting: each (dataset, budget, method) records its own in "selected" (a later
    # command may add variants at one lr). Files written while it was one are still read.
    changed = sorted(k for k in settings if results["settings"].get(k) != settings[k])
    if changed:
        raise ConfigError(f"{path} was made with other settings ({', '.join(changed)}): use another --out")
    return results


class Plan(typing.NamedTuple):
    datasets: list[str]
    methods: list[str]
    variants: dict[str, Variant]
    budgets: list[Budget]
    lrs: list[float]
    seeds: list[int]
    shard: tuple[int, int] = (1, 1)  # (K, N): this command runs trials K-1, K-1+N, ... of ``trials()``

    def trials(self) -> list[tuple[str, Budget, str, float, int]]:
        """Every (dataset, budget, method, lr, seed) of the plan, in run order (the shards' numbering)."""
        return [(d, b, m, lr, s) for d in self.datasets for b in self.budgets for m in self.methods
                for lr in self.lrs for s in self.seeds]

    def mine(self) -> set[tuple[str, str, str, float, int]]:
        """This shard's trials, as results.json keys."""
        k, n = self.shard
        return {(d, b.name, m, lr, s) for i, (d, b, m, lr, s) in enumerate(self.trials()) if i % n == k - 1}


def make_plan(args: argparse.Namespace) -> Plan:
    """The datasets, methods (+ variants), budgets and lrs a command asks for, with defaults filled in."""
    if args.steps is not None and args.budgets:
        raise ConfigError("give either --steps or --budgets, not both")
    budgets = [parse_budget(b) for b in (args.budgets or [str(args.steps or 250)])]
    datasets = list(args.datasets if args.datasets is not None else ([] if args.grid else DATASETS))
    if args.grid:
        if not all(0 <= c <= 1 for c in args.conflicts) or not all(i >= 1 for i in args.imbalances):
            raise ConfigError("--conflicts must be in [0, 1] and --imbalances >= 1")
        datasets += [grid_cell(c, i) for i in args.imbalances for c in args.conflicts]
    if not datasets:
        raise ConfigError("no datasets: give --datasets and/or --grid")
    methods = list(args.methods or (["mtl_lora", "lora"] if args.grid else ["mtl_lora", "lora", "lora_matched"]))
    variants: dict[str, Variant] = {}
    for text in args.variants:
        v = parse_variant(text)
        missing = unknown_keys(v)
        if missing:
            print(f"variant {v.name} skipped: the config does not know {', '.join(missing)} yet", flush=True)
            continue
        variants[v.method] = v
    methods += [m for m in variants if m not in methods]
    if args.lrs is not None:
        lrs = sorted(set(args.lrs))
    elif args.grid:
        lrs = [load_config(args.config or DEFAULT_CONFIG, list(args.overrides)).train.lr]
    else:
        lrs = list(DEFAULT_LRS)
    if any(lr <= 0 for lr in lrs) or not args.seeds:
        raise ConfigError("--lrs must be > 0 and --seeds needs at least one seed")
    try:
        k, n = (int(x) for x in args.shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {args.shard!r}: expected K/N, e.g. 1/3") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {args.shard}: K must be in [1, N]")
    return Plan(datasets, methods, variants, budgets, lrs, list(args.seeds), (k, n))


def _trial_key(t: dict) -> tuple:
    return t["dataset"], t["budget"], t["method"], t["lr"], t["seed"]


def print_plan(plan: Plan, results: dict, sec_per_step: float) -> None:
    """The trials still to run and an estimate of their training time (early stopping: at most)."""
    done = {_trial_key(t) for t in results["trials"]}
    measured = [t["train_s"] / t["steps"] for t in results["trials"] if t.get("steps")]
    rate = sec_per_step or (statistics.median(measured) if measured else SEC_PER_STEP)
    overhead = 0.0 if measured and not sec_per_step else TRIAL_OVERHEAD_S  # measured rates include it
    mine = plan.mine()
    todo = [(d, b, m, lr, s) for d, b, m, lr, s in plan.trials()
            if (d, b.name, m, lr, s) in mine and (d, b.name, m, lr, s) not in done]
    steps = sum(b.max_steps for _, b, *_ in todo)
    for d, b, m, lr, s in todo:
        print(f"  {d} / {b.name} / {m} / lr {lr:g} / seed {s}")
    minutes = (steps * rate + overhead * len(todo)) / 60
    print(f"{len(todo)} trials to run ({len(done)} done), {steps} steps at most: about {minutes:.0f} min of training "
          f"at {rate:.2f} s/step (+ {overhead:.0f} s a trial), plus data preparation and one test per chosen trial"
          + ("; early stopping usually ends sooner" if any(b.early_stopping for _, b, *_ in todo) else ""))


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict:
    t_start = time.perf_counter()
    plan = make_plan(args)
    out = Path(args.out)
    settings = {"config": args.config or "configs/demo.yaml", "overrides": list(args.overrides),
                "max_length": args.max_length, "eval_rows": args.eval_rows,
                "es_eval_every": args.es_eval_every, "es_patience": args.es_patience,
                "diagnostics_every": args.diagnostics_every}
    results = _load_results(out / "results.json", settings)
    # Variants may join in later commands; a name once used keeps its overrides.
    for method, v in plan.variants.items():
        known = results["variants"].setdefault(method, list(v.overrides))
        if known != list(v.overrides):
            raise ConfigError(f"variant {v.name}: {out / 'results.json'} has it as {known}, not {list(v.overrides)}: "
                              "give it another name")
    if args.plan:
        print_plan(plan, results, args.sec_per_step)
        return results
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_locked(args, argv, plan, out, settings, results, t_start)


def _exclusive(out: Path):
    """Hold out/results.lock for the whole command: two commands on one folder would lose each other's trials."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        with open(out / "results.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{out} is in use by another benchmark command: wait for it, or use another --out") \
                    from None
            yield

    return held()


def _run_locked(args, argv, plan: Plan, out: Path, settings: dict, results: dict, t_start: float) -> dict:
    from benchmarks.quality_report import write_reports
    from kernel.mlflow_client import MlflowTracker

    # Re-read under the lock: a command that just finished may have added trials.
    results = _load_results(out / "results.json", settings) if (out / "results.json").is_file() else results
    for method, v in plan.variants.items():
        results["variants"].setdefault(method, list(v.overrides))
    uri = args.tracking_uri or f"sqlite:///{out.resolve() / 'mlflow.db'}"
    parent = MlflowTracker(uri, args.experiment)
    parent_file = out / "parent_run_id"
    parent.start(run_name=f"quality {out.name}", run_id=parent_file.read_text().strip() if parent_file.is_file() else None,
                 params={k: json.dumps(v) for k, v in settings.items()})
    parent_file.write_text(parent.run_id)
    trials = results["trials"]
    done = {_trial_key(t) for t in trials}
    mine = plan.mine()
    trained = tested = 0

    def save() -> None:  # after every trial: a rerun resumes from here
        write_json_atomic(out / "results.json", results)

    try:
        for dataset in plan.datasets:
            base = [f"work_dir={out / dataset}", f"train.eval_rows_per_scenario={args.eval_rows}",
                    f"features.max_length={args.max_length}", *dataset_overrides(dataset), *args.overrides]
            cfg = load_config(args.config or DEFAULT_CONFIG, base)
            data_dir = prepare(dataset, cfg, out / dataset)
            results["data"][dataset] = json.loads((data_dir / "prepared.json").read_text())
            results["train_rows"][dataset] = train_rows(data_dir)
            cell = parse_grid_cell(dataset)
            if cell is not None:
                results["grid"][dataset] = {"conflict": cell[0], "imbalance": cell[1]}
            from training.trainer import task_map_for

            num_tasks = len(task_map_for(cfg, data_dir))
            shapes = adapter_shapes(cfg, num_tasks)
            matched_r = matched_lora_rank(shapes, mtl_adapter_params(shapes, cfg, num_tasks))
            for budget in plan.budgets:
                budget_args = budget.overrides(args.es_eval_every, args.es_patience)
                for method in plan.methods:
                    for lr in plan.lrs:
                        for seed in plan.seeds:
                            key = (dataset, budget.name, method, lr, seed)
                            if key in done or key not in mine:
                                continue
                            extra = trial_overrides(method, plan.variants, cfg, matched_r, lr, seed,
                                                    args.diagnostics_every)
                            run_cfg = load_config(args.config or DEFAULT_CONFIG, [*base, *budget_args, *extra])
                            name = f"{dataset}/{budget.name}/{method}/lr{lr:g}/seed{seed}"
                            print(f"== {name}", flush=True)
                            child = MlflowTracker(uri, args.experiment)
                            child.start(run_name=name, tags={
                                "mlflow.parentRunId": parent.run_id, "dataset": dataset, "budget": budget.name,
                                "method": method, "lr": str(lr), "seed": str(seed)})
                            run_dir = out / dataset / "runs" / budget.name / method / f"lr{lr:g}-seed{seed}"
                            t_trial = time.perf_counter()
                            try:
                                row = train_trial(run_cfg, data_dir, run_dir, child)
                            except TrainingDiverged as e:  # an unstable lr is a result of the lr grid, not a crash
                                child.end("FAILED")
                                row = {"r": run_cfg.adapter.r, "train_s": time.perf_counter() - t_trial,
                                       "samples_per_s": None, "steps": None, "best_step": None, "val_auc_macro": None,
                                       "val_auc": {}, "val_curve": [], "diag": {}, "model_dir": None,
                                       "diverged": str(e).splitlines()[0]}
                                print(f"   diverged: {row['diverged']}", flush=True)
                            except BaseException:
                                child.end("FAILED")
                                raise
                            else:
                                child.end()
                            trials.append({"dataset": dataset, "budget": budget.name, "method": method, "lr": lr,
                                           "seed": seed, "run_id": child.run_id, **row})
                            trained += 1
                            save()
                            print(f"   val macro AUC {row['val_auc_macro'] or float('nan'):.4f}  {row['steps']} steps "
                                  f"{row['train_s']:.0f} s", flush=True)
                            gc.collect()
                    tested += _select_and_test(results, dataset, budget, method, plan, data_dir, cfg, uri,
                                               args.experiment)
                    save()
        wall = time.perf_counter() - t_start
        results["commands"].append({"command": "python -m benchmarks.quality " + shlex.join(argv),
                                    "wall_s": round(wall, 1), "trained": trained, "tested": tested})
        save()
        docs = Path(args.docs) if args.docs else None
        for p in write_reports(results, out, docs, args.docs_name):
            parent.log_artifact(p, "report")
        parent.log_artifact(out / "results.json", "report")
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end()
    print(f"wall time {wall / 60:.1f} min ({wall:.0f} s): {trained} trials trained, {tested} tests scored", flush=True)
    return results


def _select_and_test(results: dict, dataset: str, budget: Budget, method: str, plan: Plan, data_dir: Path,
                     cfg: Config, uri: str, experiment: str) -> int:
    """Choose the lr of (dataset, budget, method) on validation; score its trials on test (once each)."""
    from kernel.mlflow_client import MlflowTracker

    mine = [t for t in results["trials"] if (t["dataset"], t["budget"], t["method"]) == (dataset, budget.name, method)]
    key = f"{dataset}|{budget.name}|{method}"
    # A later, narrower command (variants at the chosen lr, one more seed) chooses over the whole grid this
    # folder has run for the key, never over its own lrs alone: it must not re-select LoRA at MTL-LoRA's lr.
    earlier = results["selected"].get(key, {})
    lrs = sorted({*earlier.get("lrs", []), *plan.lrs})
    seeds = sorted({*earlier.get("seeds", []), *plan.seeds})
    lr = select_lr(mine, lrs, seeds)
    if lr is None:
        return 0
    results["selected"][key] = {"lr": lr, "seeds": seeds, "lrs": lrs}
    n = 0
    for t in mine:
        if t["lr"] == lr and t["seed"] in seeds and "test_auc_macro" not in t and t.get("model_dir"):
            tracker = MlflowTracker(uri, experiment)
            tracker.run_id = t["run_id"]  # the trial's own (finished) run gets its test metrics
            t.update(score_trial(t, data_dir, cfg.train.precision, tracker))
            print(f"   {dataset}/{budget.name}/{method}: lr {lr:g} chosen on validation; "
                  f"seed {t['seed']} test macro AUC {t['test_auc_macro']:.4f}", flush=True)
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    # --variants takes any number of words, so it also swallows trailing key=value overrides: give them back
    # (a variant is a catalogue name or NAME:key=value, with its ":" before the first "=").
    overrides = [v for v in args.variants if "=" in v and ":" not in v.split("=", 1)[0]]
    args.variants = [v for v in args.variants if v not in overrides]
    args.overrides = [*args.overrides, *overrides]
    try:
        if args.steps is not None and args.steps < 1:
            raise ConfigError("--steps must be >= 1")
        _set_device(args.device)
        run_benchmark(args, argv)
    except RelevanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
