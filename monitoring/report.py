"""The human-readable monitoring report: one HTML page with a table per scenario and matplotlib PNGs.

    write_report(summary, out_dir, reference)   # out_dir/report.html, out_dir/plots/<scenario>.png

``summary`` is what ``monitoring.check.run_check`` builds (metrics, drift, thresholds, breaches). Each
scenario gets a PNG with its reliability curve and its score histogram against the reference; the HTML
embeds them by relative path, so the folder can be copied or logged to MLflow as a whole. Breaches are
listed at the top and their cells are highlighted. Every file is written under a temporary name, then
renamed.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

from matplotlib.figure import Figure  # the object API: Agg canvas, no pyplot global state

from kernel.atomic import atomic_path, write_bytes_atomic

PLOTS_DIR = "plots"

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.name { text-align: left; font-weight: bold; }
td.breach { background: #f8d0d0; color: #900; font-weight: bold; }
.breaches { background: #fde8e8; border: 1px solid #d33; padding: 0.5em 1em; }
.ok { background: #e8f6e8; border: 1px solid #3a3; padding: 0.5em 1em; }
img { max-width: 720px; }
"""


def plot_name(index: int, scenario: str) -> str:
    """A file name safe on every filesystem; the index keeps names unique after cleaning."""
    return f"{index:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', scenario)[:60]}.png"


def scenario_figure(name: str, curve: list[dict] | None, hist: list[float], ref_hist: list[float] | None,
                    edges: list[float]) -> Figure:
    """Left: reliability curve (mean prediction vs fraction positive per bin). Right: score histograms."""
    fig = Figure(figsize=(9, 3.6), dpi=90)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="perfect")
    if curve:
        pts = [(b["mean_pred"], b["frac_pos"]) for b in curve if b["n"] > 0]
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="model")
    else:
        ax1.text(0.5, 0.5, "no labels", ha="center", va="center")
    ax1.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="fraction positive",
            title="reliability")
    ax1.legend(loc="upper left", fontsize=8)
    width = edges[1] - edges[0]
    ax2.bar(edges[:-1], hist, width=width, align="edge", alpha=0.6, label="current")
    if ref_hist is not None:
        ax2.step(edges, [ref_hist[0], *ref_hist], where="pre", color="black", label="reference")
    ax2.set(xlim=(0, 1), xlabel="score", ylabel="share of rows", title="score distribution")
    ax2.legend(loc="upper center", fontsize=8)
    fig.suptitle(name)
    fig.tight_layout()
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


def write_report(summary: dict, out_dir: str | Path, reference: dict | None = None) -> Path:
    """Write out_dir/report.html and out_dir/plots/*.png; returns the HTML path."""
    out = Path(out_dir)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    metrics, drift = summary.get("metrics") or {}, summary["drift"]["scenarios"]
    ref_scn = (reference or {}).get("scenarios", {})
    edges = (reference or {}).get("hist_edges") or [i / 20 for i in range(21)]
    names = sorted(set(metrics) | set(drift))
    plot_files = {}
    for i, name in enumerate(names):
        plot_files[name] = f"{PLOTS_DIR}/{plot_name(i, name)}"
        fig = scenario_figure(name, metrics.get(name, {}).get("reliability"), drift.get(name, {}).get(
            "score_hist", [0.0] * (len(edges) - 1)), ref_scn.get(name, {}).get("score_hist"), edges)
        save_figure(fig, out / plot_files[name])

    breaches = summary["breaches"]
    head = (f'<div class="breaches"><b>{len(breaches)} breach(es)</b><ul>'
            + "".join(f"<li>{html.escape(b)}</li>" for b in breaches) + "</ul></div>") if breaches else \
        '<div class="ok"><b>No breaches.</b></div>'
    overall = summary.get("overall") or {}
    qr = summary["drift"].get("quarantine_rate")
    facts = [
        ("scored rows", summary["rows"]), ("labelled rows", summary["labelled_rows"]),
        ("macro AUC", _fmt(overall.get("auc_macro"))), ("volume-weighted AUC", _fmt(overall.get("auc_weighted"))),
        ("quarantine rate", "–" if qr is None else f"{qr:.2%}"),
        ("scenarios missing from this data", ", ".join(summary["drift"]["missing_scenarios"]) or "none"),
        ("scored input", summary["scored"]), ("reference", summary["reference"]), ("created", summary["created_at"]),
    ]
    header = ["scenario", "volume", "positive rate", "AUC [95% CI]", "PR-AUC", "log loss", "ECE",
              "PSI score", "PSI query len", "PSI title len", ""]
    th = summary["thresholds"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Relevance monitoring report</title>",
        f"<style>{_CSS}</style></head><body><h1>Relevance monitoring report</h1>", head,
        "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                            for k, v in facts) + "</table>",
        "<h2>Per scenario</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>",
        *scenario_rows(summary, plot_files), "</table>",
        f"<p><small>Thresholds: {html.escape(json.dumps(th, sort_keys=True))}. PSI is judged only for scenarios "
        f"with at least {th['drift_min_rows']} rows.</small></p>",
        "<h2>Plots</h2>",
        *(f'<h3 id="{html.escape(plot_files[n])}">{html.escape(n)}</h3><img src="{html.escape(plot_files[n])}" '
          f'alt="reliability and score histogram of {html.escape(n)}">' for n in names),
        "</body></html>",
    ]
    return write_bytes_atomic(out / "report.html", "\n".join(parts).encode())
