"""Monitoring check of a batch of scored rows: quality per scenario, drift against the training reference.

    python -m monitoring.check --scored runs/demo/scores --reference runs/demo/export/reference.json \\
        --out runs/demo/monitoring [--quarantine runs/demo/quarantine.parquet] [--config configs/demo.yaml] \\
        [monitoring.psi_threshold=0.2 ...] [--tracking-uri sqlite:///runs/demo/mlflow.db --run-id RUN]

Input: the Parquet file or directory (hive partitions allowed) written by batch scoring, with columns
``scenario`` (string), ``score`` (probability), optionally ``label`` (0/1, nulls allowed: those rows only
count for drift) and ``query``, ``title`` (their lengths in characters are profiled; ``query_len`` and
``title_len`` columns are used instead when present).
``--quarantine``: the rows rejected before scoring (default: ``<scored>/_quarantine`` when the scored input
is a batch-scoring output folder); quarantine rate = quarantined / (quarantined + scored). Folders and
files whose names start with "_" or "." are not read as scores.

Output: ``out/report.html`` (+ ``out/plots/*.png``) and ``out/summary.json``; both are logged to the MLflow run
(artifact path ``monitoring``) when a tracking URI is given, with the headline numbers as metrics.

Exit codes (kernel.exit_codes): 0 no breach; 2 bad input or configuration (the message names the file,
column, row or key); 3 at least one breach (drift above a threshold, unseen scenarios, quarantine rate, or
AUC alert); 5 the MLflow server did not answer.
"""
from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from evaluation.drift import drift_report, load_reference
from evaluation.metrics import scenario_metrics, summarize
from kernel import exit_codes
from kernel.atomic import write_json_atomic
from kernel.config import Config, add_config_args, load_config
from kernel.errors import DataError
from kernel.mlflow_client import MlflowTracker
from monitoring.report import write_report

EXIT_OK, EXIT_INPUT, EXIT_BREACH = exit_codes.OK, exit_codes.BAD_INPUT, exit_codes.MONITORING_BREACH
QUARANTINE_DIR = "_quarantine"  # batch scoring writes its rejected rows here, inside the output folder


class Tracker(Protocol):
    """What run_check logs to, e.g. ``kernel.mlflow_client.MlflowTracker`` after ``start()``."""

    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_artifacts(self, path: str, artifact_path: str | None = None) -> None: ...


def _dataset(path: str | Path, what: str) -> ds.Dataset:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: {what} does not exist")
    try:
        return ds.dataset(p, format="parquet", partitioning="hive" if p.is_dir() else None)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p}: cannot read {what} as Parquet ({e})") from e


def read_scored(path: str | Path) -> dict[str, np.ndarray | None]:
    """Columns as numpy arrays: scenario, score, label (float, NaN = unlabelled; None if absent), query_len,
    title_len (None if absent). Validated per file so errors name the file, the column and the row."""
    dset = _dataset(path, "scored input")
    names = set(dset.schema.names)
    missing = {"scenario", "score"} - names
    if missing:
        raise DataError(f"{path}: scored input lacks columns {sorted(missing)} (has {sorted(names)})")
    proj = {"scenario": pc.field("scenario").cast(pa.string()), "score": pc.field("score").cast(pa.float64())}
    if "label" in names:
        proj["label"] = pc.field("label").cast(pa.float64())
    for col in ("query", "title"):
        if f"{col}_len" in names:  # lengths already computed by the scorer
            proj[f"{col}_len"] = pc.field(f"{col}_len").cast(pa.int64())
        elif col in names:
            proj[f"{col}_len"] = pc.utf8_length(pc.field(col).cast(pa.string()))
    parts = []
    for frag in dset.get_fragments():
        t = frag.to_table(schema=dset.schema, columns=proj)
        for col in ("scenario", "score"):
            if t[col].null_count:
                row = pc.index(pc.is_null(t[col]), True).as_py()
                raise DataError(f"{frag.path}: column {col}: {t[col].null_count} nulls (first at row {row})")
        s = t["score"].to_numpy()
        bad = np.flatnonzero(~np.isfinite(s) | (s < 0) | (s > 1))
        if len(bad):
            raise DataError(f"{frag.path}: column score: {len(bad)} values outside [0, 1] "
                            f"(first at row {bad[0]}: {s[bad[0]]})")
        if "label" in proj:
            y = t["label"].to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~np.isnan(y) & (y != 0) & (y != 1))
            if len(bad):
                raise DataError(f"{frag.path}: column label: {len(bad)} values are not 0/1 "
                                f"(first at row {bad[0]}: {y[bad[0]]})")
        parts.append(t)
    if not parts:
        raise DataError(f"{path}: scored input holds no Parquet files")
    t = pa.concat_tables(parts)
    out: dict[str, np.ndarray | None] = {
        "scenario": t["scenario"].to_numpy(zero_copy_only=False).astype(str),
        "score": t["score"].to_numpy(),
    }
    out["label"] = t["label"].to_numpy(zero_copy_only=False) if "label" in proj else None
    for col in ("query_len", "title_len"):
        out[col] = t[col].fill_null(0).to_numpy() if col in proj else None
    return out


def count_rows(path: str | Path) -> int:
    return _dataset(path, "quarantine file").count_rows()


def _metric_key(*parts: str) -> str:
    return ".".join(re.sub(r"[^A-Za-z0-9_./: -]", "_", p) for p in parts)


def headline_metrics(summary: dict) -> dict[str, float]:
    """Numbers worth a time series in MLflow: breaches, macro AUC, per-scenario AUC/ECE/PSI."""
    out = {"monitoring.breaches": float(len(summary["breaches"])), "monitoring.rows": float(summary["rows"])}
    if summary["drift"]["quarantine_rate"] is not None:
        out["monitoring.quarantine_rate"] = summary["drift"]["quarantine_rate"]
    if (summary.get("overall") or {}).get("auc_macro") is not None:
        out["monitoring.auc_macro"] = summary["overall"]["auc_macro"]
    for name, m in (summary.get("metrics") or {}).items():
        for k in ("auc", "ece", "log_loss"):
            if m.get(k) is not None:
                out[_metric_key("monitoring", name, k)] = m[k]
    for name, d in summary["drift"]["scenarios"].items():
        if d["psi_score"] is not None:
            out[_metric_key("monitoring", name, "psi_score")] = d["psi_score"]
    return out


def run_check(scored_path, reference_path, out_dir, cfg: Config, quarantine_path=None, tracker=None) -> dict:
    """Compute metrics and drift, write report.html + summary.json into out_dir, log them; return the summary.

    ``summary["breaches"]`` lists every breach as a readable string (empty: healthy).
    """
    mon = cfg.monitoring
    reference = load_reference(reference_path)
    cols = read_scored(scored_path)
    n = len(cols["score"])
    quarantine_rate = None
    if quarantine_path is None and (Path(scored_path) / QUARANTINE_DIR).is_dir():
        quarantine_path = Path(scored_path) / QUARANTINE_DIR  # batch scoring's own rejects
    if quarantine_path is not None:
        q = count_rows(quarantine_path)
        quarantine_rate = q / (q + n) if q + n else 0.0

    metrics, overall, labelled = None, None, 0
    if cols["label"] is not None:
        m = ~np.isnan(cols["label"])
        labelled = int(m.sum())
        if labelled:
            metrics = scenario_metrics(cols["scenario"][m], cols["label"][m].astype(np.int8), cols["score"][m],
                                       bootstrap_rounds=mon.bootstrap_rounds, seed=mon.seed,
                                       bins=mon.calibration_bins)
            overall = summarize(metrics)
    drift = drift_report(reference, cols["scenario"], cols["score"], cols["query_len"], cols["title_len"],
                         quarantine_rate, mon)
    breaches = list(drift["breaches"])
    if metrics and mon.alert_min_auc > 0:
        for name, v in metrics.items():
            if v["auc"] is not None and v["auc"] < mon.alert_min_auc:
                breaches.append(f"scenario {name!r}: AUC {v['auc']:.3f} < monitoring.alert_min_auc "
                                f"{mon.alert_min_auc} ({v['n']} labelled rows)")
    summary = {
        "scored": str(scored_path), "reference": str(reference_path),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": n, "labelled_rows": labelled,
        "thresholds": {k: getattr(mon, k) for k in ("psi_threshold", "length_psi_threshold", "max_quarantine_rate",
                                                    "drift_min_rows", "alert_min_auc", "fail_on_unseen_scenarios")},
        "metrics": metrics, "overall": overall, "drift": drift, "breaches": breaches,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_report(summary, out, reference)
    write_json_atomic(out / "summary.json", summary)
    if tracker is not None:
        tracker.log_metrics(headline_metrics(summary))
        tracker.log_artifacts(str(out), "monitoring")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monitoring.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scored", required=True, help="scored Parquet file or directory")
    p.add_argument("--reference", required=True, help="reference.json saved with the export")
    p.add_argument("--out", required=True, help="output folder for report.html, plots/ and summary.json")
    p.add_argument("--quarantine", help="Parquet file or directory of quarantined rows")
    p.add_argument("--tracking-uri", help="MLflow tracking URI to log the report to")
    p.add_argument("--run-id", help="MLflow run to log to (default: a new run in tracking.experiment)")
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    return exit_codes.run_cli(lambda: _work(args))


def _work(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    tracker = None
    if args.tracking_uri:

        tracker = MlflowTracker(args.tracking_uri, cfg.tracking.experiment, cfg.tracking.timeout_s)
        tracker.start(run_name="monitoring-check", run_id=args.run_id)
    try:
        summary = run_check(args.scored, args.reference, args.out, cfg, args.quarantine, tracker)
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.end()
    for b in summary["breaches"]:
        print(f"BREACH: {b}", file=sys.stderr)
    print(f"report: {Path(args.out) / 'report.html'} ({len(summary['breaches'])} breaches)")
    return EXIT_BREACH if summary["breaches"] else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
