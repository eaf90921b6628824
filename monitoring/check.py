"""Monitoring check of a batch of scored rows: quality per scenario, drift against the training reference.

    python -m monitoring.check --scored runs/demo/scores --reference runs/demo/export/reference.json \\
        --out runs/demo/monitoring [--quarantine runs/demo/quarantine.parquet] [--config configs/demo.yaml] \\
        [monitoring.psi_threshold=0.2 ...] [--tracking-uri sqlite:///runs/demo/mlflow.db --run-id RUN] \\
        [--model-version ads-relevance/3] [--champion-scored runs/demo/champion_scores \\
        --champion-version ads-relevance/2] [--history 10]

Input: the Parquet file or directory (hive partitions allowed) written by batch scoring, with columns
``scenario`` (string), ``score`` (probability), optionally ``label`` (0/1, nulls allowed: those rows only
count for drift) and ``query``, ``title`` (their lengths in characters are profiled; ``query_len`` and
``title_len`` columns are used instead when present; ``monitoring.scored``).
``--quarantine``: the rows rejected before scoring (default: ``<scored>/_quarantine`` when the scored input
is a batch-scoring output folder); quarantine rate = quarantined / (quarantined + scored). Folders and
files whose names start with "_" or "." are not read as scores.

Output: ``out/report.html`` (+ ``out/plots/*.png``) and ``out/summary.json`` (on an object store:
published with a commit marker, ``kernel.storage.output_dir``); both are logged to the MLflow run
(artifact path ``monitoring``) when a tracking URI is given, with the headline numbers as metrics and the
tags of ``monitoring.history.run_tags`` (stage=monitor, data, model_version, model_name, champion_version),
by which the next check finds this run for its trend plots. ``--data-name`` says what the scored rows are
(``traffic``, the default; ``test_split``; ``eval_set``): the report shows it and every metric is named by it,
``<data>/auc/<scenario>``, ``<data>/auc_macro``, ``<data>/psi_score/<scenario>`` (kernel.metric_names).

``--model-version`` (default: the scored input's ``model_version`` column when it holds one value) is shown
in the report's header. ``--champion-scored``: the champion's batch-scoring output of the same input; its
rows are matched to this input's labelled rows on (source_file, source_row), and per scenario both AUCs and
the paired bootstrap CI of their difference are reported (``monitoring.champion``). ``--history N``: the last N
finished monitoring runs of ``tracking.experiment`` (of the same registered model when the version names
one) are read back from ``--tracking-uri`` and drawn as trends (0: none).

Exit codes (kernel.exit_codes): 0 no breach; 2 bad input or configuration (the message names the file,
column, row or key); 3 at least one breach (drift above a threshold, unseen scenarios, quarantine rate, or
AUC alert); 5 the MLflow server did not answer.
"""
from __future__ import annotations

import argparse
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from evaluation.drift import drift_report, load_reference
from evaluation.metrics import pr_curve_points, roc_curve_points, scenario_metrics, summarize
from kernel import exit_codes, storage
from kernel.atomic import write_json_atomic
from kernel.config import Config, MonitoringConfig, add_config_args, load_config
from kernel.errors import DataError
from kernel.hashing import bytes_digest
from kernel.logs import add_logging_args, setup_from_args
from kernel.metric_names import TRAFFIC
from kernel.mlflow_client import MlflowTracker
from kernel.stage import Outcome, stage_tracker
from monitoring.champion import compare_champion
from monitoring.history import metric_key, recent_checks, run_tags
from monitoring.report import write_report
from monitoring.scored import QUARANTINE_DIR, count_rows, read_scored, scored_model_version

EXIT_OK, EXIT_INPUT, EXIT_BREACH = exit_codes.OK, exit_codes.BAD_INPUT, exit_codes.MONITORING_BREACH
THRESHOLDS = ("psi_threshold", "length_psi_threshold", "max_quarantine_rate", "drift_min_rows", "alert_min_auc",
              "fail_on_unseen_scenarios")
log = logging.getLogger(__name__)


def headline_metrics(summary: dict) -> dict[str, float]:
    """Numbers worth a time series in MLflow: breaches, macro AUC, per-scenario AUC/ECE/PSI, each named by
    the data it was measured on (``summary["data"]``): ``traffic/auc/shoes``, ``traffic/auc_macro``."""
    data = summary.get("data") or TRAFFIC
    out = {metric_key(data, "breaches"): float(len(summary["breaches"])),
           metric_key(data, "rows"): float(summary["rows"])}
    if summary["drift"]["quarantine_rate"] is not None:
        out[metric_key(data, "quarantine_rate")] = summary["drift"]["quarantine_rate"]
    if (summary.get("overall") or {}).get("auc_macro") is not None:
        out[metric_key(data, "auc_macro")] = summary["overall"]["auc_macro"]
    for name, m in (summary.get("metrics") or {}).items():
        for k in ("auc", "ece", "log_loss"):
            if m.get(k) is not None:
                out[metric_key(data, k, name)] = m[k]
    for name, d in summary["drift"]["scenarios"].items():
        if d["psi_score"] is not None:
            out[metric_key(data, "psi_score", name)] = d["psi_score"]
    for name, c in ((summary.get("champion") or {}).get("scenarios") or {}).items():
        if c.get("delta") is not None:  # candidate AUC - champion AUC on the matched rows
            out[metric_key(data, "auc_delta_vs_champion", name)] = c["delta"]
    return out


def _curves(scenarios: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, dict]:
    """{scenario: {"roc": roc_curve_points, "pr": pr_curve_points}} of the labelled rows (None: one class)."""
    out = {}
    for name in sorted(set(scenarios.tolist())):
        m = scenarios == name
        out[name] = {"roc": roc_curve_points(labels[m], scores[m]), "pr": pr_curve_points(labels[m], scores[m])}
    return out


def labelled_quality(cols: dict, mon: MonitoringConfig) -> tuple[dict | None, dict | None, int, dict | None]:
    """(per-scenario metrics, their summary, labelled rows, ROC/PR curves) of the rows with a label; Nones
    when there are none."""
    if cols["label"] is None:
        return None, None, 0, None
    m = ~np.isnan(cols["label"])
    labelled = int(m.sum())
    if not labelled:
        return None, None, 0, None
    scenarios, labels, scores = cols["scenario"][m], cols["label"][m].astype(np.int8), cols["score"][m]
    metrics = scenario_metrics(scenarios, labels, scores, bootstrap_rounds=mon.bootstrap_rounds, seed=mon.seed,
                               bins=mon.calibration_bins)
    return metrics, summarize(metrics), labelled, _curves(scenarios, labels, scores)


def auc_alerts(metrics: dict | None, mon: MonitoringConfig) -> list[str]:
    """A breach per labelled scenario whose AUC is below ``monitoring.alert_min_auc`` (0: off)."""
    if not metrics or mon.alert_min_auc <= 0:
        return []
    return [f"scenario {name!r}: AUC {v['auc']:.3f} < monitoring.alert_min_auc {mon.alert_min_auc} "
            f"({v['n']} labelled rows)" for name, v in metrics.items()
            if v["auc"] is not None and v["auc"] < mon.alert_min_auc]


def quarantine_rate(scored, quarantine, rows: int) -> float | None:
    """quarantined / (quarantined + scored); ``quarantine`` defaults to batch scoring's own rejects beside the
    scores. None when there is no quarantine to count."""
    if quarantine is None and storage.is_dir(storage.join(scored, QUARANTINE_DIR)):
        quarantine = storage.join(scored, QUARANTINE_DIR)
    if quarantine is None:
        return None
    q = count_rows(quarantine)
    return q / (q + rows) if q + rows else 0.0


def check(cfg: Config, scored, reference: dict, *, quarantine=None, model_version: str | None = None,
          champion: dict | None = None, data: str = TRAFFIC) -> tuple[dict, dict | None]:
    """(the summary without its paths and history, the ROC/PR curves): metrics, drift, breaches and the
    comparison with the champion (see ``run``)."""
    mon = cfg.monitoring
    cols = read_scored(scored, keys=champion is not None)
    if model_version is None:
        model_version = scored_model_version(scored)
    n = len(cols["score"])
    rate = quarantine_rate(scored, quarantine, n)
    metrics, overall, labelled, curves = labelled_quality(cols, mon)
    comparison = None
    if champion is not None:
        if not labelled:
            raise DataError(f"{scored}: no labelled rows to compare with the champion on")
        if champion.get("version") is None and champion.get("scored") is not None:
            champion = {**champion, "version": scored_model_version(champion["scored"])}
        comparison = compare_champion(cols, ~np.isnan(cols["label"]), champion, model_version, mon)
    drift = drift_report(reference, cols["scenario"], cols["score"], cols["query_len"], cols["title_len"],
                         rate, mon)
    summary = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": data, "model_version": model_version, "rows": n, "labelled_rows": labelled,
        "thresholds": {k: getattr(mon, k) for k in THRESHOLDS},
        "metrics": metrics, "overall": overall, "drift": drift,
        "breaches": list(drift["breaches"]) + auc_alerts(metrics, mon), "champion": comparison,
    }
    return summary, curves


def run(cfg: Config, scored: str | Path, reference: str | Path, out: str | Path, *, quarantine=None,
        tracker=None, model_version: str | None = None, champion: dict | None = None,
        history: list[dict] | None = None, data: str = TRAFFIC) -> Outcome:
    """The monitoring check: metrics and drift of ``scored`` against the ``reference`` profile, written as
    report.html + summary.json into ``out`` and logged to ``tracker``. Outcome info: dir, breaches (readable
    strings; empty: healthy), summary; exit code MONITORING_BREACH when there is a breach.

    ``data``: what the scored rows are (kernel.metric_names: traffic, test_split, eval_set); it names the
    metrics and is shown in the report.

    ``quarantine``: the rows rejected before scoring (default: batch scoring's ``<scored>/_quarantine``).
    ``model_version``: the version whose scores these are, e.g. "ads-relevance/3" (default: the scored
    input's ``model_version`` column when it holds a single value). Shown in the report's header, stored as
    ``summary["model_version"]`` and set as the run's ``model_version`` tag.

    ``champion``: the champion's scores of the same input, to compare with. Either
    ``{"version": "ads-relevance/2", "scored": <the champion's batch-scoring output: Parquet file or folder>}``
    (the simplest: score the same input files with the champion, pass the output folder; ``version``
    defaults to that output's ``model_version`` column), or in memory ``{"version": ..., "source_file":
    array, "source_row": array, "score": array, "scenario": array (optional), "label": array (optional)}``.
    Rows are matched on (source_file, source_row), the key batch scoring writes: the scored input must then
    have those columns too, each key must be unique on each side, and the champion's scenario/label (when
    given) must agree with this input's on the matched rows (else DataError: the keys point at other rows).
    The comparison uses this input's labelled rows that the champion also scored; ``summary["champion"]``
    holds per scenario both AUCs, the difference with its paired bootstrap CI, the rows, and the counts of
    unmatched rows (``monitoring.champion``). It informs; it is not a breach (the promotion gate decides).

    ``history``: earlier monitoring runs, oldest first, as ``monitoring.history.read_history`` returns them;
    the report draws each scenario's AUC and score PSI over them with this run last. None: no trend section.

    With a ``tracker`` the run gets the tags of ``monitoring.history.run_tags`` (stage=monitor,
    model_version, model_name, champion_version), the headline metrics and the report folder as artifacts.
    """
    ref = load_reference(reference)
    summary, curves = check(cfg, scored, ref, quarantine=quarantine, model_version=model_version,
                            champion=champion, data=data)
    summary = {"scored": str(scored), "reference": str(reference), **summary,
               # the trend's earlier points as the report drew them (the full records: monitoring.history)
               "history": None if history is None else [
                   {k: h.get(k) for k in ("run_id", "start_time", "model_version", "scenarios")} for h in history]}
    # An object-store out: the report is written in a local folder, kept (the tracker may still be sending
    # it), and published there, files first and a commit marker last.
    kept = cfg.local_work_dir / "reports" / bytes_digest(str(out), 16)
    with storage.output_dir(out, local=kept) as folder:
        write_report(summary, folder, ref, curves=curves, history=history)
        write_json_atomic(folder / "summary.json", summary)
    if tracker is not None:
        tracker.set_tags(run_tags(summary["model_version"], (summary["champion"] or {}).get("version"), data))
        tracker.log_metrics(headline_metrics(summary))
        tracker.log_artifacts(str(folder), "monitoring")
    code = EXIT_BREACH if summary["breaches"] else EXIT_OK
    return Outcome({"dir": str(out), "breaches": summary["breaches"], "summary": summary}, [out], code)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monitoring.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scored", required=True, help="scored Parquet file or directory")
    p.add_argument("--reference", required=True, help="reference.json saved with the export")
    p.add_argument("--out", required=True, help="output folder for report.html, plots/ and summary.json")
    p.add_argument("--quarantine", help="Parquet file or directory of quarantined rows")
    p.add_argument("--tracking-uri", help="MLflow tracking URI to log the report to")
    p.add_argument("--run-id", help="MLflow run to log to (default: a new run in tracking.experiment)")
    p.add_argument("--model-version", help="version whose scores these are, e.g. ads-relevance/3 "
                                           "(default: the scored input's model_version column)")
    p.add_argument("--champion-scored", help="the champion's batch-scoring output of the same input, to compare "
                                             "with (rows matched on source_file, source_row)")
    p.add_argument("--champion-version", help="the champion's version (default: its model_version column)")
    p.add_argument("--data-name", default=TRAFFIC,
                   help="what the scored rows are, which names the metrics: traffic (default), test_split, eval_set")
    p.add_argument("--history", type=int, default=10, metavar="N",
                   help="trend over the last N finished monitoring runs read from --tracking-uri (0: none)")
    add_config_args(p)
    add_logging_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_from_args(args, "monitor")

    def work() -> int:
        cfg = load_config(args.config, args.overrides)

        def start():  # a run of --tracking-uri (resumed with --run-id)
            tracker = MlflowTracker(args.tracking_uri, cfg.tracking.experiment, cfg.tracking.timeout_s,
                                    cfg.tracking.artifact_uri)
            tracker.start(run_name="monitoring-check", run_id=args.run_id)
            return tracker

        with stage_tracker(None, start if args.tracking_uri else None) as tracker:
            version = args.model_version or scored_model_version(args.scored)
            champion = {"scored": args.champion_scored, "version": args.champion_version} \
                if args.champion_scored else None
            history = None if tracker is None or args.history <= 0 else recent_checks(
                args.tracking_uri, cfg, version, args.history, exclude_run=tracker.run_id, data=args.data_name)
            outcome = run(cfg, args.scored, args.reference, args.out, quarantine=args.quarantine, tracker=tracker,
                          model_version=version, champion=champion, history=history, data=args.data_name)
        for b in outcome.info["breaches"]:
            log.warning(f"BREACH: {b}")
        log.info(f"report: {Path(args.out) / 'report.html'} ({len(outcome.info['breaches'])} breaches)")
        return outcome.exit_code

    return exit_codes.run_cli(work)


if __name__ == "__main__":
    raise SystemExit(main())
