"""The candidate against the champion on the same labelled rows, matched on batch scoring's row key.

    comparison = compare_champion(cols, labelled, {"scored": "runs/demo/champion_scores", "version": "m/2"},
                                  "m/3", cfg.monitoring)
    comparison["scenarios"]["shoes"]["delta"], comparison["auc_macro"]["delta"]
"""
from __future__ import annotations

import numpy as np

from evaluation.metrics import CI_LEVEL, paired_auc_difference
from kernel.errors import DataError
from monitoring.scored import ROW_KEY, read_scored


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
