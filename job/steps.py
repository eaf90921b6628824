"""The job's steps: what each reads (config, data, upstream steps), what it writes, and the stage it runs.

Each step calls its stage's function with the typed config (never a command line):

    generate  pipeline.synthetic.generate        (demo data only)
    ingest    pipeline.ingest.run_ingest
    train     training.launch.run                (one process; multi-GPU training runs training.launch itself)
    export    serving.export.export_model        (registers the model when tracking is on)
    score     serving.score.score_files
    monitor   monitoring.check.run_check
    promote   monitoring.promote.promote
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from job.state import listing
from kernel import exit_codes
from kernel.config import Config, to_dict
from kernel.tracking import open_tracker
from monitoring import registry
from monitoring.check import run_check
from monitoring.promote import promote
from pipeline.ingest import run_ingest as ingest
from pipeline.synthetic import generate
from serving.export import export_model
from serving.layout import CALIBRATED_REFERENCE_FILE, REFERENCE_FILE
from serving.score import ScoreRequest, check_quarantine_rate, score_files
from training.launch import run as train

STEPS = ["generate", "ingest", "train", "export", "score", "monitor", "promote"]


class JobPaths:
    """Where one run of the job reads and writes. With a run key (``--run-date 2026-12-01``) every output
    lives under ``<work_dir>/runs/<key>/``; the MLflow store, feature cache and tracking spool stay shared
    in ``<work_dir>`` (so the registry's champion carries over from night to night)."""

    def __init__(self, cfg: Config, run_key: str | None = None):
        self.cfg, self.run_key = cfg, run_key
        self.work = Path(cfg.work_dir)
        self.root = self.work / "runs" / run_key if run_key else self.work
        self.state = self.root / "state"
        self.raw = self.root / "raw" / "ads.parquet"
        self.data = self.root / "data"
        self.train = self.root / "train"
        self.export = self.root / "export"
        self.scores = self.root / "scores"
        self.monitor = self.root / "monitor"

    @property
    def source(self) -> Path | str:
        return self.raw if self.cfg.data.source == "synthetic" else self.cfg.data.source

    @property
    def score_input(self) -> Path:
        return Path(self.cfg.data.score_input) if self.cfg.data.score_input else self.data / "test.parquet"


@dataclass
class Outcome:
    info: dict
    outputs: list[Path]
    exit_code: int = exit_codes.OK


@dataclass
class Step:
    name: str
    config_keys: list[str]  # dotted paths into the config that decide the output
    upstream: list[str]  # steps whose outputs this one reads
    run: Callable[["JobContext", bool], Outcome]  # (context, resume) -> outcome
    inputs: Callable[["JobContext"], dict] = lambda ctx: {}


@dataclass
class JobContext:
    paths: JobPaths
    records: dict  # step name -> StepRecord of the step's latest finished run

    @property
    def cfg(self) -> Config:
        return self.paths.cfg

    def info(self, step: str) -> dict:
        rec = self.records.get(step)
        return rec.info if rec else {}


def config_section(cfg: Config, keys: list[str]) -> dict:
    """{dotted key: value} for each key (a key may name a whole section)."""
    tree = to_dict(cfg)
    out = {}
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    out["tracking_uri"] = cfg.tracking_uri if cfg.tracking.enabled else None
    return out


# --- the runners ---------------------------------------------------------------------------------------------

def run_generate(ctx: JobContext, resume: bool) -> Outcome:

    generate(ctx.paths.raw, ctx.cfg.data.synthetic)
    return Outcome({"path": str(ctx.paths.raw)}, [ctx.paths.raw])


def run_ingest(ctx: JobContext, resume: bool) -> Outcome:

    tracker = open_tracker(ctx.cfg)
    tracker.start(run_name="ingest")
    try:
        report = ingest(ctx.cfg, ctx.paths.source, ctx.paths.data, tracker=tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return Outcome({"rows_in": report.rows_in, "accepted": report.rows_accepted,
                    "quarantined": report.rows_quarantined}, [ctx.paths.data])


def run_train(ctx: JobContext, resume: bool) -> Outcome:

    p = ctx.paths
    result = train(ctx.cfg, p.data, p.train, resume=resume and (p.train / "checkpoints" / "latest").is_file())
    return Outcome({"run_id": result.run_id, "model_dir": str(result.model_dir), "steps": result.steps,
                    "val": result.best_metrics}, [p.train / "model"])


def run_export(ctx: JobContext, resume: bool) -> Outcome:

    cfg, p = ctx.cfg, ctx.paths
    manifest = export_model(str(p.train / "model"), p.export, valid=p.data / "valid.parquet",
                            tracking_uri=cfg.tracking_uri if cfg.tracking.enabled else None,
                            name=cfg.tracking.registered_model if cfg.tracking.enabled else None,
                            source_run_id=ctx.info("train").get("run_id"),
                            calibration_method=cfg.monitoring.calibration_method)
    registered = manifest.get("registered") or {}
    return Outcome({"dir": str(p.export), "model_version": manifest["model_version"],
                    "version": registered.get("version")}, [p.export])


def served_version(ctx: JobContext) -> str:
    """What scores are labelled with: the registry's ``name/version``, else the export's own digest."""
    info = ctx.info("export")
    if info.get("version"):
        return f"{ctx.cfg.tracking.registered_model}/{info['version']}"
    return info.get("model_version", "unknown")


def run_score(ctx: JobContext, resume: bool) -> Outcome:

    p = ctx.paths
    if not resume:  # other inputs or another model: nothing of an earlier scoring may stay behind
        shutil.rmtree(p.scores, ignore_errors=True)
    summary = score_files(ScoreRequest(input=[str(p.score_input)], output=p.scores, resume=True, quiet=True),
                          ctx.cfg, p.export, served_version(ctx))
    print(f"scored {summary['scored']} of {summary['rows_in']} rows ({summary['quarantined']} quarantined) "
          f"-> {p.scores}")
    check_quarantine_rate(summary, p.scores)  # raises: the job exits with the data-gate code
    return Outcome({"dir": str(p.scores), **{k: summary[k] for k in ("rows_in", "scored", "quarantined")}},
                   [p.scores])


def run_monitor(ctx: JobContext, resume: bool) -> Outcome:

    p = ctx.paths
    reference = CALIBRATED_REFERENCE_FILE if ctx.cfg.serving.calibrate else REFERENCE_FILE
    summary = run_check(p.scores, p.export / reference, p.monitor, ctx.cfg)
    code = exit_codes.MONITORING_BREACH if summary["breaches"] else exit_codes.OK
    return Outcome({"dir": str(p.monitor), "breaches": summary["breaches"], "summary": summary}, [p.monitor], code)


def run_promote(ctx: JobContext, resume: bool) -> Outcome:

    version = ctx.info("export").get("version")
    if version is None:
        return Outcome({"skipped": "tracking is off or nothing was registered"}, [])
    cfg = ctx.cfg
    if champion_now(ctx).get("champion") == version:  # e.g. only a gate setting changed since it was promoted
        return Outcome({"passed": True, "reasons": [], "candidate_version": version, "champion_version": version,
                        "note": f"version {version} is already the champion"}, [])
    result = promote(cfg.tracking.registered_model, version, str(ctx.paths.data / "test.parquet"), cfg,
                     cfg.tracking_uri)
    return Outcome(result, [], exit_codes.OK if result["passed"] else exit_codes.GATE_FAILED)


def champion_now(ctx: JobContext) -> dict:
    """The promotion gate compares with the current champion: a new champion is a new input."""
    cfg = ctx.cfg
    if not cfg.tracking.enabled:
        return {}

    client = registry.registry_client(cfg.tracking_uri)
    try:
        mv = registry.alias_version(client, cfg.tracking.registered_model, registry.CHAMPION)
    except Exception:  # noqa: BLE001 - no registered model yet: no champion
        return {"champion": None}
    return {"champion": mv.version if mv else None}


INGEST_KEYS = ["data.source", "data.columns", "data.scenarios", "data.max_chars", "data.overlong",
               "data.max_reject_rate", "data.filters", "data.split"]
MONITOR_KEYS = [f"monitoring.{k}" for k in (
    "bootstrap_rounds", "psi_threshold", "max_quarantine_rate", "calibration_bins", "length_psi_threshold",
    "drift_bins", "drift_min_rows", "fail_on_unseen_scenarios", "alert_min_auc", "seed")] + ["serving.calibrate"]
GATE_KEYS = ["monitoring.min_auc", "monitoring.auc_tolerance", "monitoring.bootstrap_rounds", "monitoring.seed",
             "tracking.registered_model"]

STEP_TABLE: dict[str, Step] = {s.name: s for s in [
    Step("generate", ["data.source", "data.synthetic"], [], run_generate),
    Step("ingest", INGEST_KEYS, ["generate"], run_ingest,
         inputs=lambda ctx: {} if ctx.cfg.data.source == "synthetic" else {"source": listing(ctx.cfg.data.source)}),
    Step("train", ["features", "model", "adapter", "train", "tracking.experiment"], ["ingest"], run_train),
    Step("export", ["monitoring.calibration_method", "tracking.registered_model", "features.pair_format"],
         ["train", "ingest"], run_export),
    Step("score", ["serving", "data.columns", "data.filters", "data.score_input"], ["export", "ingest"], run_score,
         inputs=lambda ctx: {"score_input": listing(ctx.cfg.data.score_input)} if ctx.cfg.data.score_input else {}),
    Step("monitor", MONITOR_KEYS, ["score", "export"], run_monitor),
    Step("promote", GATE_KEYS, ["export", "ingest"], run_promote, inputs=champion_now),
]}
