"""Adding a market to a trained model, and continuing yesterday's model on today's data: WDC Products, paired by seed.

    python -m benchmarks.new_market --out runs/new-market --seeds 0 1 2 --holdouts cameras computers \\
        --ks 100 300 1000 --ref-ks 100 1000 --docs docs
    python -m benchmarks.new_market --out runs/new-market --report-only --docs docs   # re-render the tables

Leave one market out (``--holdouts``; cameras is WDC's smallest, computers its largest): train MTL-LoRA and
LoRA from scratch on the other three (``base``, ``--steps``), then add the held-out market with k labelled rows:

    mtl_task_only   MTL-LoRA from its three-market model, train.adapt=task_only: only the new Λ_t, w_t train,
                    at ``--task-lr`` (default 1e-2: ten times train.lr; they are a few hundred numbers)
    mtl_task_only_lr  the same at train.lr
    mtl_all         MTL-LoRA from the same model, train.adapt=all: adapters and head continue on the k rows
    lora_all        LoRA from its own three-market model, fine-tuned on the k rows (LoRA has no task parameters)
    ref_<method>    the reference: each method from scratch on the three markets in full plus the k rows

A warm run trains ``--warm-steps`` steps (25 unless said; an arm at another count is named ``<arm>@<steps>``)
at its lr (``--warm-lr``, default train.lr; ``--task-lr`` for task_only); only the new market's rows are read.
Every model is scored on the WDC test split of the markets it knows. Reported: the new market's test AUC, each
known market's AUC change against the three-market model, and the cost (optimizer steps; wall seconds of
training, set-up and validation included).

Nightly (``--nightly``): the training rows split into two "days"; yesterday's model is MTL-LoRA from scratch
on day 1; today it continues on day 2 for each of ``--night-fractions`` of the from-scratch schedule, against
MTL-LoRA from scratch on day 2. Reported: macro test AUC and cost.

Every trial is one entry of ``<out>/results.json``, saved as soon as it is scored: a rerun skips what is done
(kill it at any time). ``--lock FILE`` holds an exclusive lock on FILE around each trial, so that heavy runs
sharing the machine take turns between trials. Config: configs/demo.yaml (MiniLM, r=8, bf16 through a
one-process ZeRO-2 engine) with one method per run, max length 48, validation capped at 256 rows a market.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.in_process import exit_code, set_device
from benchmarks.new_market_data import all_markets, known_markets, new_market, nightly_days
from benchmarks.quality_data import dataset_overrides, prepare
from kernel.atomic import write_json_atomic
from kernel.config import Config, load_config
from kernel.errors import ConfigError
from kernel.logs import setup_logging
from modeling.hardware import training_precision

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("mtl_task_only", "mtl_task_only_lr", "mtl_all", "lora_all")
WARM_STEPS = 25  # the warm schedule of an arm named without "@<steps>": a tenth of the from-scratch 250


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.new_market", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (results.json, runs, data)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--holdouts", nargs="+", default=["cameras", "computers"])
    p.add_argument("--ks", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--ref-ks", type=int, nargs="+", default=[100, 1000], help="k of the from-scratch references")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--steps", type=int, default=250, help="the from-scratch schedule")
    p.add_argument("--warm-steps", type=int, nargs="+", default=[WARM_STEPS],
                   help=f"steps of a run that adds a market; an arm run at other than {WARM_STEPS} is named "
                        "<arm>@<steps>")
    p.add_argument("--warm-lr", type=float, default=0.0, help="lr of mtl_all and lora_all (0: train.lr)")
    p.add_argument("--task-lr", type=float, default=1e-2, help="lr of mtl_task_only's Λ_t, w_t")
    p.add_argument("--nightly", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--night-fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--eval-rows", type=int, default=256, help="validation rows per market (training's own)")
    p.add_argument("--lock", help="a file to hold an exclusive lock on around each trial")
    p.add_argument("--report-only", action="store_true", help="only write the tables from results.json")
    p.add_argument("--docs", help="also write the tables and the plot into this folder (new_market.md section)")
    return p


class Bench:
    """One command's pass: the missing trials, in an order that gives every seed a full picture early."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.path = self.out / "results.json"
        self.results = json.loads(self.path.read_text()) if self.path.is_file() else {"trials": {}}
        self.results["settings"] = {k: v for k, v in vars(args).items() if k not in ("report_only", "docs", "lock")}
        base = [f"work_dir={self.out / 'work'}", *dataset_overrides("wdc"), f"features.max_length={args.max_length}",
                f"train.eval_rows_per_scenario={args.eval_rows}", "train.compare=[]", "tracking.enabled=false"]
        self.wdc = prepare("wdc", load_config(args.config, base), self.out / "wdc")
        self.base = [o for o in base if not o.startswith("data.scenarios")] + ["data.scenarios=[]"]

    def cfg(self, method: str, seed: int, *extra: str) -> Config:
        s = self.args.steps
        return load_config(self.args.config, [*self.base, f"adapter.method={method}", f"train.seed={seed}",
                                              f"train.max_steps={s}", f"train.eval_every={s}",
                                              f"train.checkpoint_every={s}", "train.keep_checkpoints=1", *extra])

    def warm(self, steps: int, lr: float = 0.0, adapt: str = "all") -> list[str]:
        return [f"train.adapt={adapt}", f"train.warm.steps={steps}", f"train.warm.lr={lr}",
                f"train.warm.warmup_steps={max(1, round(0.08 * steps))}"]

    def run(self) -> None:
        a = self.args
        for seed in a.seeds:
            for h in a.holdouts:
                for method in ("mtl_lora", "lora"):
                    self.trial(f"base/{h}/{method}/s{seed}", self.cfg(method, seed),
                               known_markets(self.wdc, self.out / "data" / f"known-{h}", h))
            for h in a.holdouts:
                for k in sorted(a.ks, key=lambda k: (k not in a.ref_ks, k)):
                    self.add_market(h, k, seed)
            if a.nightly:
                self.nightly(seed)

    def add_market(self, h: str, k: int, seed: int) -> None:
        a = self.args
        data = new_market(self.wdc, self.out / "data" / f"new-{h}-k{k}-s{seed}", h, k, seed)
        start = {m: self.out / "runs" / f"base/{h}/{m}/s{seed}" / "model" for m in ("mtl_lora", "lora")}
        for steps in a.warm_steps:
            task_only = self.warm(steps, 0.0, "task_only")
            arms = {"mtl_task_only": ("mtl_lora", [f"train.task_lr={a.task_lr}", *task_only]),
                    "mtl_task_only_lr": ("mtl_lora", ["train.warm.task_lr_scale=1", *task_only]),
                    "mtl_all": ("mtl_lora", self.warm(steps, a.warm_lr)),
                    "lora_all": ("lora", self.warm(steps, a.warm_lr))}
            suffix = "" if steps == WARM_STEPS else f"@{steps}"
            for arm in a.arms:
                method, extra = arms[arm]
                self.trial(f"add/{h}/k{k}/s{seed}/{arm}{suffix}",
                           self.cfg(method, seed, f"train.init_from={start[method]}", *extra), data)
        if k in a.ref_ks:
            full = all_markets(self.wdc, self.out / "data" / f"all-{h}-k{k}-s{seed}", h, k, seed)
            for method in ("mtl_lora", "lora"):
                self.trial(f"ref/{h}/k{k}/s{seed}/{method}", self.cfg(method, seed), full)

    def nightly(self, seed: int) -> None:
        day1, day2 = nightly_days(self.wdc, self.out / "data" / f"night-s{seed}", seed)
        self.trial(f"night/s{seed}/day1", self.cfg("mtl_lora", seed), day1)
        self.trial(f"night/s{seed}/scratch", self.cfg("mtl_lora", seed), day2)
        yesterday = self.out / "runs" / f"night/s{seed}/day1" / "model"
        for f in self.args.night_fractions:
            steps = max(1, round(f * self.args.steps))
            self.trial(f"night/s{seed}/warm{f:g}",
                       self.cfg("mtl_lora", seed, f"train.init_from={yesterday}", *self.warm(steps)), day2)

    def trial(self, name: str, cfg: Config, data: Path) -> None:
        """Train and score one trial (skipped when results.json has it), under --lock."""
        if name in self.results["trials"]:
            return
        with self._locked():
            print(f"== {name}", flush=True)
            row = train_and_score(cfg, data, self.out / "runs" / name, self.wdc / "test.parquet")
        self.results["trials"][name] = row
        write_json_atomic(self.path, self.results)
        print(f"   {row['steps']} steps {row['train_s']:.0f} s; test macro AUC {row['test_auc_macro']:.4f} "
              + " ".join(f"{s}={v:.4f}" for s, v in row["test_auc"].items()), flush=True)

    @contextlib.contextmanager
    def _locked(self):
        if not self.args.lock:
            yield
            return
        import fcntl

        with open(self.args.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def train_and_score(cfg: Config, data: Path, run_dir: Path, test_path: Path) -> dict:
    """Train (training.trainer), then score the test rows of the markets the model knows."""
    from training.trainer import train

    if run_dir.exists():  # a trial interrupted before it was recorded starts over
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    result = train(cfg, data, run_dir)
    train_s = time.perf_counter() - t0
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # DeepSpeed states: large, not needed
    t1 = time.perf_counter()
    test = test_metrics(result.model_dir, test_path, training_precision(cfg.train.precision))
    return {"steps": result.steps, "train_s": round(train_s, 1), "test_s": round(time.perf_counter() - t1, 1),
            "val_auc_macro": (result.best_metrics or {}).get("auc_macro"),
            "test_auc": {s: e["auc"] for s, e in test["scenarios"].items()}, "test_auc_macro": test["auc_macro"],
            "test_rows": test["n"]}


def test_metrics(model_dir: Path, test_path: Path, precision: str) -> dict:
    """Per-market test metrics of a trained-model folder on the test rows of the markets it knows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from features.tokenize import build_features
    from modeling.artifact import load_trained
    from modeling.base import load_tokenizer
    from training.evaluate import evaluate

    cfg, task_map, model = load_trained(model_dir)
    table = pq.read_table(test_path)
    table = table.filter(pc.is_in(table["scenario"], value_set=pa.array(task_map.names, pa.string())))
    tok = load_tokenizer(cfg)
    feats = build_features(table, tok, task_map, cfg.features.max_length,
                           cache_dir=cfg.local_work_dir / "features_cache")
    device = torch.device("cpu")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return evaluate(model, feats, task_map, 128, tok.pad_token_id, device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(step="new-market")  # the product's log lines; no progress bars in a log file

    def work() -> None:
        if not args.report_only:
            set_device("cpu")
            Bench(args).run()
        from benchmarks.new_market_report import write_report

        path = Path(args.out) / "results.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no results yet (run without --report-only first)")
        results = json.loads(path.read_text())
        for path in write_report(results, Path(args.out), Path(args.docs) if args.docs else None):
            print(f"wrote {path}")

    return exit_code(work)

if __name__ == "__main__":
    sys.exit(main())
