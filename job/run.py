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

Logs go to stderr, one line per record with a timestamp, a level and the step that logged it
(``--log-level``, ``--log-format json`` for log collectors; kernel.logs). The run ends with its summary on
stdout, also written as ``<run root>/summary.json`` (job.summary).

Exit codes: kernel.exit_codes (0 ok, 1 failure, 2 bad input, 3 breach, 4 gate, 5 MLflow unreachable, 6 data
gate, 7 diverged, 8 resource unavailable: no space, an unwritable path, a dead worker, the promotion lease).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time

from job.lineage import JobLineage
from job.state import Fingerprint, JobState, code_version
from job.steps import STEP_TABLE, STEPS, JobContext, JobPaths, champion_now, config_section
from job.summary import build_summary, format_summary, write_summary
from kernel import exit_codes
from kernel.config import Config, add_config_args, load_config
from kernel.errors import ConfigError
from kernel.logs import add_logging_args, log_step, setup_from_args

log = logging.getLogger(__name__)

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
        with log_step(name):
            fp = fingerprint(ctx, name)
            rec = ctx.records.get(name)
            if rec and rec.fingerprint == fp.digest and name not in (force or []) and not rerun_rest:
                log.info("up to date (inputs unchanged since %s; --force %s to redo)", rec.finished_at, name)
            else:
                log.info("running (%s)", _why(name, rec, fp, force or [], rerun_rest))
                t0 = time.time()
                resume = state.begin(name, fp)
                outcome = STEP_TABLE[name].run(ctx, resume)
                outcome.info["seconds"] = round(time.time() - t0, 1)
                # What the step leaves is its new input state (promotion moves the champion it reads): record
                # the fingerprint as it is now, so that a replay finds the step up to date.
                rec = state.finish(name, fingerprint(ctx, name), outcome.outputs, outcome.info, outcome.exit_code)
                ctx.records[name] = rec
                rerun_rest = True
                log.info("done in %s s", outcome.info["seconds"], extra={"seconds": outcome.info["seconds"]})
            code = code or _report(rec)
    ctx.lineage.finish(code)
    champion = champion_now(ctx).get("champion") if cfg.tracking.enabled else None
    summary = build_summary(ctx, code, steps, champion)
    path = write_summary(paths.root, summary)
    print(format_summary(summary), flush=True)
    log.info("summary written to %s", path)
    return code


def _why(name: str, rec, fp: Fingerprint, force: list[str], rerun_rest: bool) -> str:
    if rec is None:
        return "no finished run yet"
    if name in force:
        return "forced"
    if rerun_rest:
        return "an earlier step ran again"
    return "changed: " + ("; ".join(fp.changes_since(rec.parts)) or "inputs")


def _report(rec) -> int:
    """A step's recorded outcome, logged when it is not a success; its exit code."""
    if rec.exit_code == exit_codes.MONITORING_BREACH:
        log.warning("monitoring breaches:\n  - " + "\n  - ".join(rec.info.get("breaches", [])))
    elif rec.exit_code == exit_codes.GATE_FAILED:
        log.warning(f"promotion gate failed for version {rec.info.get('candidate_version')}:\n  - "
                    + "\n  - ".join(rec.info.get("reasons", [])))
    return rec.exit_code


def _csv(s: str | None) -> list[str]:
    return [x for x in (s or "").split(",") if x]


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
    add_logging_args(p)
    p.add_argument("--run-date", "--run-key", dest="run_key",
                   help="this scheduled run's key, e.g. 2026-12-01: its own folder and state; replayable")
    p.add_argument("--only", help=f"comma-separated steps to run, of {STEPS}")
    p.add_argument("--skip", help="comma-separated steps to skip")
    p.add_argument("--force", help="comma-separated steps to run again even if up to date")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_from_args(args, "job")

    def work() -> int:
        cfg = with_run_key(load_config(args.config, args.overrides), args.run_key)
        return run_job(cfg, _csv(args.only), _csv(args.skip), _csv(args.force), args.run_key)

    return exit_codes.run_cli(work, resume_hint="rerun the same command: finished steps are kept and the "
                                                 "interrupted one resumes")


if __name__ == "__main__":
    sys.exit(main())
