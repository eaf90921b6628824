"""The scheduled job: generate (demo only) → ingest → train → export → score → monitor → promote.

    python -m job.run --config configs/demo.yaml                     # the whole chain
    python -m job.run --config X.yaml --run-date 2026-12-01          # one scheduled run, replayable
    python -m job.run --config X.yaml --skip generate,promote        # skip steps
    python -m job.run --config X.yaml --only score,monitor           # just these
    python -m job.run --config X.yaml --force train                  # redo a step (and what follows)

A step runs again exactly when what decides its output changed since its last finished run: its config
sections, its input data (file listing: paths, sizes, modification times), the outputs of the steps it
reads from, or the code version (``job.state``). Then every later step runs again too. Otherwise it is up to
date and its recorded outcome stands: a replay of a finished run changes nothing and exits with the code the
run had (a breach stays 3, a failed gate stays 4). An interrupted step with unchanged inputs resumes (an
interrupted training continues from its last checkpoint).

``--run-date`` (any run key) gives each scheduled run its own folder, ``<work_dir>/runs/<key>/``, and its
own state; ``{run_date}`` in ``data.source`` and ``data.score_input`` is replaced by it (``/data/{run_date}``).
The MLflow store and registry (``tracking.uri``, default ``<work_dir>/mlflow.db``) stay shared.

Exit codes: kernel.exit_codes (0 ok, 1 failure, 2 bad input, 3 breach, 4 gate, 5 MLflow unreachable, 6 data
gate, 7 diverged, 8 resource unavailable: no space, an unwritable path, a dead worker, the promotion lease).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

from evaluation.metrics import describe_macro
from job.lineage import JobLineage
from job.state import Fingerprint, JobState, code_version
from job.steps import STEP_TABLE, STEPS, JobContext, JobPaths, champion_now, config_section
from kernel import exit_codes
from kernel.config import Config, add_config_args, load_config
from kernel.errors import ConfigError

RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def plan(cfg: Config, only: list[str], skip: list[str]) -> list[str]:
    steps = only or STEPS
    unknown = [s for s in steps + skip if s not in STEPS]
    if unknown:
        raise ConfigError(f"unknown steps {unknown}; steps are {STEPS}")
    if cfg.data.source != "synthetic":
        skip = [*skip, "generate"]
    return [s for s in STEPS if s in steps and s not in skip]


def fingerprint(ctx: JobContext, name: str) -> Fingerprint:
    step = STEP_TABLE[name]
    upstream = {}
    for up in step.upstream:
        if up == "generate" and ctx.cfg.data.source != "synthetic":
            continue
        rec = ctx.records.get(up)
        if rec is None:
            raise ConfigError(f"step {name} reads the output of step {up}, which has not run in "
                              f"{ctx.paths.root} (run it, or drop it from --skip/--only)")
        upstream[up] = rec.output
    return Fingerprint(config_section(ctx.cfg, step.config_keys), step.inputs(ctx), upstream, code_version())


def run_job(cfg: Config, only: list[str] | None = None, skip: list[str] | None = None,
            force: list[str] | None = None, run_key: str | None = None) -> int:
    paths = JobPaths(cfg, run_key)
    state = JobState(paths.state)
    ctx = JobContext(paths, {s: r for s in STEPS if (r := state.read(s)) is not None},
                     JobLineage(cfg, paths.state, run_key))
    code, rerun_rest = exit_codes.OK, False
    steps = plan(cfg, only or [], skip or [])
    for name in steps:
        fp = fingerprint(ctx, name)
        rec = ctx.records.get(name)
        if rec and rec.fingerprint == fp.digest and name not in (force or []) and not rerun_rest:
            print(f"[{name}] up to date (inputs unchanged since {rec.finished_at}; --force {name} to redo)")
        else:
            print(f"[{name}] running ({_why(name, rec, fp, force or [], rerun_rest)})", flush=True)
            t0 = time.time()
            resume = state.begin(name, fp)
            outcome = STEP_TABLE[name].run(ctx, resume)
            outcome.info["seconds"] = round(time.time() - t0, 1)
            # What the step leaves is its new input state (promotion moves the champion it reads): record the
            # fingerprint as it is now, so that a replay finds the step up to date.
            rec = state.finish(name, fingerprint(ctx, name), outcome.outputs, outcome.info, outcome.exit_code)
            ctx.records[name] = rec
            rerun_rest = True
            print(f"[{name}] done in {outcome.info['seconds']} s", flush=True)
        code = code or _report(name, rec)
    ctx.lineage.finish(code)
    print_summary(ctx, steps)
    return code


def _why(name: str, rec, fp: Fingerprint, force: list[str], rerun_rest: bool) -> str:
    if rec is None:
        return "no finished run yet"
    if name in force:
        return "forced"
    if rerun_rest:
        return "an earlier step ran again"
    return "changed: " + ("; ".join(fp.changes_since(rec.parts)) or "inputs")


def _report(name: str, rec) -> int:
    """A step's recorded outcome, printed when it is not a success; its exit code."""
    if rec.exit_code == exit_codes.MONITORING_BREACH:
        print("monitoring breaches:\n  - " + "\n  - ".join(rec.info.get("breaches", [])))
    elif rec.exit_code == exit_codes.GATE_FAILED:
        print(f"promotion gate failed for version {rec.info.get('candidate_version')}:\n  - "
              + "\n  - ".join(rec.info.get("reasons", [])))
    return rec.exit_code


def print_summary(ctx: JobContext, steps: list[str]) -> None:
    """The run's results; ``steps``: this invocation's steps (a skipped step's old record says nothing about
    this run). The registry line reads the registry itself."""
    train, mon, promo = ctx.info("train"), ctx.info("monitor"), ctx.info("promote")
    cfg, p = ctx.cfg, ctx.paths
    print("\n=== summary ===" + (f" (run {p.run_key})" if p.run_key else ""))
    if train.get("val"):
        print(f"validation macro AUC {describe_macro(train['val'])} (MLflow run {train.get('run_id')})")
    per = (mon.get("summary") or {}).get("metrics") or {}
    if per:
        print(f"{'scenario':<14}{'test AUC':>10}{'  95% CI':>18}{'rows':>8}")
        for name, m in per.items():
            auc = m.get("auc")
            ci = f"[{m.get('auc_ci_low', 0):.3f}, {m.get('auc_ci_high', 0):.3f}]" if auc is not None else ""
            print(f"{name:<14}{(f'{auc:.4f}' if auc is not None else 'n/a'):>10}{ci:>18}{m.get('n', 0):>8}")
        overall = mon["summary"].get("overall") or {}
        if overall.get("auc_macro") is not None:
            missing = overall.get("scenarios_without_auc") or []
            note = (f"  (over {overall['auc_macro_scenarios']} of {overall['scenarios_total']} scenarios; no AUC "
                    f"for {', '.join(missing)})" if missing else "")
            print(f"{'macro':<14}{overall['auc_macro']:>10.4f}{note}")
    if "promote" in steps and "passed" in promo:  # this run's gate (run now, or up to date): its verdict
        verdict = (f"version {promo['candidate_version']} promoted" if promo["passed"] else
                   f"gate failed, version {promo['candidate_version']} not promoted: {'; '.join(promo['reasons'])}")
        print(f"promotion {verdict}")
    if cfg.tracking.enabled:  # the champion as the registry has it now, whatever ran (or was skipped)
        name, champion = cfg.tracking.registered_model, champion_now(ctx).get("champion")
        print(f"registry champion: models:/{name}@champion is version {champion}" if champion
              else f"registry: models:/{name} has no champion")
    for name in ("data", "train", "export", "scores", "monitor"):
        print(f"{name:<8} {getattr(p, name)}")
    print(f"mlflow   {cfg.tracking_uri}  (mlflow ui --backend-store-uri {cfg.tracking_uri})")


def _csv(s: str | None) -> list[str]:
    return [x for x in (s or "").split(",") if x]


def quiet_progress_bars() -> None:
    """A scheduled job's log should hold our lines, not per-file download/shard progress bars."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def with_run_key(cfg: Config, run_key: str | None) -> Config:
    """``{run_date}`` in data.source and data.score_input becomes the run key."""
    if run_key is None:
        return cfg
    if not RUN_KEY.match(run_key):
        raise ConfigError(f"--run-date {run_key!r}: use letters, digits, '.', '_' or '-' (e.g. 2026-12-01)")
    for field in ("source", "score_input"):
        value = getattr(cfg.data, field)
        if "{run_date}" in value:
            setattr(cfg.data, field, value.replace("{run_date}", run_key))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m job.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run-date", "--run-key", dest="run_key",
                   help="this scheduled run's key, e.g. 2026-12-01: its own folder and state; replayable")
    p.add_argument("--only", help=f"comma-separated steps to run, of {STEPS}")
    p.add_argument("--skip", help="comma-separated steps to skip")
    p.add_argument("--force", help="comma-separated steps to run again even if up to date")
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_progress_bars()
    args = build_parser().parse_intermixed_args(argv)

    def work() -> int:
        cfg = with_run_key(load_config(args.config, args.overrides), args.run_key)
        return run_job(cfg, _csv(args.only), _csv(args.skip), _csv(args.force), args.run_key)

    return exit_codes.run_cli(work, resume_hint="rerun the same command: finished steps are kept and the "
                                                 "interrupted one resumes")


if __name__ == "__main__":
    sys.exit(main())
