"""Per-scenario quality metrics of scored, labelled rows: the one place the project computes an AUC.

    per = scenario_metrics(scenarios, labels, scores, bootstrap_rounds=200)
    per["shoes"]["auc"], per["shoes"]["auc_ci_low"], per["shoes"]["auc_ci_high"], per["shoes"]["ece"]
    summarize(per)  -> {"auc_macro", "auc_weighted", "n", "scenarios_total", "auc_macro_scenarios",
                        "auc_macro_partial", "scenarios_without_auc"}
    describe_macro(summarize(per))  -> "0.8312 (over 3 of 4 scenarios; no AUC for jp)"

Early stopping and the choice between adapter methods (training), the monitoring check and the promotion
gate all read these two functions, so a scenario's entry and a summary have one schema everywhere (training
keeps ``{"scenarios": per, **summarize(per)}``). Scores are probabilities in [0, 1]; labels are 0/1. All
metrics accept optional row weights.

The AUC confidence interval is a stratified percentile bootstrap: each round redraws the positives and the
negatives of a scenario separately (so every round has both classes) and recomputes the AUC. The draws
depend only on the seed, the scenario name and the label vector, so two models scored on the same rows
get the *same* resamples: ``bootstrap_auc(..)`` of both, subtracted, is a paired bootstrap of the AUC
difference (what the promotion gate uses to tell noise from regression).

A scenario with a single class (or no rows) gets ``auc`` None and a ``reason``; it never raises.
"""
from __future__ import annotations

import zlib

import numpy as np

from kernel.errors import DataError

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] for the log loss
CI_LEVEL = 0.95
_MAX_CELLS = 2_000_000  # bootstrap rounds are processed in chunks of at most this many (round, row) cells


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC-AUC with ties counted as one half; NaN when a class is missing. Inputs: (n,)."""
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    return float(_auc_rounds(np.asarray(scores, dtype=np.float64), (w * y)[None], (w * ~y)[None])[0])


def _auc_rounds(scores: np.ndarray, pos_w: np.ndarray, neg_w: np.ndarray) -> np.ndarray:
    """AUC for R weightings of the same rows at once.

    scores (n,); pos_w, neg_w (R, n): the weight each row carries as a positive / negative in each round.
    Rows are grouped by distinct score; per group, a positive beats every negative in lower groups and
    ties half of those in its own group. O(R * n) after one sort.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each distinct score
    pos_g = np.add.reduceat(pos_w[:, order], starts, axis=1)  # (R, groups)
    neg_g = np.add.reduceat(neg_w[:, order], starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g
    wins = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1)
    denom = pos_g.sum(axis=1) * neg_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, wins / np.where(denom > 0, denom, 1.0), np.nan)


def scenario_seed(seed: int, scenario: str) -> np.random.Generator:
    """A generator that depends on the seed and the scenario name only (stable across processes)."""
    return np.random.default_rng([seed, zlib.crc32(str(scenario).encode())])


def bootstrap_auc(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None, rounds: int, rng: np.random.Generator
) -> np.ndarray:
    """(rounds,) AUCs of stratified resamples. Resample counts come from ``rng`` and the labels only."""
    y = np.asarray(labels).astype(bool)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    pos_idx, neg_idx = np.flatnonzero(y), np.flatnonzero(~y)
    if rounds <= 0 or len(pos_idx) == 0 or len(neg_idx) == 0:
        return np.empty(0)
    scores = np.asarray(scores, dtype=np.float64)
    out = []
    chunk = max(1, _MAX_CELLS // max(1, len(y)))
    for start in range(0, rounds, chunk):
        r = min(chunk, rounds - start)
        # counts (r, n): how many times each row is drawn; positives and negatives drawn separately.
        # Flat index round * n + row, counted with one bincount.
        counts = np.zeros(r * len(y))
        for idx in (pos_idx, neg_idx):
            draws = idx[rng.integers(0, len(idx), size=(r, len(idx)))] + (np.arange(r) * len(y))[:, None]
            counts += np.bincount(draws.ravel(), minlength=r * len(y))
        counts = counts.reshape(r, len(y))
        cw = counts * w
        out.append(_auc_rounds(scores, cw * y, cw * ~y))
    return np.concatenate(out)


def reliability(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None, bins: int = 10):
    """Equal-width bins on [0, 1]: (list of {bin_lo, bin_hi, mean_pred, frac_pos, n}, ECE).

    ECE = sum over bins of (bin weight / total weight) * |mean prediction - fraction positive|.
    Empty bins are listed with n 0 and None means, so every curve has the same bins.
    """
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(scores, dtype=np.float64)
    b = np.clip((p * bins).astype(np.int64), 0, bins - 1)  # score 1.0 falls in the last bin
    wsum = np.bincount(b, weights=w, minlength=bins)
    psum = np.bincount(b, weights=w * p, minlength=bins)
    ysum = np.bincount(b, weights=w * y, minlength=bins)
    nrows = np.bincount(b, minlength=bins)
    curve, ece, total = [], 0.0, float(w.sum())
    for i in range(bins):
        filled = wsum[i] > 0
        mean_pred = psum[i] / wsum[i] if filled else None
        frac_pos = ysum[i] / wsum[i] if filled else None
        if filled and total > 0:
            ece += wsum[i] / total * abs(mean_pred - frac_pos)
        curve.append({"bin_lo": i / bins, "bin_hi": (i + 1) / bins, "mean_pred": _f(mean_pred),
                      "frac_pos": _f(frac_pos), "n": int(nrows[i])})
    return curve, float(ece)


def _f(x) -> float | None:
    return None if x is None else float(x)


def check_inputs(labels: np.ndarray, scores: np.ndarray, where: str) -> None:
    """Scores finite in [0, 1] and labels 0/1; DataError naming ``where`` and the first bad row."""
    s = np.asarray(scores, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(s) | (s < 0) | (s > 1))
    if len(bad):
        raise DataError(f"{where}: column score: {len(bad)} values are not probabilities in [0, 1] "
                        f"(first at row {bad[0]}: {s[bad[0]]!r})")
    y = np.asarray(labels)
    bad = np.flatnonzero((y != 0) & (y != 1))
    if len(bad):
        raise DataError(f"{where}: column label: {len(bad)} values are not 0/1 (first at row {bad[0]}: {y[bad[0]]!r})")


def one_scenario(
    name: str, labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None,
    bootstrap_rounds: int = 200, seed: int = 0, bins: int = 10, keep_samples: bool = False,
) -> dict:
    """All metrics of one scenario's rows (see the module docstring).

    ``keep_samples``: also return the bootstrap AUCs as ``auc_samples`` (an array, not JSON-able).
    """
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(scores, dtype=np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    pos = int(y.sum())
    wsum = float(w.sum())
    pc = np.clip(p, EPS, 1 - EPS)
    curve, ece = reliability(y, p, w, bins)
    out = {
        "n": int(len(y)),
        "positives": pos,
        "positive_rate": float((w * y).sum() / wsum) if wsum > 0 else None,
        "auc": None, "auc_ci_low": None, "auc_ci_high": None, "pr_auc": None,
        "log_loss": float(-(w * (y * np.log(pc) + (1 - y) * np.log(1 - pc))).sum() / wsum) if wsum > 0 else None,
        "ece": ece,
        "reliability": curve,
    }
    if keep_samples:
        out["auc_samples"] = np.empty(0)
    if len(y) == 0:
        out["reason"] = f"scenario {name!r}: no rows"
        return out
    if pos == 0 or pos == len(y):
        out["reason"] = f"scenario {name!r}: only one class among {len(y)} rows ({pos} positives)"
        return out
    out["auc"] = weighted_auc(y, p, w)
    out["pr_auc"] = average_precision(y, p, w)
    samples = bootstrap_auc(y, p, w, bootstrap_rounds, scenario_seed(seed, name))
    if keep_samples:
        out["auc_samples"] = samples
    if len(samples):
        tail = (1 - CI_LEVEL) / 2 * 100
        out["auc_ci_low"], out["auc_ci_high"] = (float(v) for v in np.percentile(samples, [tail, 100 - tail]))
    return out


def scenario_metrics(
    scenarios: np.ndarray, labels: np.ndarray, scores: np.ndarray, weights=None,
    bootstrap_rounds: int = 200, seed: int = 0, bins: int = 10, keep_samples: bool = False,
    names: list[str] | None = None,
) -> dict[str, dict]:
    """{scenario: metrics}; rows keep their order within a scenario.

    ``names``: the scenarios to report, in this order, those without rows included (they get ``auc`` None
    and a reason); rows of any other scenario are an error. Default: the scenarios present, sorted.
    """
    scenarios = np.asarray(scenarios).astype(str)
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if not (len(scenarios) == len(labels) == len(scores)):
        raise DataError(f"scenario_metrics: lengths differ (scenarios {len(scenarios)}, labels {len(labels)}, "
                        f"scores {len(scores)})")
    check_inputs(labels, scores, "scored rows")
    present = sorted(set(scenarios.tolist()))
    if names is not None:
        other = sorted(set(present) - set(names))
        if other:
            raise DataError(f"scored rows: scenarios {other[:10]} are not among {list(names)}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    out = {}
    for name in (present if names is None else names):
        m = scenarios == name
        out[name] = one_scenario(name, labels[m], scores[m], None if w is None else w[m],
                                 bootstrap_rounds, seed, bins, keep_samples)
    return out


def summarize(per_scenario: dict) -> dict:
    """The summary of ``scenario_metrics``: macro AUC (the mean over the scenarios with an AUC), volume-weighted
    AUC, total rows, and how many scenarios the macro covers (``auc_macro_scenarios`` of ``scenarios_total``;
    ``auc_macro_partial`` when some scenario has no AUC, listed in ``scenarios_without_auc``)."""
    with_auc = {k: v for k, v in per_scenario.items() if v.get("auc") is not None}
    n_auc = sum(v["n"] for v in with_auc.values())
    return {
        "auc_macro": float(np.mean([v["auc"] for v in with_auc.values()])) if with_auc else None,
        "auc_weighted": float(sum(v["auc"] * v["n"] for v in with_auc.values()) / n_auc) if n_auc else None,
        "n": int(sum(v["n"] for v in per_scenario.values())),
        "scenarios_total": len(per_scenario),
        "auc_macro_scenarios": len(with_auc),
        "auc_macro_partial": len(with_auc) < len(per_scenario),
        "scenarios_without_auc": [k for k in per_scenario if k not in with_auc],
    }


def describe_macro(summary: dict) -> str:
    """"0.8312", or "0.8312 (over 3 of 4 scenarios; no AUC for jp)" when the macro covers a subset."""
    macro = summary["auc_macro"]
    text = "n/a" if macro is None else f"{macro:.4f}"
    if summary.get("auc_macro_partial"):
        text += (f" (over {summary['auc_macro_scenarios']} of {summary['scenarios_total']} scenarios; "
                 f"no AUC for {', '.join(summary['scenarios_without_auc'])})")
    return text


# --- curves and paired comparisons (used by the monitoring report) -------------------------------------------


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None):
    """(thresholds, tp, fp): per distinct score, from the highest down, the weight of positives and of
    negatives scoring at least that much. All (k,), k = number of distinct scores."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(scores, dtype=np.float64)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    p, y, w = p[order], y[order], w[order]
    last = np.r_[np.flatnonzero(p[1:] != p[:-1]), len(p) - 1]  # last row of each distinct score
    tp = np.cumsum(w * y)[last]
    fp = np.cumsum(w * ~y)[last]
    return p[last], tp, fp


def roc_curve_points(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> dict | None:
    """ROC curve with one point per distinct score: {"fpr", "tpr", "thresholds"}, each (k + 1,), starting at
    (0, 0) with threshold +inf and ending at (1, 1). Ties are one point, so the trapezoid area under the
    points is ``weighted_auc`` (ties count one half). None when a class is missing (no curve exists)."""
    if len(scores) == 0:
        return None
    thr, tp, fp = _cumulative_counts(labels, scores, weights)
    if tp[-1] <= 0 or fp[-1] <= 0:
        return None
    return {"fpr": np.r_[0.0, fp / fp[-1]], "tpr": np.r_[0.0, tp / tp[-1]], "thresholds": np.r_[np.inf, thr]}


def pr_curve_points(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> dict | None:
    """Precision-recall curve, one point per distinct score, recall increasing: {"recall", "precision",
    "thresholds"}, each (k + 1,), starting at (recall 0, precision 1) with threshold +inf (sklearn's
    convention). The step sum  sum_i (recall_i - recall_{i-1}) * precision_i  is the average precision.
    None when there are no positives."""
    if len(scores) == 0:
        return None
    thr, tp, fp = _cumulative_counts(labels, scores, weights)
    if tp[-1] <= 0:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 1.0)
    return {"recall": np.r_[0.0, tp / tp[-1]], "precision": np.r_[1.0, precision], "thresholds": np.r_[np.inf, thr]}


def average_precision(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """The step sum over ``pr_curve_points`` (scikit-learn's average_precision_score, ties as one point);
    computed here so that training and scoring processes need not import scikit-learn (2 s a process).
    None when there are no positives."""
    pr = pr_curve_points(labels, scores, weights)
    return None if pr is None else float(np.sum(np.diff(pr["recall"]) * pr["precision"][1:]))


def paired_auc_difference(
    name: str, labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, weights: np.ndarray | None = None,
    bootstrap_rounds: int = 200, seed: int = 0,
) -> dict:
    """Model a against model b on the same rows (same order for both) of scenario ``name``.

    {"n", "positives", "auc_a", "auc_b", "delta" (a - b), "ci_low", "ci_high"}: the CI is the percentile
    interval (CI_LEVEL) of the paired bootstrap: both models' AUCs are computed on the same stratified
    resamples (``bootstrap_auc`` with the same ``scenario_seed`` draws the same rows for the same labels), and
    the differences of those pairs are taken. A single class: AUCs and delta None, with a ``reason``.
    """
    y = np.asarray(labels).astype(np.int64)
    if not len(y) == len(scores_a) == len(scores_b):
        raise DataError(f"paired_auc_difference: scenario {name!r}: lengths differ (labels {len(y)}, "
                        f"scores_a {len(scores_a)}, scores_b {len(scores_b)})")
    pos = int(y.sum())
    out = {"n": len(y), "positives": pos, "auc_a": None, "auc_b": None, "delta": None,
           "ci_low": None, "ci_high": None}
    if pos == 0 or pos == len(y):
        out["reason"] = f"scenario {name!r}: only one class among {len(y)} rows ({pos} positives)"
        return out
    out["auc_a"], out["auc_b"] = weighted_auc(y, scores_a, weights), weighted_auc(y, scores_b, weights)
    out["delta"] = out["auc_a"] - out["auc_b"]
    sa = bootstrap_auc(y, scores_a, weights, bootstrap_rounds, scenario_seed(seed, name))
    sb = bootstrap_auc(y, scores_b, weights, bootstrap_rounds, scenario_seed(seed, name))
    if len(sa):
        tail = (1 - CI_LEVEL) / 2 * 100
        out["ci_low"], out["ci_high"] = (float(v) for v in np.percentile(sa - sb, [tail, 100 - tail]))
    return out
