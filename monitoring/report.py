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
    the figures are ``monitoring.plots``';
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
from pathlib import Path

from kernel.atomic import write_bytes_atomic
from monitoring.history import scenario_key
from monitoring.plots import MIN_BIN_ROWS, curves_figure, plot_name, save_figure, scenario_figure, trend_figure

PLOTS_DIR = "plots"

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
    plots = draw_plots(summary, out, reference, curves or {}, history)
    return write_bytes_atomic(out / "report.html", page(summary, plots).encode())


def draw_plots(summary: dict, out: Path, reference: dict | None, curves: dict[str, dict],
               history: list[dict] | None) -> dict:
    """Every scenario's PNGs under out/plots (stale ones of an earlier report removed). Returns {"names",
    "plots", "curves", "trends" (relative PNG paths per scenario), "points" (trend points per scenario)}."""
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    metrics, drift = summary.get("metrics") or {}, summary["drift"]["scenarios"]
    ref_scn = (reference or {}).get("scenarios", {})
    edges = (reference or {}).get("hist_edges") or [i / 20 for i in range(21)]
    drawn = {"names": sorted(set(metrics) | set(drift)), "plots": {}, "curves": {}, "trends": {}, "points": {}}
    for i, name in enumerate(drawn["names"]):
        base = drawn["plots"][name] = f"{PLOTS_DIR}/{plot_name(i, name)}"
        m = metrics.get(name, {})
        hist = drift.get(name, {}).get("score_hist", [0.0] * (len(edges) - 1))
        save_figure(scenario_figure(name, m.get("reliability"), hist, ref_scn.get(name, {}).get("score_hist"),
                                    edges), out / base)
        if name in curves:
            drawn["curves"][name] = base.removesuffix(".png") + "_curves.png"
            save_figure(curves_figure(name, curves[name].get("roc"), curves[name].get("pr"), m.get("auc"),
                                      m.get("pr_auc"), m.get("positive_rate")), out / drawn["curves"][name])
        if history is not None:
            points = drawn["points"][name] = trend_points(name, summary, history)
            drawn["trends"][name] = base.removesuffix(".png") + "_trend.png"
            save_figure(trend_figure(name, points, summary["thresholds"]), out / drawn["trends"][name])
    used = {out / f for kind in ("plots", "curves", "trends") for f in drawn[kind].values()}
    for stale in (out / PLOTS_DIR).glob("*.png"):  # an earlier report's plots that this one does not show
        if stale not in used:
            stale.unlink(missing_ok=True)
    return drawn


def facts(summary: dict) -> list[tuple[str, object]]:
    """The facts of the run, shown as a table under the breaches."""
    overall, champ = summary.get("overall") or {}, summary.get("champion")
    qr = summary["drift"].get("quarantine_rate")
    return [
        ("model version", summary.get("model_version") or "unknown"),
        ("data", summary.get("data") or "traffic"),
        *([("champion", champ["version"] or "unknown")] if champ else []),
        ("scored rows", summary["rows"]), ("labelled rows", summary["labelled_rows"]),
        ("macro AUC", _fmt(overall.get("auc_macro"))), ("volume-weighted AUC", _fmt(overall.get("auc_weighted"))),
        ("quarantine rate", "–" if qr is None else f"{qr:.2%}"),
        ("scenarios missing from this data", ", ".join(summary["drift"]["missing_scenarios"]) or "none"),
        ("scored input", summary["scored"]), ("reference", summary["reference"]), ("created", summary["created_at"]),
    ]


def page(summary: dict, drawn: dict) -> str:
    """The HTML page (see the module docstring) over the PNGs of ``draw_plots``."""
    breaches, metrics = summary["breaches"], summary.get("metrics") or {}
    head = (f'<div class="breaches"><b>{len(breaches)} breach(es)</b><ul>'
            + "".join(f"<li>{html.escape(b)}</li>" for b in breaches) + "</ul></div>") if breaches else \
        '<div class="ok"><b>No breaches.</b></div>'
    version = summary.get("model_version") or "unknown"
    champ = summary.get("champion")
    header = ["scenario", "volume", "positive rate", "AUC [95% CI]", "PR-AUC", "log loss", "ECE",
              "PSI score", "PSI query len", "PSI title len", ""]
    th = summary["thresholds"]
    subtitle = (f'model version <b id="model-version">{html.escape(version)}</b> on '
                f'<b id="data">{html.escape(summary.get("data") or "traffic")}</b>')
    if champ:
        subtitle += f' &middot; against champion <b id="champion-version">{html.escape(champ["version"] or "unknown")}</b>'
    subtitle += f" &middot; {html.escape(summary['created_at'])}"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Relevance monitoring report: {html.escape(version)}</title>",
        (f'<style>{_CSS}</style></head><body><header id="report-header"><h1>Relevance monitoring report</h1>'
         f'<p class="model">{subtitle}</p></header>'), head,
        "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                            for k, v in facts(summary)) + "</table>",
        f"<h2>Per scenario ({html.escape(summary.get('data') or 'traffic')})</h2><table><tr>"
        + "".join(f"<th>{h}</th>" for h in header) + "</tr>",
        *scenario_rows(summary, drawn["plots"]), "</table>",
        (f"<p><small>Thresholds: {html.escape(json.dumps(th, sort_keys=True))}. PSI is judged only for scenarios "
         f"with at least {th['drift_min_rows']} rows.</small></p>"),
        *(["<h2>Champion against candidate</h2>", *champion_table(champ)] if champ else []),
        "<h2>Plots</h2>",
    ]
    for n in drawn["names"]:
        e = html.escape(n)
        parts += [f'<section class="scenario" data-scenario="{e}"><h3 id="{html.escape(drawn["plots"][n])}">{e}</h3>',
                  (f'<img src="{html.escape(drawn["plots"][n])}" alt="reliability with rows per bin, and score '
                   f'histogram of {e}">')]
        if (metrics.get(n) or {}).get("reliability"):
            parts.append(bins_table(n, metrics[n]["reliability"]))
        if n in drawn["curves"]:
            parts.append(f'<img src="{html.escape(drawn["curves"][n])}" alt="ROC and precision-recall of {e}">')
        if n in drawn["trends"]:
            parts += [f'<img src="{html.escape(drawn["trends"][n])}" alt="AUC and score PSI trend of {e}">',
                      trend_table(n, drawn["points"][n])]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
