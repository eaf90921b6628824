"""The scheduled job: generate (demo only) → ingest → train → export → score → monitor → promote.

    python -m pipeline.run --config configs/demo.yaml                # the whole chain
    python -m pipeline.run --config X.yaml --skip generate,promote   # skip steps
    python -m pipeline.run --config X.yaml --only score,monitor      # just these
    python -m pipeline.run --config X.yaml --force train             # redo a finished step

Every finished step leaves ``<work_dir>/state/<step>.json``; a rerun skips finished steps and resumes an
interrupted training from its last checkpoint, so a killed job is simply started again.

Exit codes (for schedulers):
    0  every step finished (and the candidate was promoted, or promotion was skipped)
    1  unexpected failure (a bug, or an outside system such as the MLflow server was unreachable)
    2  bad configuration or bad input data (the message names the key, file, column or scenario)
    3  monitoring found a breach (drift, calibration or quarantine-rate threshold)
    4  the promotion gate failed: the candidate stays registered but is not champion
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from kernel.config import Config, add_config_args, load_config
from kernel.errors import RelevanceError

STEPS = ["generate", "ingest", "train", "export", "score", "monitor", "promote"]
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_BREACH, EXIT_GATE = 0, 1, 2, 3, 4


class Job:
    """Paths and step bookkeeping for one work_dir."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.state = self.work / "state"
        self.raw = self.work / "raw" / "ads.parquet"
        self.data = self.work / "data"
        self.train = self.work / "train"
        self.export = self.work / "export"
        self.scores = self.work / "scores"
        self.monitor = self.work / "monitor"

    def done(self, step: str) -> dict | None:
        p = self.state / f"{step}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def mark(self, step: str, info: dict) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        tmp = self.state / f".{step}.json.tmp"
        tmp.write_text(json.dumps(info, indent=2, default=str))
        tmp.replace(self.state / f"{step}.json")


def step_generate(job: Job) -> dict:
    from pipeline.synthetic import generate

    generate(job.raw, job.cfg.data.synthetic)
    return {"path": str(job.raw)}


def step_ingest(job: Job) -> dict:
    from pipeline.ingest import run_ingest
    from kernel.tracking import open_tracker

    source = job.raw if job.cfg.data.source == "synthetic" else job.cfg.data.source
    tracker = open_tracker(job.cfg)
    tracker.start(run_name="ingest")
    report = run_ingest(job.cfg, source, job.data, tracker=tracker)
    tracker.end()
    return {"rows_in": report.rows_in, "accepted": report.rows_accepted, "quarantined": report.rows_quarantined}


def step_train(job: Job) -> dict:
    from training.launch import run

    resume = (job.train / "checkpoints" / "latest").is_file()
    result = run(job.cfg, job.data, job.train, resume=resume)
    return {"run_id": result.run_id, "model_dir": str(result.model_dir), "steps": result.steps,
            "val": result.best_metrics}


def step_export(job: Job) -> dict:
    from serving.export import main as export_main

    train = job.done("train") or {}
    argv = ["--run", str(job.train / "model"), "--out", str(job.export), "--valid", str(job.data / "valid.parquet"),
            "--name", job.cfg.tracking.registered_model, "--tracking-uri", job.cfg.tracking_uri]
    if train.get("run_id"):
        argv += ["--source-run-id", train["run_id"]]
    if export_main(argv) != 0:
        raise RuntimeError("export failed (see above)")
    return {"dir": str(job.export), "version": _latest_version(job.cfg)}


def _latest_version(cfg: Config) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri=cfg.tracking_uri).search_model_versions(
        f"name='{cfg.tracking.registered_model}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def _score_input(job: Job) -> Path:
    return Path(job.cfg.data.score_input) if job.cfg.data.score_input else job.data / "test.parquet"


def step_score(job: Job) -> dict:
    from serving.score import main as score_main

    argv = ["--model", str(job.export), "--input", str(_score_input(job)), "--output", str(job.scores), "--resume"]
    if score_main(argv) != 0:
        raise RuntimeError("batch scoring failed (see above)")
    return {"dir": str(job.scores)}


def step_monitor(job: Job) -> dict:
    from monitoring.check import run_check

    from serving.layout import CALIBRATED_REFERENCE_FILE, REFERENCE_FILE

    reference = CALIBRATED_REFERENCE_FILE if job.cfg.serving.calibrate else REFERENCE_FILE
    summary = run_check(job.scores, job.export / reference, job.monitor, job.cfg)
    return {"dir": str(job.monitor), "breaches": summary.get("breaches", []), "summary": summary}


def step_promote(job: Job) -> dict:
    from monitoring.promote import promote

    version = (job.done("export") or {}).get("version")
    if version is None:
        return {"skipped": "tracking is off or nothing was registered"}
    return promote(job.cfg.tracking.registered_model, version, str(job.data / "test.parquet"), job.cfg,
                   job.cfg.tracking_uri)


RUNNERS = {"generate": step_generate, "ingest": step_ingest, "train": step_train, "export": step_export,
           "score": step_score, "monitor": step_monitor, "promote": step_promote}


def plan(cfg: Config, only: list[str], skip: list[str]) -> list[str]:
    steps = only or STEPS
    unknown = [s for s in steps + skip if s not in STEPS]
    if unknown:
        raise RelevanceError(f"unknown steps {unknown}; steps are {STEPS}")
    if cfg.data.source != "synthetic":
        skip = [*skip, "generate"]
    return [s for s in STEPS if s in steps and s not in skip]


def run_job(cfg: Config, only: list[str] | None = None, skip: list[str] | None = None,
            force: list[str] | None = None) -> int:
    job = Job(cfg)
    code = EXIT_OK
    for step in plan(cfg, only or [], skip or []):
        if job.done(step) and step not in (force or []):
            print(f"[{step}] already done ({job.state / (step + '.json')}); --force {step} to redo")
            continue
        print(f"[{step}] ...", flush=True)
        t0 = time.time()
        info = RUNNERS[step](job)
        info["seconds"] = round(time.time() - t0, 1)
        job.mark(step, info)
        print(f"[{step}] done in {info['seconds']} s", flush=True)
        if step == "monitor" and info["breaches"]:
            print("monitoring breaches:\n  - " + "\n  - ".join(info["breaches"]))
            code = EXIT_BREACH
        if step == "promote" and info.get("passed") is False:
            print("promotion gate failed:\n  - " + "\n  - ".join(info.get("reasons", [])))
            code = code or EXIT_GATE
    print_summary(job)
    return code


def print_summary(job: Job) -> None:
    train, mon, promo = job.done("train"), job.done("monitor"), job.done("promote")
    print("\n=== summary ===")
    if train and train.get("val"):
        print(f"validation macro AUC {train['val']['auc_macro']:.4f} (MLflow run {train.get('run_id')})")
    if mon:
        per = mon["summary"].get("metrics", {})
        print(f"{'scenario':<14}{'test AUC':>10}{'  95% CI':>18}{'rows':>8}")
        for name, m in per.items():
            auc = m.get("auc")
            ci = f"[{m.get('auc_ci_low', 0):.3f}, {m.get('auc_ci_high', 0):.3f}]" if auc is not None else ""
            print(f"{name:<14}{(f'{auc:.4f}' if auc is not None else 'n/a'):>10}{ci:>18}{m.get('n', 0):>8}")
        macro = mon["summary"].get("overall", {}).get("auc_macro")
        if macro is not None:
            print(f"{'macro':<14}{macro:>10.4f}")
    if promo and "passed" in promo:
        name = job.cfg.tracking.registered_model
        verdict = (f"champion: models:/{name}@champion is version {promo['candidate_version']}" if promo["passed"]
                   else f"gate failed, version {promo['candidate_version']} not promoted: {'; '.join(promo['reasons'])}")
        print(f"registry {verdict}")
    for name in ("data", "train", "export", "scores", "monitor"):
        print(f"{name:<8} {getattr(job, name)}")
    print(f"mlflow   {job.cfg.tracking_uri}  (mlflow ui --backend-store-uri {job.cfg.tracking_uri})")


def _csv(s: str | None) -> list[str]:
    return [x for x in (s or "").split(",") if x]


def quiet_progress_bars() -> None:
    """A scheduled job's log should hold our lines, not per-file download/shard progress bars."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    quiet_progress_bars()
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--only", help=f"comma-separated steps to run, of {STEPS}")
    p.add_argument("--skip", help="comma-separated steps to skip")
    p.add_argument("--force", help="comma-separated finished steps to run again")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return run_job(cfg, _csv(args.only), _csv(args.skip), _csv(args.force))
    except RelevanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
