"""The job's steps: what each reads (config, data, upstream steps), what it writes, and the stage it runs.

Each step calls its stage's function with the typed config (never a command line):

    generate  pipeline.synthetic.generate        (demo data only)
    ingest    pipeline.ingest.run
    train     training.launch.run                (one process; multi-GPU training runs training.launch itself)
    export    serving.export.cli.run             (the trained config; registers the model when tracking is on)
    score     serving.scoring.cli.run            (the job's config)
    monitor   monitoring.check.run
    promote   monitoring.promote.run
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from job import warm
from job.lineage import JobLineage, ingest_profile, log_input
from job.state import listing
from kernel import exit_codes, storage
from kernel.atomic import publish_dir, staging_dir
from kernel.config import Config, to_dict
from kernel.errors import QuarantineRateExceeded
from kernel.metric_names import EVAL_SET, TEST_SPLIT, TRAFFIC, metric_name
from kernel.mlflow_client import mlflow_client
from kernel.stage import Outcome
from monitoring import check, promote
from monitoring.history import recent_checks
from pipeline import ingest
from pipeline.synthetic import generate
from serving.export.cli import run as export
from serving.export.source import export_config
from serving.layout import CALIBRATED_REFERENCE_FILE, REFERENCE_FILE
from serving.registry import aliases as registry
from serving.registry.cache import resolve_model
from serving.scoring.cli import notes as score_notes
from serving.scoring.cli import run as score
from training import launch
from training.compare import compare_on_validation

STEPS = ["generate", "ingest", "train", "export", "score", "monitor", "promote"]
log = logging.getLogger(__name__)


class JobPaths:
    """Where one run of the job reads and writes. With a run key (``--run-date 2026-12-01``) every output
    lives under ``<work_dir>/runs/<key>/``; the MLflow store, feature cache and tracking spool stay shared
    in ``<work_dir>`` (so the registry's champion carries over from night to night).

    ``work_dir`` may be an object-store URI (s3://bucket/ads-relevance): state, data, export, scores and the
    monitoring report then live there; what must be on local disk (the demo's raw data, the training
    checkpoints and model folder, caches) lives in ``cfg.local_work_dir``."""

    def __init__(self, cfg: Config, run_key: str | None = None):
        self.cfg, self.run_key = cfg, run_key
        self.work = cfg.work_dir if cfg.remote_work_dir else Path(cfg.work_dir)
        self.root = storage.join(self.work, "runs", run_key) if run_key else self.work
        local = cfg.local_work_dir / "runs" / run_key if run_key else cfg.local_work_dir
        self.state = storage.join(self.root, "state")
        self.raw = local / "raw" / "ads.parquet"
        self.data = storage.join(self.root, "data")
        self.train = local / "train"
        self.export = storage.join(self.root, "export")
        self.scores = storage.join(self.root, "scores")
        self.monitor = storage.join(self.root, "monitor")
        self.champion_scores = storage.join(self.root, "champion_scores")

    @property
    def source(self) -> Path | str:
        return self.raw if self.cfg.data.source == "synthetic" else self.cfg.data.source

    @property
    def score_input(self) -> str | Path:
        return self.cfg.data.score_input or storage.join(self.data, "test.parquet")

    @property
    def score_data(self) -> str:
        """What the score and monitor steps measure (kernel.metric_names): the traffic of data.score_input,
        else the ingest's test split."""
        return TRAFFIC if self.cfg.data.score_input else TEST_SPLIT


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
    lineage: JobLineage

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
    with ctx.lineage.child("ingest") as tracker:
        outcome = ingest.run(ctx.cfg, ctx.paths.source, ctx.paths.data, tracker=tracker)
        if ctx.cfg.tracking.enabled:  # the source as read: its schema, and the rows ingestion accepted from it
            stats = storage.read_json(storage.join(ctx.paths.data, "stats.json"), "ingestion's stats")
            log_input(tracker, ctx.paths.source, "source", "ingestion", profile=ingest_profile(stats))
        return outcome


def run_train(ctx: JobContext, resume: bool) -> Outcome:
    p, cfg = ctx.paths, ctx.cfg
    if cfg.train.compare:
        return run_compare(ctx, resume)
    return launch.run(cfg, p.data, p.train, resume=resume and (p.train / "checkpoints" / "latest").is_file(),
                      tags=ctx.lineage.tags("train"))


def run_compare(ctx: JobContext, resume: bool) -> Outcome:
    """train.compare: each method on the same data and budget (train/<method>/), the winner by validation
    macro AUC (training.compare) becomes train/model, and the evidence goes to every method's MLflow run."""
    p, cfg = ctx.paths, ctx.cfg
    results = {}
    for method, c in warm.compare_configs(ctx, resume).items():  # a starting model: its own method starts from it
        out = p.train / method
        results[method] = launch.run(c, p.data, out, resume=resume and (out / "checkpoints" / "latest").is_file(),
                                     tags={**ctx.lineage.tags("train"), "compare_method": method}).info
    evidence = compare_on_validation({m: Path(r["model_dir"]) for m, r in results.items()}, p.data,
                                     cfg.monitoring.bootstrap_rounds, cfg.monitoring.seed)
    winner = results[evidence["winner"]]
    with staging_dir(p.train / "model") as stage:  # the winner's folder, published whole as train/model
        shutil.copytree(winner["model_dir"], stage / "model")
        publish_dir(stage / "model", p.train / "model")
    log_compare(ctx, results, evidence)
    lead = evidence["pairs"].get(f"{evidence['ranked'][0]}-{evidence['ranked'][1]}") if len(results) > 1 else None
    log.info(f"compare: {evidence['winner']} wins on validation macro AUC "
             + ", ".join(f"{m} {evidence['methods'][m]['auc_macro']:.4f}" for m in evidence["ranked"])
             + (f"; lead {lead['delta']:+.4f} [95% CI {lead['ci_low']:+.4f}, {lead['ci_high']:+.4f}]"
                f"{'' if evidence['decisive'] else ', within the noise'}" if lead else ""))
    return Outcome({**winner, "model_dir": str(p.train / "model"), "compare": evidence}, [p.train / "model"])


def log_compare(ctx: JobContext, results: dict, evidence: dict) -> None:
    if not ctx.cfg.tracking.enabled:
        return
    client = mlflow_client(ctx.cfg.tracking_uri, ctx.cfg.tracking.timeout_s)
    for method, result in results.items():
        if result["run_id"] is None:
            continue
        client.set_tag(result["run_id"], "compare_winner", evidence["winner"])
        client.set_tag(result["run_id"], "compare_decisive", str(evidence["decisive"]))
        client.log_dict(result["run_id"], evidence, "compare/evidence.json")


def run_export(ctx: JobContext, resume: bool) -> Outcome:
    cfg, p = ctx.cfg, ctx.paths
    model_dir = p.train / "model"
    manifest = export(export_config(model_dir), model_dir, p.export, valid=storage.join(p.data, "valid.parquet"),
                      tracking_uri=cfg.tracking_uri if cfg.tracking.enabled else None,
                      name=cfg.tracking.registered_model if cfg.tracking.enabled else None,
                      source_run_id=ctx.info("train").get("run_id"),
                      calibration_method=cfg.monitoring.calibration_method,
                      parent_run=ctx.lineage.parent_run_id).info
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
        storage.delete(p.scores)
    version = served_version(ctx)
    with ctx.lineage.child("score") as tracker:
        outcome = score(ctx.cfg, local_export(p), [str(p.score_input)], p.scores, model_version=version, resume=True,
                        quiet=True)
        summary = outcome.info
        if ctx.cfg.tracking.enabled:  # the input's own schema; its profile read from the canonical scores
            log_input(tracker, p.score_input, p.score_data, "scoring", profile_of=p.scores)
        tracker.set_tags({"model_version": version, "data": p.score_data})
        tracker.log_metrics({metric_name(p.score_data, k): summary[k]
                             for k in ("rows_in", "scored", "fallback", "quarantined") if summary.get(k) is not None})
    log.info(f"scored {summary['scored']} of {summary['rows_in']} rows ({summary['quarantined']} quarantined) "
             f"-> {p.scores}")
    for line in score_notes(summary):  # outputs of inputs that are gone or changed; unreadable row groups
        log.warning(line)
    if outcome.exit_code == exit_codes.DATA_GATE:  # the job stops here and exits with the data-gate code
        raise QuarantineRateExceeded(summary["quarantine_breach"])
    return Outcome({"dir": str(p.scores), **{k: summary[k] for k in ("rows_in", "scored", "quarantined")}},
                   [p.scores])


def local_export(p: JobPaths) -> Path:
    """The export folder on local disk (scoring loads it): itself, or the checked copy of an object-store one."""
    return resolve_model(p.export)[0] if storage.is_uri(p.export) else p.export


def run_monitor(ctx: JobContext, resume: bool) -> Outcome:
    """The morning report: this version's quality and drift, against the champion on the same rows, and the
    trend of the last monitoring runs of this model (read back from MLflow)."""
    p, cfg = ctx.paths, ctx.cfg
    reference = CALIBRATED_REFERENCE_FILE if cfg.serving.calibrate else REFERENCE_FILE
    version = served_version(ctx)
    history = recent_checks(cfg.tracking_uri, cfg, version, data=p.score_data) if cfg.tracking.enabled else None
    champion = champion_scores(ctx, version)
    with ctx.lineage.child("monitor") as tracker:
        outcome = check.run(cfg, p.scores, storage.join(p.export, reference), p.monitor, tracker=tracker,
                            model_version=version, champion=champion, history=history, data=p.score_data)
    log_test_metrics(ctx, outcome.info["summary"])
    return outcome


def champion_scores(ctx: JobContext, candidate: str) -> dict | None:
    """The current champion's scores of the same input (``<run>/champion_scores``), when there is another one."""
    cfg = ctx.cfg
    champ = champion_now(ctx).get("champion")
    if champ is None or f"{cfg.tracking.registered_model}/{champ}" == candidate:
        return None
    export_dir, version = resolve_model(f"models:/{cfg.tracking.registered_model}/{champ}", cfg.tracking_uri)
    out = ctx.paths.champion_scores
    storage.delete(out)
    outcome = score(cfg, export_dir, [str(ctx.paths.score_input)], out, model_version=version, quiet=True)  # no gate
    if warm.champion_scored_nothing(outcome):
        log.info(f"the champion ({version}) serves none of the scored scenarios (a new market): no comparison")
        return None
    return {"scored": out, "version": version}


def run_promote(ctx: JobContext, resume: bool) -> Outcome:
    version = ctx.info("export").get("version")
    if version is None:
        return Outcome({"skipped": "tracking is off or nothing was registered"}, [])
    cfg = ctx.cfg
    if champion_now(ctx).get("champion") == str(version):  # e.g. only a gate setting changed since it was promoted
        return Outcome({"passed": True, "reasons": [], "candidate_version": version, "champion_version": version,
                        "note": f"version {version} is already the champion"}, [])
    eval_paths = [str(storage.join(ctx.paths.data, "test.parquet")), *cfg.monitoring.gate_eval]
    with ctx.lineage.child("promote") as tracker:
        for path in eval_paths:
            log_input(tracker, path, TEST_SPLIT if path == eval_paths[0] else EVAL_SET, "evaluation")
        outcome = promote.run(cfg, eval_paths, candidate=version, about=model_card(ctx), eval_data=TEST_SPLIT,
                              require=warm.served_scenarios(ctx, champion_now(ctx).get("champion")))
        result = outcome.info
        tracker.set_tags({"candidate_version": version, "decision": "promoted" if result["passed"] else "rejected",
                          "data": TEST_SPLIT})
        tracker.log_metrics({metric_name(TEST_SPLIT, "auc", s): m["auc"]
                             for s, m in (result["metrics"]["candidate"] or {}).items() if m.get("auc") is not None})
    return outcome


def log_test_metrics(ctx: JobContext, summary: dict) -> None:
    """The metrics of the scored data (the test split, or the traffic of data.score_input), as MLflow metrics
    of the training run named by that data (``test_split/auc/us``, ``traffic/auc_macro``), so runs compare
    on them."""
    run_id, data = ctx.info("train").get("run_id"), ctx.paths.score_data
    if not ctx.cfg.tracking.enabled or not run_id:
        return
    metrics = {}
    for name, m in (summary.get("metrics") or {}).items():
        for key in ("auc", "auc_ci_low", "auc_ci_high", "pr_auc", "ece"):
            if m.get(key) is not None:
                metrics[metric_name(data, key, name)] = m[key]
    if (summary.get("overall") or {}).get("auc_macro") is not None:
        metrics[metric_name(data, "auc_macro")] = summary["overall"]["auc_macro"]
    if metrics:
        from mlflow.entities import Metric

        client = mlflow_client(ctx.cfg.tracking_uri, ctx.cfg.tracking.timeout_s)
        client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in metrics.items()])


def model_card(ctx: JobContext) -> dict:
    """What the registry's version description says about the model itself (promotion adds the evidence)."""
    cfg = ctx.cfg
    return {"method": cfg.adapter.method, "base_model": cfg.model.path if cfg.model.init != "random" else "random init",
            "pooling": cfg.model.pooling, "adapter": f"r={cfg.adapter.r}, n_up={cfg.adapter.n_up}, tau={cfg.adapter.tau}",
            "scenarios": warm.model_scenarios(ctx.paths.train / "model"),
            "started_from": ctx.info("train").get("started_from"), "training_run": ctx.info("train").get("run_id"),
            "scored_data": ctx.paths.score_data,
            "scored_metrics": (ctx.info("monitor").get("summary") or {}).get("metrics")}


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
    return {"champion": str(mv.version) if mv else None}


INGEST_KEYS = ["data.source", "data.columns", "data.scenarios", "data.max_chars", "data.overlong",
               "data.max_reject_rate", "data.filters", "data.split"]
MONITOR_KEYS = [f"monitoring.{k}" for k in (
    "bootstrap_rounds", "psi_threshold", "max_quarantine_rate", "calibration_bins", "length_psi_threshold",
    "drift_bins", "drift_min_rows", "fail_on_unseen_scenarios", "alert_min_auc", "seed")] + ["serving.calibrate"]
GATE_KEYS = ["monitoring.min_auc", "monitoring.auc_tolerance", "monitoring.bootstrap_rounds", "monitoring.seed",
             "monitoring.gate_eval", "tracking.registered_model"]

STEP_TABLE: dict[str, Step] = {s.name: s for s in [
    Step("generate", ["data.source", "data.synthetic"], [], run_generate),
    Step("ingest", INGEST_KEYS, ["generate"], run_ingest,
         inputs=lambda ctx: {} if ctx.cfg.data.source == "synthetic" else {"source": listing(ctx.cfg.data.source)}),
    Step("train", ["features", "model", "adapter", "train", "tracking.experiment"], ["ingest"], run_train,
         inputs=warm.start_input),
    Step("export", ["monitoring.calibration_method", "tracking.registered_model", "features.pair_format"],
         ["train", "ingest"], run_export),
    Step("score", ["serving", "data.columns", "data.filters", "data.score_input"], ["export", "ingest"], run_score,
         inputs=lambda ctx: {"score_input": listing(ctx.cfg.data.score_input)} if ctx.cfg.data.score_input else {}),
    Step("monitor", MONITOR_KEYS, ["score", "export"], run_monitor),
    Step("promote", GATE_KEYS, ["export", "ingest"], run_promote,
         inputs=lambda ctx: {**champion_now(ctx), "gate_eval": [listing(p) for p in ctx.cfg.monitoring.gate_eval]}),
]}
