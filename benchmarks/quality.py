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

# The command's parts: benchmarks.protocol (the rules, the plan), benchmarks.quality_data (the datasets),
# benchmarks.quality_runner (training and testing the trials, results.json), benchmarks.quality_report.
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.in_process import exit_code, set_device
from benchmarks.protocol import (
    DEFAULT_ES_MAX_STEPS,
    DEFAULT_LRS,
    METHODS,
    VARIANTS,
    Plan,
    Variant,
    parse_budget,
    parse_variant,
    unknown_keys,
)
from benchmarks.quality_data import DATASETS, grid_cell
from benchmarks.quality_runner import DEFAULT_CONFIG, SEC_PER_STEP, run_benchmark
from kernel.config import add_config_args, load_config
from kernel.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    # --variants takes any number of words, so it also swallows trailing key=value overrides: give them back
    # (a variant is a catalogue name or NAME:key=value, with its ":" before the first "=").
    overrides = [v for v in args.variants if "=" in v and ":" not in v.split("=", 1)[0]]
    args.variants = [v for v in args.variants if v not in overrides]
    args.overrides = [*args.overrides, *overrides]

    def work() -> None:
        if args.steps is not None and args.steps < 1:
            raise ConfigError("--steps must be >= 1")
        set_device(args.device)
        run_benchmark(args, argv, make_plan(args))

    return exit_code(work)


if __name__ == "__main__":
    sys.exit(main())
