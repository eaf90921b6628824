"""The human-readable monitoring report: one HTML page with a table per scenario and matplotlib PNGs.

    write_report(summary, out_dir, reference, curves=curves, history=history)
    # out_dir/report.html, out_dir/plots/NN_<scenario>.png, NN_<scenario>_curves.png, NN_<scenario>_trend.png

``summary`` is what ``monitoring.check.run`` builds (model_version, metrics, drift, thresholds,
breaches, champion). The page shows, top to bottom: the model version in the header; the breaches; the
facts of the run; the per-scenario table; the champion against the candidate (when ``summary["champion"]``
is set: both AUCs on the same rows, the paired difference with its CI; a significant drop is highlighted);
then per scenario:
  * the reliability curve with the rows per bin drawn as bars under it (numbers on the bars) and listed in a
    table; bins with fewer than MIN_BIN_ROWS rows are drawn hollow and grey (their fraction positive is
    noise: with 30 rows its 95% interval is up to +-0.18 wide), next to the score histogram against the
    reference;
  * the ROC and precision-recall curves of the labelled rows (``curves``: per scenario the points of
    ``evaluation.metrics.roc_curve_points`` / ``pr_curve_points``; plotted thinned to MAX_CURVE_POINTS);
  * when ``history`` is given (``monitoring.history.read_history``: earlier runs, oldest first), the trend
    of the scenario's AUC and score PSI over those runs with this run last, shaded and starred, and a table
    of the points with each run's model version.
The HTML embeds the PNGs by relative path, so the folder can be copied or logged to MLflow as a whole. Every
file is written under a temporary name, then renamed; PNGs of an earlier report in the same folder that
this one does not use are removed.
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: Agg canvas, no pyplot global state

from kernel.atomic import atomic_path, write_bytes_atomic
from monitoring.history import scenario_key

PLOTS_DIR = "plots"
MIN_BIN_ROWS = 30  # reliability bins with fewer rows are de-emphasised (hollow, grey; class "few" in tables)
MAX_CURVE_POINTS = 2000  # ROC/PR points drawn per curve (evenly thinned, ends kept); the metrics use them all

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.name { text-align: left; font-weight: bold; }
td.breach { background: #f8d0d0; color: #900; font-weight: bold; }
td.few { color: #999; font-style: italic; }
tr.current td { background: #fff3c4; font-weight: bold; }
header .model { font-size: 1.2em; margin: 0.2em 0 1em 0; }
table.bins td, table.bins th, table.trend td, table.trend th { font-size: 0.85em; padding: 2px 6px; }
section.scenario { border-top: 1px solid #ddd; margin-top: 1.5em; }
.breaches { background: #fde8e8; border: 1px solid #d33; padding: 0.5em 1em; }
.ok { background: #e8f6e8; border: 1px solid #3a3; padding: 0.5em 1em; }
img { max-width: 720px; }
"""


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


def trend_points(name: str, summary: dict, history: list[dict]) -> list[dict]:
    """The trend of one scenario: earlier runs (oldest first), then this run, each {"label", "run_id",
    "start_time", "model_version", "auc", "psi_score", "current"}; a value the run lacks is None."""
    key = scenario_key(name)
    points = []
    for i, h in enumerate(history):
        v = (h.get("scenarios") or {}).get(key, {})
        points.append({"label": f"#{i + 1}", "run_id": h.get("run_id"), "start_time": h.get("start_time"),
                       "model_version": h.get("model_version"), "auc": v.get("auc"),
                       "psi_score": v.get("psi_score"), "current": False})
    m = (summary.get("metrics") or {}).get(name, {})
    d = summary["drift"]["scenarios"].get(name, {})
    points.append({"label": "this run", "run_id": None, "start_time": summary.get("created_at"),
                   "model_version": summary.get("model_version"), "auc": m.get("auc"),
                   "psi_score": d.get("psi_score"), "current": True})
    return points


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


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _cell(text: str, breach: bool = False) -> str:
    return f'<td class="breach">{text}</td>' if breach else f"<td>{text}</td>"


def scenario_rows(summary: dict, plot_files: dict[str, str]) -> list[str]:
    """One <tr> per scenario (labelled metrics and drift side by side); breaching cells highlighted."""
    th = summary["thresholds"]
    metrics, drift = summary.get("metrics") or {}, summary["drift"]["scenarios"]
    unseen = set(summary["drift"]["unseen_scenarios"])
    rows = []
    for name in sorted(set(metrics) | set(drift)):
        m, d = metrics.get(name, {}), drift.get(name, {})
        judged = d.get("judged", False)
        auc = m.get("auc")
        auc_txt = "–" if auc is None else f"{auc:.3f} [{_fmt(m['auc_ci_low'])}, {_fmt(m['auc_ci_high'])}]"
        if m and auc is None:
            auc_txt = f'– <small>({html.escape(m.get("reason", "no AUC"))})</small>'
        psi = d.get("psi_score")
        q, t = d.get("psi_query_len"), d.get("psi_title_len")
        cells = [
            f'<td class="name">{html.escape(name)}{" (unseen)" if name in unseen else ""}</td>',
            _cell(str(d.get("n", m.get("n", 0))), name in unseen),
            _cell(_fmt(m.get("positive_rate"))),
            _cell(auc_txt, auc is not None and th["alert_min_auc"] > 0 and auc < th["alert_min_auc"]),
            _cell(_fmt(m.get("pr_auc"))),
            _cell(_fmt(m.get("log_loss"))),
            _cell(_fmt(m.get("ece"))),
            _cell(_fmt(psi), judged and psi is not None and psi > th["psi_threshold"]),
            _cell(_fmt(q), judged and q is not None and q > th["length_psi_threshold"]),
            _cell(_fmt(t), judged and t is not None and t > th["length_psi_threshold"]),
            f'<td><a href="#{html.escape(plot_files[name])}">plot</a></td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return rows


def champion_table(comparison: dict) -> list[str]:
    """The champion against the candidate: one row per scenario of the matched rows, then the macro AUC.
    A delta whose CI lies below 0 (candidate significantly worse) is highlighted."""
    level = f"{comparison['ci_level']:.0%}"
    cand_v, champ_v = (html.escape(comparison[k] or "unknown") for k in ("candidate_version", "version"))
    head = ["scenario", "rows", "positives", f"candidate AUC ({cand_v})", f"champion AUC ({champ_v})",
            f"&Delta; AUC [{level} paired CI]", "verdict"]
    rows = ['<table id="champion"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for name, c in sorted(comparison["scenarios"].items()):
        if c["delta"] is None:
            delta = f'– <small>({html.escape(c.get("reason", ""))})</small>'
        else:
            delta = f"{c['delta']:+.4f} [{_fmt(c['ci_low'], 4)}, {_fmt(c['ci_high'], 4)}]"
        rows.append(f'<tr data-scenario="{html.escape(name)}"><td class="name">{html.escape(name)}</td>'
                    f"<td>{c['rows']}</td><td>{c['positives']}</td><td>{_fmt(c['candidate_auc'], 4)}</td>"
                    f"<td>{_fmt(c['champion_auc'], 4)}</td>" + _cell(delta, c["verdict"] == "worse")
                    + _cell(html.escape(c["verdict"] or "–"), c["verdict"] == "worse") + "</tr>")
    mac = comparison["auc_macro"]
    if mac["delta"] is not None:
        rows.append(f'<tr class="macro"><td class="name">macro ({len(mac["scenarios"])} scenarios)</td><td></td>'
                    f"<td></td><td>{mac['candidate']:.4f}</td><td>{mac['champion']:.4f}</td>"
                    f"<td>{mac['delta']:+.4f}</td><td></td></tr>")
    rows.append("</table>")
    rows.append(f"<p><small>Both models on the same labelled rows, matched on "
                f"({', '.join(comparison['key'])}): {comparison['rows_matched']} rows matched; "
                f"{comparison['candidate_rows_unmatched']} labelled rows without a champion score and "
                f"{comparison['champion_rows_unmatched']} champion rows without a labelled candidate row are left "
                f"out. The CI is the paired bootstrap of the difference ({comparison['bootstrap_rounds']} "
                f"rounds, the same resamples for both models). Informational: the promotion gate decides."
                f"</small></p>")
    return rows


def bins_table(name: str, curve: list[dict], min_bin_rows: int = MIN_BIN_ROWS) -> str:
    """The reliability bins as numbers: rows, mean prediction, fraction positive; thin bins in grey."""
    cells = {"bin": [], "rows": [], "mean predicted": [], "fraction positive": []}
    for b in curve:
        cls = ' class="few"' if b["n"] < min_bin_rows else ""
        cells["bin"].append(f"<th>{b['bin_lo']:.2f}–{b['bin_hi']:.2f}</th>")
        cells["rows"].append(f'<td{cls} data-n="{b["n"]}">{b["n"]}</td>')
        cells["mean predicted"].append(f"<td{cls}>{_fmt(b['mean_pred'])}</td>")
        cells["fraction positive"].append(f"<td{cls}>{_fmt(b['frac_pos'])}</td>")
    body = "".join(f"<tr><th>{k}</th>{''.join(v)}</tr>" for k, v in cells.items())
    return (f'<table class="bins" data-scenario="{html.escape(name)}">{body}</table>'
            f"<p><small>Grey: bins with fewer than {min_bin_rows} labelled rows; their fraction positive is "
            f"noise.</small></p>")


def trend_table(name: str, points: list[dict]) -> str:
    """The points of the trend plot: run, start, model version, AUC, score PSI; this run highlighted."""
    rows = [(f'<table class="trend" data-scenario="{html.escape(name)}"><tr><th>run</th><th>started</th>'
             "<th>MLflow run</th><th>model version</th><th>AUC</th><th>score PSI</th></tr>")]
    for p in points:
        cls = ' class="current"' if p["current"] else ""
        rows.append(f"<tr{cls}><td>{html.escape(p['label'])}</td><td>{html.escape(str(p['start_time'] or '–'))}</td>"
                    f"<td>{html.escape(p['run_id'] or '–')}</td><td>{html.escape(str(p['model_version'] or '–'))}"
                    f'</td><td data-v="{_num(p["auc"])}">{_fmt(p["auc"], 4)}</td>'
                    f'<td data-v="{_num(p["psi_score"])}">{_fmt(p["psi_score"], 4)}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def _num(v) -> str:
    """A value as a data attribute: repr of the float (round-trips exactly), "" when missing."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def write_report(summary: dict, out_dir: str | Path, reference: dict | None = None, *,
                 curves: dict[str, dict] | None = None, history: list[dict] | None = None) -> Path:
    """Write out_dir/report.html and out_dir/plots/*.png; returns the HTML path.

    ``curves``: {scenario: {"roc": ..., "pr": ...}} (the check computes them from the labelled rows);
    ``history``: earlier monitoring runs, oldest first (None: no trends). See the module docstring.
    """
    out = Path(out_dir)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    metrics, drift = summary.get("metrics") or {}, summary["drift"]["scenarios"]
    ref_scn = (reference or {}).get("scenarios", {})
    edges = (reference or {}).get("hist_edges") or [i / 20 for i in range(21)]
    names = sorted(set(metrics) | set(drift))
    curves = curves or {}
    plot_files, curve_files, trend_files, trends = {}, {}, {}, {}
    for i, name in enumerate(names):
        plot_files[name] = f"{PLOTS_DIR}/{plot_name(i, name)}"
        m = metrics.get(name, {})
        fig = scenario_figure(name, m.get("reliability"), drift.get(name, {}).get(
            "score_hist", [0.0] * (len(edges) - 1)), ref_scn.get(name, {}).get("score_hist"), edges)
        save_figure(fig, out / plot_files[name])
        if name in curves:
            curve_files[name] = plot_files[name].removesuffix(".png") + "_curves.png"
            save_figure(curves_figure(name, curves[name].get("roc"), curves[name].get("pr"), m.get("auc"),
                                      m.get("pr_auc"), m.get("positive_rate")), out / curve_files[name])
        if history is not None:
            trends[name] = trend_points(name, summary, history)
            trend_files[name] = plot_files[name].removesuffix(".png") + "_trend.png"
            save_figure(trend_figure(name, trends[name], summary["thresholds"]), out / trend_files[name])
    used = {out / f for files in (plot_files, curve_files, trend_files) for f in files.values()}
    for stale in (out / PLOTS_DIR).glob("*.png"):  # an earlier report's plots that this one does not show
        if stale not in used:
            stale.unlink(missing_ok=True)

    breaches = summary["breaches"]
    head = (f'<div class="breaches"><b>{len(breaches)} breach(es)</b><ul>'
            + "".join(f"<li>{html.escape(b)}</li>" for b in breaches) + "</ul></div>") if breaches else \
        '<div class="ok"><b>No breaches.</b></div>'
    overall = summary.get("overall") or {}
    qr = summary["drift"].get("quarantine_rate")
    version = summary.get("model_version") or "unknown"
    champ = summary.get("champion")
    facts = [
        ("model version", version),
        *([("champion", champ["version"] or "unknown")] if champ else []),
        ("scored rows", summary["rows"]), ("labelled rows", summary["labelled_rows"]),
        ("macro AUC", _fmt(overall.get("auc_macro"))), ("volume-weighted AUC", _fmt(overall.get("auc_weighted"))),
        ("quarantine rate", "–" if qr is None else f"{qr:.2%}"),
        ("scenarios missing from this data", ", ".join(summary["drift"]["missing_scenarios"]) or "none"),
        ("scored input", summary["scored"]), ("reference", summary["reference"]), ("created", summary["created_at"]),
    ]
    header = ["scenario", "volume", "positive rate", "AUC [95% CI]", "PR-AUC", "log loss", "ECE",
              "PSI score", "PSI query len", "PSI title len", ""]
    th = summary["thresholds"]
    subtitle = f'model version <b id="model-version">{html.escape(version)}</b>'
    if champ:
        subtitle += f' &middot; against champion <b id="champion-version">{html.escape(champ["version"] or "unknown")}</b>'
    subtitle += f" &middot; {html.escape(summary['created_at'])}"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Relevance monitoring report: {html.escape(version)}</title>",
        (f'<style>{_CSS}</style></head><body><header id="report-header"><h1>Relevance monitoring report</h1>'
         f'<p class="model">{subtitle}</p></header>'), head,
        "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                            for k, v in facts) + "</table>",
        "<h2>Per scenario</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>",
        *scenario_rows(summary, plot_files), "</table>",
        (f"<p><small>Thresholds: {html.escape(json.dumps(th, sort_keys=True))}. PSI is judged only for scenarios "
         f"with at least {th['drift_min_rows']} rows.</small></p>"),
        *(["<h2>Champion against candidate</h2>", *champion_table(champ)] if champ else []),
        "<h2>Plots</h2>",
    ]
    for n in names:
        e = html.escape(n)
        parts += [f'<section class="scenario" data-scenario="{e}"><h3 id="{html.escape(plot_files[n])}">{e}</h3>',
                  (f'<img src="{html.escape(plot_files[n])}" alt="reliability with rows per bin, and score '
                   f'histogram of {e}">')]
        if (metrics.get(n) or {}).get("reliability"):
            parts.append(bins_table(n, metrics[n]["reliability"]))
        if n in curve_files:
            parts.append(f'<img src="{html.escape(curve_files[n])}" alt="ROC and precision-recall of {e}">')
        if n in trend_files:
            parts += [f'<img src="{html.escape(trend_files[n])}" alt="AUC and score PSI trend of {e}">',
                      trend_table(n, trends[n])]
        parts.append("</section>")
    parts.append("</body></html>")
    return write_bytes_atomic(out / "report.html", "\n".join(parts).encode())
