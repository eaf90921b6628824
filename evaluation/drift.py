"""Drift of scored traffic against the training reference saved at export.

    ref = reference_profile(scenarios, scores, query_lengths, title_lengths)   # at export: reference.json
    save_reference(ref, export_dir / REFERENCE_FILE)
    rep = drift_report(load_reference(path), scenarios, scores, q_len, t_len, quarantine_rate, cfg.monitoring)
    rep["breaches"]  -> ["scenario 'shoes': score PSI 0.41 > monitoring.psi_threshold 0.25 (1200 rows)", ...]

The reference holds, per scenario, quantile bins of the score and of the query and title lengths (in
characters): ``cuts`` are the interior bin edges (bins are [-inf, c0), [c0, c1), ..., [c_last, inf)) and
``fractions`` the share of reference rows in each. Quantile bins give each bin ~equal reference mass, so PSI
is not dominated by a few sparse bins. A fixed 20-bin score histogram on [0, 1] is kept for plots.

PSI = sum over bins (a - e) * ln(a / e), fractions floored at 1e-4 so that empty bins stay finite.
Breaches (each a readable string): a scenario's score PSI above ``psi_threshold``; a length PSI above
``length_psi_threshold``; scenarios absent from the reference (``fail_on_unseen_scenarios``); the quarantine
rate above ``max_quarantine_rate``. Scenarios with fewer than ``drift_min_rows`` current rows are reported
but not judged (PSI of a handful of rows is noise).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kernel import storage
from kernel.atomic import write_json_atomic
from kernel.config import MonitoringConfig
from kernel.errors import DataError

REFERENCE_FILE = "reference.json"
FORMAT_VERSION = 1
PSI_FLOOR = 1e-4
MIN_ROWS_PER_BIN = 50
HIST_EDGES = np.linspace(0.0, 1.0, 21)  # plotting histogram of scores, shared by reference and current


def quantile_bins(values: np.ndarray, bins: int) -> dict:
    """{"cuts": interior edges (unique), "fractions": share of values per bin (len(cuts) + 1)}.

    At most one bin per MIN_ROWS_PER_BIN reference rows: with thinner bins PSI's sampling noise alone
    reaches the usual 0.25 alarm (repeated head queries, which make the sample clumpy, make it worse).
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"cuts": [], "fractions": [1.0]}
    bins = max(2, min(bins, len(v) // MIN_ROWS_PER_BIN))
    cuts = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
    return {"cuts": cuts.tolist(), "fractions": bin_fractions(v, cuts).tolist()}


def bin_fractions(values: np.ndarray, cuts) -> np.ndarray:
    """Share of ``values`` in the bins that ``cuts`` define; (len(cuts) + 1,), sums to 1 (0s if empty)."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.searchsorted(np.asarray(cuts, dtype=np.float64), v, side="right")
    counts = np.bincount(idx, minlength=len(cuts) + 1).astype(np.float64)
    return counts / max(len(v), 1)


def psi(expected, actual) -> float:
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def score_histogram(scores: np.ndarray) -> list[float]:
    counts, _ = np.histogram(np.clip(scores, 0, 1), bins=HIST_EDGES)
    return (counts / max(len(scores), 1)).tolist()


def reference_profile(scenarios, scores, query_lengths, title_lengths, bins: int = 10) -> dict:
    """JSON-able profile of the training reference (the export's validation split, scored)."""
    scenarios = np.asarray(scenarios).astype(str)
    scores = np.asarray(scores, dtype=np.float64)
    lengths = {"query_len": query_lengths, "title_len": title_lengths}
    out: dict = {"format_version": FORMAT_VERSION, "bins": bins, "hist_edges": HIST_EDGES.tolist(), "scenarios": {}}
    for name in sorted(set(scenarios.tolist())):
        m = scenarios == name
        entry = {"n": int(m.sum()), "score": quantile_bins(scores[m], bins),
                 "score_hist": score_histogram(scores[m])}
        for key, values in lengths.items():
            entry[key] = None if values is None else quantile_bins(np.asarray(values)[m], bins)
        out["scenarios"][name] = entry
    return out


def save_reference(profile: dict, path: str | Path) -> Path:
    return write_json_atomic(path, profile)


def load_reference(path: str | Path) -> dict:
    ref = storage.read_json(path, f"reference profile (written at export as {REFERENCE_FILE})")
    if not isinstance(ref, dict) or ref.get("format_version") != FORMAT_VERSION or "scenarios" not in ref:
        raise DataError(f"{path}: not a reference profile (format_version {FORMAT_VERSION} with 'scenarios')")
    return ref


def drift_report(
    reference: dict, scenarios, scores, query_lengths, title_lengths,
    quarantine_rate: float | None, cfg: MonitoringConfig,
) -> dict:
    """Per-scenario PSIs, unseen/missing scenarios, quarantine rate and the list of breaches.

    ``cfg`` is the MonitoringConfig (a whole Config is accepted too). Length arrays may be None.
    """
    mon = getattr(cfg, "monitoring", cfg)
    scenarios = np.asarray(scenarios).astype(str)
    scores = np.asarray(scores, dtype=np.float64)
    lengths = {"query_len": query_lengths, "title_len": title_lengths}
    ref_scn = reference["scenarios"]
    present = sorted(set(scenarios.tolist()))
    per, breaches = {}, []
    for name in present:
        m = scenarios == name
        n = int(m.sum())
        entry = {"n": n, "score_hist": score_histogram(scores[m]), "psi_score": None,
                 "psi_query_len": None, "psi_title_len": None, "judged": False}
        per[name] = entry
        ref = ref_scn.get(name)
        if ref is None:
            continue
        entry["psi_score"] = psi(ref["score"]["fractions"], bin_fractions(scores[m], ref["score"]["cuts"]))
        for key, values in lengths.items():
            if values is not None and ref.get(key) is not None:
                r = ref[key]
                entry[f"psi_{key}"] = psi(r["fractions"], bin_fractions(np.asarray(values)[m], r["cuts"]))
        entry["judged"] = n >= mon.drift_min_rows
        if not entry["judged"]:
            continue
        if entry["psi_score"] > mon.psi_threshold:
            breaches.append(f"scenario {name!r}: score PSI {entry['psi_score']:.3f} > monitoring.psi_threshold "
                            f"{mon.psi_threshold} ({n} rows)")
        for key, label in (("query_len", "query length"), ("title_len", "title length")):
            v = entry[f"psi_{key}"]
            if v is not None and v > mon.length_psi_threshold:
                breaches.append(f"scenario {name!r}: {label} PSI {v:.3f} > monitoring.length_psi_threshold "
                                f"{mon.length_psi_threshold} ({n} rows)")
    unseen = [s for s in present if s not in ref_scn]
    if unseen and mon.fail_on_unseen_scenarios:
        rows = sum(per[s]["n"] for s in unseen)
        breaches.append(f"scenarios not seen in training: {unseen} ({rows} rows)")
    if quarantine_rate is not None and quarantine_rate > mon.max_quarantine_rate:
        breaches.append(f"quarantine rate {quarantine_rate:.2%} > monitoring.max_quarantine_rate "
                        f"{mon.max_quarantine_rate:.2%}")
    return {
        "scenarios": per,
        "unseen_scenarios": unseen,
        "missing_scenarios": sorted(set(ref_scn) - set(present)),
        "quarantine_rate": quarantine_rate,
        "breaches": breaches,
    }
