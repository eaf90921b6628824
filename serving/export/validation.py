"""What an export fits on the validation split: per-scenario calibration, decision thresholds, drift references.

    fit_on_validation(stage, "data/valid.parquet", manifest, method="isotonic")

The staged export scores the split (serving.scoring.table, raw scores); calibration.json, reference.json and
reference_calibrated.json are written into the stage and the manifest records them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from evaluation.calibration import CALIBRATION_FILE, ScenarioCalibrator
from evaluation.drift import reference_profile, save_reference
from kernel import storage
from kernel.errors import DataError
from serving.layout import CALIBRATED_REFERENCE_FILE, REFERENCE_FILE
from serving.scoring.table import score_table


def best_f1_thresholds(scenarios: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Per scenario, the score threshold that maximises F1 on the given rows (both classes needed)."""
    from sklearn.metrics import precision_recall_curve

    out = {}
    for name in sorted(set(scenarios.tolist())):
        m = scenarios == name
        if labels[m].min() == labels[m].max():
            continue
        prec, rec, thr = precision_recall_curve(labels[m], scores[m])
        f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        out[name] = float(thr[int(np.argmax(f1))])
    return out


def read_validation(valid: str | Path):
    """The canonical validation table; DataError names the file and the missing column."""
    if not storage.is_file(valid):
        raise DataError(f"--valid {valid}: no such Parquet file")
    table = pq.read_table(valid)
    for col in ("query", "title", "scenario", "label"):
        if col not in table.column_names:
            raise DataError(f"--valid {valid}: column {col!r} is missing (canonical columns expected)")
    return table


def fit_on_validation(out: Path, valid: str | Path, manifest: dict, method: str = "isotonic") -> None:
    """Score ``valid`` with the staged export; write calibration.json, the drift references and thresholds.
    The scores are those served by default (serving.precision=auto: the gate's choice per scenario)."""
    table = read_validation(valid)
    known = set(manifest["scenarios"])
    scored = score_table(out, table, calibrate=False)
    keep = np.array([s in known for s in scored["scenario"].to_pylist()])  # unknown scenarios: no fit
    scen = np.asarray(scored["scenario"].to_pylist(), dtype=object)[keep].astype(str)
    labels = scored["label"].to_numpy(zero_copy_only=False)[keep].astype(np.int64)
    raw = scored["score"].to_numpy(zero_copy_only=False)[keep].astype(np.float64)
    cal = ScenarioCalibrator.fit(scen, labels, raw, method=method)
    cal.save(out / CALIBRATION_FILE)
    calibrated = cal.apply(scen, raw)
    q_len = scored["query_len"].to_numpy(zero_copy_only=False)[keep]
    t_len = scored["title_len"].to_numpy(zero_copy_only=False)[keep]
    # Monitoring must compare like with like: one reference per kind of score the scorer can emit.
    save_reference(reference_profile(scen, raw, q_len, t_len), out / REFERENCE_FILE)
    save_reference(reference_profile(scen, calibrated, q_len, t_len), out / CALIBRATED_REFERENCE_FILE)
    manifest["calibration"] = {"file": CALIBRATION_FILE, "method": cal.method, "fitted_on": storage.name(valid),
                               "skipped": cal.skipped}
    manifest["reference"] = {"file": REFERENCE_FILE, "calibrated_file": CALIBRATED_REFERENCE_FILE}
    # One decision threshold per kind of score the scorer can serve (serving.calibrate picks), each fitted on
    # that kind as the scorer writes it (float32), so that decision = score >= threshold holds on these rows.
    manifest["thresholds"] = {
        "f1_max_raw": best_f1_thresholds(scen, labels, raw),
        "f1_max_calibrated": best_f1_thresholds(scen, labels, calibrated.astype(np.float32).astype(np.float64))}
