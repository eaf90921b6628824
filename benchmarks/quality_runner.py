"""The quality benchmark's runner: the trials of a plan, trained and tested into one output folder, resumably.

``benchmarks.quality`` parses the command into a ``Plan`` (``benchmarks.protocol``: the rules); this module
runs it. One command:

1. reads out/results.json (every finished trial: a rerun with the same settings skips those) and holds
   out/results.lock while it runs, so that two commands on one folder cannot lose each other's trials;
2. per dataset (``benchmarks.quality_data``, prepared once) and budget, trains each method's (lr, seed)
   trials as MLflow child runs of the folder's parent run, saving results.json after every trial;
3. chooses each (dataset, budget, method)'s lr on validation and scores only its trials on the test split,
   once each;
4. writes the tables and plots (``benchmarks.quality_report``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import shlex
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.protocol import (
    Budget,
    Plan,
    adapter_shapes,
    matched_lora_rank,
    mtl_adapter_params,
    select_lr,
    trial_overrides,
)
from benchmarks.quality_data import dataset_overrides, parse_grid_cell, prepare, train_rows
from kernel.atomic import write_json_atomic
from kernel.config import Config, load_config
from kernel.errors import ConfigError, TrainingDiverged
from kernel.metric_names import TEST_SPLIT
from modeling.hardware import training_precision

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
PROTOCOL = 2  # results.json layout: trials + selected (1: one run per method and seed, benchmarks before)
# --plan's default cost of one training step: MiniLM, batch 32, max length 48, bf16 on the 2 cores when they
# are otherwise idle (docs/quality.md: 1000 steps in 320-412 s per run, validation and set-up included).
SEC_PER_STEP = 0.42
TRIAL_OVERHEAD_S = 15.0  # with SEC_PER_STEP: engine set-up, final validation and checkpoint of one trial


# --- results.json ----------------------------------------------------------------------------------------

def load_results(path: Path, settings: dict) -> dict:
    """results.json's content (a new one when missing); refused when another protocol or other settings made it."""
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


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold out/results.lock for the whole command: two commands on one folder would lose each other's trials."""
    import fcntl

    with open(out / "results.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out} is in use by another benchmark command: wait for it, or use another --out") \
                from None
        yield


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


# --- one trial -----------------------------------------------------------------------------------------

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
    tracker.log_metrics({**flat_metrics(test, TEST_SPLIT), "params/adapter_trainable": n_adapter,
                         "params/trainable_total": n_trainable})
    return {"adapter_params": n_adapter, "trainable_params": n_trainable,
            "test_auc": {s: e["auc"] for s, e in test["scenarios"].items()}, "test_auc_macro": test["auc_macro"],
            "test_rows": test["n"]}


# --- the command ---------------------------------------------------------------------------------------

def run_benchmark(args: argparse.Namespace, argv: list[str], plan: Plan) -> dict:
    """Run (or with --plan, list) ``plan``'s missing trials into args.out; returns results.json's content."""
    t_start = time.perf_counter()
    out = Path(args.out)
    settings = {"config": args.config or "configs/demo.yaml", "overrides": list(args.overrides),
                "max_length": args.max_length, "eval_rows": args.eval_rows,
                "es_eval_every": args.es_eval_every, "es_patience": args.es_patience,
                "diagnostics_every": args.diagnostics_every}
    results = load_results(out / "results.json", settings)
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


def _run_locked(args, argv, plan: Plan, out: Path, settings: dict, results: dict, t_start: float) -> dict:
    from benchmarks.quality_report import write_reports
    from kernel.mlflow_client import MlflowTracker

    # Re-read under the lock: a command that just finished may have added trials.
    results = load_results(out / "results.json", settings) if (out / "results.json").is_file() else results
    for method, v in plan.variants.items():
        results["variants"].setdefault(method, list(v.overrides))
    uri = args.tracking_uri or f"sqlite:///{out.resolve() / 'mlflow.db'}"
    parent = MlflowTracker(uri, args.experiment)
    parent_file = out / "parent_run_id"
    parent.start(run_name=f"quality {out.name}",
                 run_id=parent_file.read_text().strip() if parent_file.is_file() else None,
                 params={k: json.dumps(v) for k, v in settings.items()})
    parent_file.write_text(parent.run_id)
    command = _Command(args, plan, out, results, uri, parent.run_id)
    try:
        for dataset in plan.datasets:
            command.run_dataset(dataset)
        wall = time.perf_counter() - t_start
        results["commands"].append({"command": "python -m benchmarks.quality " + shlex.join(argv),
                                    "wall_s": round(wall, 1), "trained": command.trained, "tested": command.tested})
        command.save()
        docs = Path(args.docs) if args.docs else None
        for p in write_reports(results, out, docs, args.docs_name):
            parent.log_artifact(p, "report")
        parent.log_artifact(out / "results.json", "report")
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end()
    print(f"wall time {wall / 60:.1f} min ({wall:.0f} s): {command.trained} trials trained, {command.tested} tests "
          "scored", flush=True)
    return results


class _Command:
    """One command's pass over its plan: the trials still missing from results.json, in the plan's order."""

    def __init__(self, args, plan: Plan, out: Path, results: dict, uri: str, parent_id: str) -> None:
        self.args, self.plan, self.out, self.results = args, plan, out, results
        self.uri, self.parent_id = uri, parent_id
        self.done = {_trial_key(t) for t in results["trials"]}
        self.mine = plan.mine()
        self.trained = self.tested = 0

    def save(self) -> None:  # after every trial: a rerun resumes from here
        write_json_atomic(self.out / "results.json", self.results)

    def run_dataset(self, dataset: str) -> None:
        """Prepare the dataset, train its missing trials; per (budget, method) choose the lr and test it."""
        from training.trainer import task_map_for

        args, results = self.args, self.results
        base = [f"work_dir={self.out / dataset}", f"train.eval_rows_per_scenario={args.eval_rows}",
                f"features.max_length={args.max_length}", *dataset_overrides(dataset), *args.overrides]
        cfg = load_config(args.config or DEFAULT_CONFIG, base)
        data_dir = prepare(dataset, cfg, self.out / dataset)
        results["data"][dataset] = json.loads((data_dir / "prepared.json").read_text())
        results["train_rows"][dataset] = train_rows(data_dir)
        cell = parse_grid_cell(dataset)
        if cell is not None:
            results["grid"][dataset] = {"conflict": cell[0], "imbalance": cell[1]}
        num_tasks = len(task_map_for(cfg, data_dir))
        shapes = adapter_shapes(cfg, num_tasks)
        matched_r = matched_lora_rank(shapes, mtl_adapter_params(shapes, cfg, num_tasks))
        for budget in self.plan.budgets:
            budget_args = budget.overrides(args.es_eval_every, args.es_patience)
            for method in self.plan.methods:
                for lr, seed in itertools.product(self.plan.lrs, self.plan.seeds):
                    key = (dataset, budget.name, method, lr, seed)
                    if key in self.done or key not in self.mine:
                        continue
                    extra = trial_overrides(method, self.plan.variants, cfg, matched_r, lr, seed,
                                            args.diagnostics_every)
                    self.run_trial(key, load_config(args.config or DEFAULT_CONFIG, [*base, *budget_args, *extra]),
                                   data_dir)
                self.tested += _select_and_test(results, dataset, budget, method, self.plan, data_dir, cfg, self.uri,
                                                args.experiment)
                self.save()

    def run_trial(self, key: tuple, run_cfg: Config, data_dir: Path) -> None:
        """Train one (dataset, budget, method, lr, seed) as an MLflow child run; a diverged trial is kept as failed."""
        from kernel.mlflow_client import MlflowTracker

        dataset, budget, method, lr, seed = key
        name = f"{dataset}/{budget}/{method}/lr{lr:g}/seed{seed}"
        print(f"== {name}", flush=True)
        child = MlflowTracker(self.uri, self.args.experiment)
        child.start(run_name=name, tags={"mlflow.parentRunId": self.parent_id, "dataset": dataset, "budget": budget,
                                         "method": method, "lr": str(lr), "seed": str(seed)})
        run_dir = self.out / dataset / "runs" / budget / method / f"lr{lr:g}-seed{seed}"
        t_trial = time.perf_counter()
        try:
            row = train_trial(run_cfg, data_dir, run_dir, child)
        except TrainingDiverged as e:  # an unstable lr is a result of the lr grid, not a crash
            child.end("FAILED")
            row = {"r": run_cfg.adapter.r, "train_s": time.perf_counter() - t_trial, "samples_per_s": None,
                   "steps": None, "best_step": None, "val_auc_macro": None, "val_auc": {}, "val_curve": [],
                   "diag": {}, "model_dir": None, "diverged": str(e).splitlines()[0]}
            print(f"   diverged: {row['diverged']}", flush=True)
        except BaseException:
            child.end("FAILED")
            raise
        else:
            child.end()
        self.results["trials"].append({"dataset": dataset, "budget": budget, "method": method, "lr": lr, "seed": seed,
                                       "run_id": child.run_id, **row})
        self.trained += 1
        self.save()
        print(f"   val macro AUC {row['val_auc_macro'] or float('nan'):.4f}  {row['steps']} steps "
              f"{row['train_s']:.0f} s", flush=True)
        gc.collect()  # the trial's engine and model hold reference cycles: free them before the next trial
        if not gc.get_freeze_count():
            # What the first trial imported (torch, transformers, DeepSpeed: half a million objects) lives for
            # the whole command; frozen, it is not rescanned by every later collection (0.3-0.5 s each).
            gc.freeze()


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
            t.update(score_trial(t, data_dir, training_precision(cfg.train.precision), tracker))
            print(f"   {dataset}/{budget.name}/{method}: lr {lr:g} chosen on validation; "
                  f"seed {t['seed']} test macro AUC {t['test_auc_macro']:.4f}", flush=True)
            n += 1
    return n
