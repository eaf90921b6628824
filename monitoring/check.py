"""Monitoring check of a batch of scored rows: quality per scenario, drift against the training reference.

    python -m monitoring.check --scored runs/demo/scores --reference runs/demo/export/reference.json \\
        --out runs/demo/monitoring [--quarantine runs/demo/quarantine.parquet] [--config configs/demo.yaml] \\
        [monitoring.psi_threshold=0.2 ...] [--tracking-uri sqlite:///runs/demo/mlflow.db --run-id RUN] \\
        [--model-version ads-relevance/3] [--champion-scored runs/demo/champion_scores \\
        --champion-version ads-relevance/2] [--history 10]

Input: the Parquet file or directory (hive partitions allowed) written by batch scoring, with columns
``scenario`` (string), ``score`` (probability), optionally ``label`` (0/1, nulls allowed: those rows only
count for drift) and ``query``, ``title`` (their lengths in characters are profiled; ``query_len`` and
``title_len`` columns are used instead when present).
``--quarantine``: the rows rejected before scoring (default: ``<scored>/_quarantine`` when the scored input
is a batch-scoring output folder); quarantine rate = quarantined / (quarantined + scored). Folders and
files whose names start with "_" or "." are not read as scores.

Output: ``out/report.html`` (+ ``out/plots/*.png``) and ``out/summary.json``; both are logged to the MLflow run
(artifact path ``monitoring``) when a tracking URI is given, with the headline numbers as metrics and the
tags of ``monitoring.history.run_tags`` (stage=monitor, model_version, model_name, champion_version), by
which the next check finds this run for its trend plots.

``--model-version`` (default: the scored input's ``model_version`` column when it holds one value) is shown
in the report's header. ``--champion-scored``: the champion's batch-scoring output of the same input; its
rows are matched to this input's labelled rows on (source_file, source_row), and per scenario both AUCs and
the paired bootstrap CI of their difference are reported (see ``run_check``). ``--history N``: the last N
finished monitoring runs of ``tracking.experiment`` (of the same registered model when the version names
one) are read back from ``--tracking-uri`` and drawn as trends (0: none).

Exit codes (kernel.exit_codes): 0 no breach; 2 bad input or configuration (the message names the file,
column, row or key); 3 at least one breach (drift above a threshold, unseen scenarios, quarantine rate, or
AUC alert); 5 the MLflow server did not answer.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evaluation.drift import drift_report, load_reference
from evaluation.metrics import (
    CI_LEVEL,
    paired_auc_difference,
    pr_curve_points,
    roc_curve_points,
    scenario_metrics,
    summarize,
)
from kernel import exit_codes, storage
from kernel.atomic import write_json_atomic
from kernel.config import Config, add_config_args, load_config
from kernel.errors import DataError
from kernel.hashing import bytes_digest
from kernel.mlflow_client import MlflowTracker
from monitoring.history import metric_key, model_name_of, read_history, run_tags
from monitoring.report import write_report
from pipeline.reader import ParquetSource

EXIT_OK, EXIT_INPUT, EXIT_BREACH = exit_codes.OK, exit_codes.BAD_INPUT, exit_codes.MONITORING_BREACH
QUARANTINE_DIR = "_quarantine"  # batch scoring writes its rejected rows here, inside the output folder
ROW_KEY = ("source_file", "source_row")  # written by batch scoring: a row's input file and its position there


class Tracker(Protocol):
    """What run_check logs to, e.g. ``kernel.mlflow_client.MlflowTracker`` after ``start()``."""

    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_artifacts(self, path: str, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...


def read_scored(path: str | Path, keys: bool = False) -> dict[str, np.ndarray | None]:
    """Columns as numpy arrays: scenario, score, label (float, NaN = unlabelled; None if absent), query_len,
    title_len (None if absent); with ``keys`` also source_file (str) and source_row (int64), the row key
    that batch scoring writes (required then, nulls refused). Validated per file so errors name the file,
    the column and the row."""
    src = ParquetSource.open(path, "scored input")
    dset = src.dataset
    names = set(dset.schema.names)
    required = {"scenario", "score"} | (set(ROW_KEY) if keys else set())
    missing = required - names
    if missing:
        why = f" (the row key {ROW_KEY} that batch scoring writes)" if keys and missing & set(ROW_KEY) else ""
        raise DataError(f"{path}: scored input lacks columns {sorted(missing)}{why} (has {sorted(names)})")
    proj = {"scenario": pc.field("scenario").cast(pa.string()), "score": pc.field("score").cast(pa.float64())}
    if keys:
        proj["source_file"] = pc.field("source_file").cast(pa.string())
        proj["source_row"] = pc.field("source_row").cast(pa.int64())
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
        where = src.shown(frag.path)
        for col in ("scenario", "score", *(ROW_KEY if keys else ())):
            if t[col].null_count:
                row = pc.index(pc.is_null(t[col]), True).as_py()
                raise DataError(f"{where}: column {col}: {t[col].null_count} nulls (first at row {row})")
        s = t["score"].to_numpy()
        bad = np.flatnonzero(~np.isfinite(s) | (s < 0) | (s > 1))
        if len(bad):
            raise DataError(f"{where}: column score: {len(bad)} values outside [0, 1] "
                            f"(first at row {bad[0]}: {s[bad[0]]})")
        if "label" in proj:
            y = t["label"].to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~np.isnan(y) & (y != 0) & (y != 1))
            if len(bad):
                raise DataError(f"{where}: column label: {len(bad)} values are not 0/1 "
                                f"(first at row {bad[0]}: {y[bad[0]]})")
        parts.append(t)
    t = pa.concat_tables(parts)
    out: dict[str, np.ndarray | None] = {
        "scenario": t["scenario"].to_numpy(zero_copy_only=False).astype(str),
        "score": t["score"].to_numpy(),
    }
    out["label"] = t["label"].to_numpy(zero_copy_only=False) if "label" in proj else None
    for col in ("query_len", "title_len"):
        out[col] = t[col].fill_null(0).to_numpy() if col in proj else None
    if keys:
        out["source_file"] = t["source_file"].to_numpy(zero_copy_only=False).astype(str)
        out["source_row"] = t["source_row"].to_numpy()
    return out


def scored_model_version(path: str | Path) -> str | None:
    """The scored input's ``model_version`` column when it holds exactly one non-null value, else None."""
    dset = ParquetSource.open(path, "scored input").dataset
    if "model_version" not in dset.schema.names:
        return None
    values = pc.unique(dset.to_table(columns={"v": pc.field("model_version").cast(pa.string())})["v"]).drop_null()
    return values[0].as_py() if len(values) == 1 else None


def count_rows(path: str | Path) -> int:
    return ParquetSource.open(path, "quarantine file").num_rows


_metric_key = metric_key  # one cleaning of metric names, shared with the history reader


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
    for name, c in ((summary.get("champion") or {}).get("scenarios") or {}).items():
        if c.get("delta") is not None:  # candidate AUC - champion AUC on the matched rows
            out[_metric_key("monitoring", name, "auc_delta_vs_champion")] = c["delta"]
    return out


def _row_keys(files: np.ndarray, rows: np.ndarray, universe: np.ndarray, width: int, what: str) -> np.ndarray:
    """(n,) int64 keys of (source_file, source_row) pairs: file code in ``universe`` (sorted) * width + row,
    ``width`` above every row number of both sides (so equal pairs get equal keys). Duplicate pairs raise
    DataError naming ``what`` and one duplicate."""
    if len(rows) and rows.min() < 0:
        raise DataError(f"{what}: column source_row holds negative values (first: {rows[rows < 0][0]})")
    keys = np.searchsorted(universe, files).astype(np.int64) * width + rows.astype(np.int64)
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        i = first[np.argmax(counts > 1)]
        raise DataError(f"{what}: the row key {ROW_KEY} is not unique: {int((counts - 1).sum())} repeated rows "
                        f"(e.g. source_file={str(files[i])!r}, source_row={int(rows[i])})")
    return keys


def _champion_columns(champion: dict) -> tuple[str, dict]:
    """(what it is, columns) of the champion's scores: source_file, source_row, score, scenario, label."""
    if champion.get("scored") is not None:
        return f"{champion['scored']} (champion's scores)", read_scored(champion["scored"], keys=True)
    missing = {"source_file", "source_row", "score"} - set(champion)
    if missing:
        raise DataError(f"champion: needs 'scored' (the champion's batch-scoring output) or the arrays "
                        f"source_file, source_row, score; lacks {sorted(missing)}")
    cols = {k: np.asarray(champion[k]) for k in ("source_file", "source_row", "score", "scenario", "label")
            if champion.get(k) is not None}
    cols["source_file"], cols["score"] = cols["source_file"].astype(str), cols["score"].astype(np.float64)
    cols["source_row"] = cols["source_row"].astype(np.int64)
    if cols.get("label") is not None:
        cols["label"] = cols["label"].astype(np.float64)
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"champion: arrays differ in length {lengths}")
    bad = np.flatnonzero(~np.isfinite(cols["score"]) | (cols["score"] < 0) | (cols["score"] > 1))
    if len(bad):
        raise DataError(f"champion: score: {len(bad)} values outside [0, 1] (first at row {bad[0]}: "
                        f"{cols['score'][bad[0]]})")
    return "champion arrays", cols


def compare_champion(cand: dict, labelled: np.ndarray, champion: dict, candidate_version: str | None,
                     mon) -> dict:
    """The candidate (this check's scores) against the champion on the same labelled rows.

    Rows are matched on (source_file, source_row); candidate labels and scenarios are used (the champion's
    must agree where it has them: a disagreement means the keys point at different rows). Per scenario of
    the matched rows: both AUCs, their difference (candidate - champion) with the paired bootstrap CI
    (``evaluation.metrics.paired_auc_difference``: the same resamples for both models) and a verdict: "worse"
    / "better" when the CI excludes 0, else "within noise". Informational: it is not a breach.
    """
    what, champ = _champion_columns(champion)
    c_file, c_row = cand["source_file"][labelled], cand["source_row"][labelled]
    universe = np.unique(np.concatenate([c_file, champ["source_file"]]))
    width = int(max(c_row.max(initial=0), champ["source_row"].max(initial=0))) + 1
    ck = _row_keys(c_file, c_row, universe, width, "scored input (labelled rows)")
    hk = _row_keys(champ["source_file"], champ["source_row"], universe, width, what)
    _, ci, hi = np.intersect1d(ck, hk, assume_unique=True, return_indices=True)  # sorted by key: same order
    if len(ci) == 0:
        raise DataError(f"{what}: no row matches the {len(ck)} labelled scored rows on {ROW_KEY} (e.g. candidate "
                        f"{(c_file[:1].tolist(), c_row[:1].tolist())}, champion "
                        f"{(champ['source_file'][:1].tolist(), champ['source_row'][:1].tolist())}): "
                        "were both scored from the same input files?")
    scn = cand["scenario"][labelled][ci]
    y = cand["label"][labelled][ci]
    for col, mine in (("scenario", scn), ("label", y)):
        theirs = champ.get(col)
        if theirs is None:
            continue
        theirs = theirs[hi]
        differ = (mine != theirs) if col == "scenario" else (~np.isnan(theirs) & (mine != theirs))
        if differ.any():
            j = int(np.argmax(differ))
            raise DataError(f"{what}: column {col} differs from the scored input's on {int(differ.sum())} of "
                            f"{len(ci)} rows matched on {ROW_KEY} (e.g. source_file={str(c_file[ci][j])!r}, "
                            f"source_row={int(c_row[ci][j])}: {mine[j].item()!r} here, {theirs[j].item()!r} "
                            "in the champion's)")
    p_cand, p_champ = cand["score"][labelled][ci], champ["score"][hi]
    per = {}
    for name in sorted(set(scn.tolist())):
        m = scn == name
        d = paired_auc_difference(name, y[m].astype(np.int8), p_cand[m], p_champ[m],
                                  bootstrap_rounds=mon.bootstrap_rounds, seed=mon.seed)
        entry = {"rows": d["n"], "positives": d["positives"], "candidate_auc": d["auc_a"],
                 "champion_auc": d["auc_b"], "delta": d["delta"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                 "verdict": None}
        if d["delta"] is None:
            entry["reason"] = d["reason"]
        elif d["ci_high"] is not None and d["ci_high"] < 0:
            entry["verdict"] = "worse"
        elif d["ci_low"] is not None and d["ci_low"] > 0:
            entry["verdict"] = "better"
        elif d["ci_low"] is not None:
            entry["verdict"] = "within noise"
        per[name] = entry
    both = [n for n, e in per.items() if e["delta"] is not None]
    macro = {"candidate": None, "champion": None, "delta": None, "scenarios": both}
    if both:
        macro["candidate"] = float(np.mean([per[n]["candidate_auc"] for n in both]))
        macro["champion"] = float(np.mean([per[n]["champion_auc"] for n in both]))
        macro["delta"] = macro["candidate"] - macro["champion"]
    return {
        "version": champion.get("version"), "candidate_version": candidate_version,
        "source": str(champion["scored"]) if champion.get("scored") is not None else None,
        "key": list(ROW_KEY), "rows_matched": len(ci),
        "candidate_rows_unmatched": len(ck) - len(ci), "champion_rows_unmatched": len(hk) - len(hi),
        "ci_level": CI_LEVEL, "bootstrap_rounds": mon.bootstrap_rounds, "scenarios": per, "auc_macro": macro,
    }


def _curves(scenarios: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, dict]:
    """{scenario: {"roc": roc_curve_points, "pr": pr_curve_points}} of the labelled rows (None: one class)."""
    out = {}
    for name in sorted(set(scenarios.tolist())):
        m = scenarios == name
        out[name] = {"roc": roc_curve_points(labels[m], scores[m]), "pr": pr_curve_points(labels[m], scores[m])}
    return out


def run_check(scored_path, reference_path, out_dir, cfg: Config, quarantine_path=None, tracker=None, *,
              model_version: str | None = None, champion: dict | None = None,
              history: list[dict] | None = None) -> dict:
    """Compute metrics and drift, write report.html + summary.json into out_dir, log them; return the summary.

    ``summary["breaches"]`` lists every breach as a readable string (empty: healthy).

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
    unmatched rows (see ``compare_champion``). It informs; it is not a breach (the promotion gate decides).

    ``history``: earlier monitoring runs, oldest first, as ``monitoring.history.read_history`` returns them;
    the report draws each scenario's AUC and score PSI over them with this run last. None: no trend section.

    With a ``tracker`` the run gets the tags of ``monitoring.history.run_tags`` (stage=monitor,
    model_version, model_name, champion_version), the headline metrics and the report folder as artifacts.
    """
    mon = cfg.monitoring
    reference = load_reference(reference_path)
    cols = read_scored(scored_path, keys=champion is not None)
    if model_version is None:
        model_version = scored_model_version(scored_path)
    n = len(cols["score"])
    quarantine_rate = None
    if quarantine_path is None and storage.is_dir(storage.join(scored_path, QUARANTINE_DIR)):
        quarantine_path = storage.join(scored_path, QUARANTINE_DIR)  # batch scoring's own rejects
    if quarantine_path is not None:
        q = count_rows(quarantine_path)
        quarantine_rate = q / (q + n) if q + n else 0.0

    metrics, overall, labelled, curves = None, None, 0, None
    if cols["label"] is not None:
        m = ~np.isnan(cols["label"])
        labelled = int(m.sum())
        if labelled:
            metrics = scenario_metrics(cols["scenario"][m], cols["label"][m].astype(np.int8), cols["score"][m],
                                       bootstrap_rounds=mon.bootstrap_rounds, seed=mon.seed,
                                       bins=mon.calibration_bins)
            overall = summarize(metrics)
            curves = _curves(cols["scenario"][m], cols["label"][m].astype(np.int8), cols["score"][m])
    comparison = None
    if champion is not None:
        if not labelled:
            raise DataError(f"{scored_path}: no labelled rows to compare with the champion on")
        if champion.get("version") is None and champion.get("scored") is not None:
            champion = {**champion, "version": scored_model_version(champion["scored"])}
        comparison = compare_champion(cols, ~np.isnan(cols["label"]), champion, model_version, mon)
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
        "model_version": model_version, "rows": n, "labelled_rows": labelled,
        "thresholds": {k: getattr(mon, k) for k in ("psi_threshold", "length_psi_threshold", "max_quarantine_rate",
                                                    "drift_min_rows", "alert_min_auc", "fail_on_unseen_scenarios")},
        "metrics": metrics, "overall": overall, "drift": drift, "breaches": breaches,
        "champion": comparison,
        # the trend's earlier points as the report drew them (the full records: monitoring.history)
        "history": None if history is None else [
            {k: h.get(k) for k in ("run_id", "start_time", "model_version", "scenarios")} for h in history],
    }
    # An object-store out_dir: the report is written in a local folder, kept (the tracker may still be sending
    # it), and published there, files first and a commit marker last.
    kept = cfg.local_work_dir / "reports" / bytes_digest(str(out_dir), 16)
    with storage.output_dir(out_dir, local=kept) as out:
        write_report(summary, out, reference, curves=curves, history=history)
        write_json_atomic(out / "summary.json", summary)
    if tracker is not None:
        tracker.set_tags(run_tags(model_version, (comparison or {}).get("version")))
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
    p.add_argument("--model-version", help="version whose scores these are, e.g. ads-relevance/3 "
                                           "(default: the scored input's model_version column)")
    p.add_argument("--champion-scored", help="the champion's batch-scoring output of the same input, to compare "
                                             "with (rows matched on source_file, source_row)")
    p.add_argument("--champion-version", help="the champion's version (default: its model_version column)")
    p.add_argument("--history", type=int, default=10, metavar="N",
                   help="trend over the last N finished monitoring runs read from --tracking-uri (0: none)")
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    return exit_codes.run_cli(lambda: _work(args))


def _work(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    tracker = None
    if args.tracking_uri:
        tracker = MlflowTracker(args.tracking_uri, cfg.tracking.experiment, cfg.tracking.timeout_s,
                                cfg.tracking.artifact_uri)
        tracker.start(run_name="monitoring-check", run_id=args.run_id)
    try:
        version = args.model_version or scored_model_version(args.scored)
        champion = None
        if args.champion_scored:
            champion = {"scored": args.champion_scored, "version": args.champion_version}
        history = None
        if tracker is not None and args.history > 0:
            history = [h for h in read_history(args.tracking_uri, cfg.tracking.experiment, model_name_of(version),
                                               args.history + 1, cfg.tracking.timeout_s)
                       if h["run_id"] != tracker.run_id][-args.history:]  # a resumed run is not its own history
        summary = run_check(args.scored, args.reference, args.out, cfg, args.quarantine, tracker,
                            model_version=version, champion=champion, history=history)
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
