"""The monitoring report's figures (matplotlib's object API: an Agg canvas, no pyplot global state).

    save_figure(scenario_figure(name, reliability, hist, ref_hist, edges), out / "plots" / plot_name(0, name))
    curves_figure(name, roc, pr, auc, pr_auc, positive_rate)     # ROC and precision-recall
    trend_figure(name, points, thresholds)                       # AUC and score PSI over earlier runs

Reliability bins with fewer than MIN_BIN_ROWS rows are drawn hollow and grey (their fraction positive is
noise: with 30 rows its 95% interval is up to +-0.18 wide). ROC/PR curves are drawn thinned to
MAX_CURVE_POINTS points (the metrics use them all). Each PNG is written under a temporary name, then renamed.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from kernel.atomic import atomic_path

MIN_BIN_ROWS = 30  # reliability bins with fewer rows are de-emphasised (hollow, grey; class "few" in tables)
MAX_CURVE_POINTS = 2000  # ROC/PR points drawn per curve (evenly thinned, ends kept); the metrics use them all


def plot_name(index: int, scenario: str) -> str:
    """A file name safe on every filesystem; the index keeps names unique after cleaning."""
    return f"{index:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', scenario)[:60]}.png"


def scenario_figure(name: str, curve: list[dict] | None, hist: list[float], ref_hist: list[float] | None,
                    edges: list[float], min_bin_rows: int = MIN_BIN_ROWS) -> Figure:
    """Left: reliability curve (mean prediction vs fraction positive per bin) over the rows per bin (bars,
    numbers on them); bins under ``min_bin_rows`` rows hollow and grey. Right: score histograms."""
    fig = Figure(figsize=(9, 4.6), dpi=90, layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.2])
    ax1 = fig.add_subplot(grid[0, 0])
    axn = fig.add_subplot(grid[1, 0], sharex=ax1)
    ax2 = fig.add_subplot(grid[:, 1])
    ax1.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="perfect")
    if curve:
        filled = [b for b in curve if b["n"] > 0]
        ax1.plot([b["mean_pred"] for b in filled], [b["frac_pos"] for b in filled], color="C0", alpha=0.35)
        many = [b for b in filled if b["n"] >= min_bin_rows]
        few = [b for b in filled if b["n"] < min_bin_rows]
        ax1.plot([b["mean_pred"] for b in many], [b["frac_pos"] for b in many], "o", color="C0",
                 label=f"bin with >= {min_bin_rows} rows")
        if few:
            ax1.plot([b["mean_pred"] for b in few], [b["frac_pos"] for b in few], "o", color="#aaa",
                     markerfacecolor="none", label=f"bin with < {min_bin_rows} rows (noisy)")
        # rows per bin: one bar per bin over its range, the count written on it
        lo = np.array([b["bin_lo"] for b in curve])
        width = np.array([b["bin_hi"] - b["bin_lo"] for b in curve])
        counts = np.array([b["n"] for b in curve])
        colors = ["C0" if c >= min_bin_rows else "#ccc" for c in counts]
        axn.bar(lo, counts, width=width * 0.92, align="edge", color=colors)
        for x, w, c in zip(lo, width, counts):
            axn.text(x + w / 2, c, str(int(c)), ha="center", va="bottom", fontsize=7,
                     color="#222" if c >= min_bin_rows else "#999")
        axn.set_ylim(0, max(1, counts.max()) * 1.35)  # room for the numbers
    else:
        ax1.text(0.5, 0.5, "no labels", ha="center", va="center")
        axn.text(0.5, 0.5, "no labelled rows", ha="center", va="center", transform=axn.transAxes, fontsize=8)
    ax1.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction positive", title="reliability")
    ax1.tick_params(labelbottom=False)
    axn.set(xlabel="predicted probability (bin)", ylabel="rows")
    ax1.legend(loc="upper left", fontsize=8)
    width = edges[1] - edges[0]
    ax2.bar(edges[:-1], hist, width=width, align="edge", alpha=0.6, label="current")
    if ref_hist is not None:
        ax2.step(edges, [ref_hist[0], *ref_hist], where="pre", color="black", label="reference")
    ax2.set(xlim=(0, 1), xlabel="score", ylabel="share of rows", title="score distribution")
    ax2.legend(loc="upper center", fontsize=8)
    fig.suptitle(name)
    return fig


def _thin(*arrays: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, ...]:
    """Every array at the same evenly spaced indices (first and last kept), at most ``max_points``."""
    n = len(arrays[0])
    if n <= max_points:
        return arrays
    idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
    return tuple(a[idx] for a in arrays)


def curves_figure(name: str, roc: dict | None, pr: dict | None, auc: float | None, pr_auc: float | None,
                  positive_rate: float | None) -> Figure:
    """Left: ROC (false vs true positive rate). Right: precision against recall, the positive rate as the
    no-skill line. ``roc``/``pr``: points of evaluation.metrics.roc_curve_points / pr_curve_points."""
    fig = Figure(figsize=(9, 3.6), dpi=90, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="chance")
    if roc is not None:
        fpr, tpr = _thin(np.asarray(roc["fpr"]), np.asarray(roc["tpr"]))
        ax1.plot(fpr, tpr, color="C0", label=f"AUC {auc:.3f}" if auc is not None else "model")
    else:
        ax1.text(0.5, 0.5, "needs both classes", ha="center", va="center")
    ax1.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax1.legend(loc="lower right", fontsize=8)
    if positive_rate is not None:
        ax2.axhline(positive_rate, color="#999", linestyle="--", linewidth=1, label=f"no skill {positive_rate:.2f}")
    if pr is not None:
        rec, prec = _thin(np.asarray(pr["recall"]), np.asarray(pr["precision"]))
        ax2.plot(rec, prec, color="C1", drawstyle="steps-post",
                 label=f"AP {pr_auc:.3f}" if pr_auc is not None else "model")
    else:
        ax2.text(0.5, 0.5, "needs positives", ha="center", va="center")
    ax2.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title="precision-recall")
    ax2.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{name}: ROC and precision-recall (labelled rows)")
    return fig


def trend_figure(name: str, points: list[dict], thresholds: dict) -> Figure:
    """AUC (left axis, blue) and score PSI (right axis, orange) per run; this run last, shaded and starred;
    the PSI threshold (and the AUC alert level when set) dashed."""
    fig = Figure(figsize=(9, 3.2), dpi=90, layout="constrained")
    ax = fig.subplots()
    ax2 = ax.twinx()
    x = np.arange(len(points))
    auc = np.array([np.nan if p["auc"] is None else p["auc"] for p in points], dtype=np.float64)
    psi = np.array([np.nan if p["psi_score"] is None else p["psi_score"] for p in points], dtype=np.float64)
    now = len(points) - 1
    ax.axvspan(now - 0.4, now + 0.4, color="#fff3c4", zorder=0)
    ax.plot(x, auc, "o-", color="C0", label="AUC")
    ax2.plot(x, psi, "s-", color="C1", label="score PSI")
    ax.plot([now], [auc[now]], "*", color="C0", markersize=16, markeredgecolor="black")
    ax2.plot([now], [psi[now]], "*", color="C1", markersize=16, markeredgecolor="black")
    ax2.axhline(thresholds["psi_threshold"], color="C1", linestyle="--", linewidth=1, alpha=0.6,
                label=f"PSI threshold {thresholds['psi_threshold']}")
    if thresholds.get("alert_min_auc", 0) > 0:
        ax.axhline(thresholds["alert_min_auc"], color="C0", linestyle="--", linewidth=1, alpha=0.6,
                   label=f"AUC alert {thresholds['alert_min_auc']}")
    finite_auc, finite_psi = auc[np.isfinite(auc)], psi[np.isfinite(psi)]
    if len(finite_auc):
        lo, hi = finite_auc.min(), finite_auc.max()
        pad = max(0.02, (hi - lo) * 0.2)
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    top = max(thresholds["psi_threshold"], finite_psi.max() if len(finite_psi) else 0) * 1.25
    ax2.set_ylim(-0.05 * top, top)  # a PSI of 0 (no drift) stays visible above the axis
    ax.set_xticks(x, [p["label"] for p in points])
    ax.set_xlim(-0.5, now + 0.5)
    ax.set(ylabel="AUC", xlabel="monitoring run (oldest left; this run starred)")
    ax2.set_ylabel("score PSI")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, ncols=2)
    fig.suptitle(f"{name}: AUC and score PSI over the last {len(points)} runs")
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
