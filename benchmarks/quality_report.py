"""Tables and plot of the quality benchmark (``benchmarks.quality``), from its results.json.

    python -m benchmarks.quality_report runs/quality/results.json --docs docs    # re-render only

Per dataset and method: per-scenario test ROC-AUC and macro AUC as mean ± sample std over seeds,
adapter and total trainable parameters, median training time; then MTL-LoRA minus each baseline,
paired by seed (same data order and head initialisation), with how many seeds MTL-LoRA won.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.atomic import atomic_path

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
LABELS = {"mtl_lora": "MTL-LoRA", "lora": "LoRA (same r)", "lora_matched": "LoRA (matched params)",
          "per_task_lora": "per-scenario LoRA"}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}" if len(values) > 1 else f"{m:.4f}"


def summarize(results: dict) -> dict[str, dict[str, dict]]:
    """dataset -> method -> {r, adapter_params, trainable_params, seeds, macro, scenarios, train_s, rate}."""
    out: dict[str, dict[str, dict]] = {}
    for run in results["runs"]:
        entry = out.setdefault(run["dataset"], {}).setdefault(run["method"], {
            "r": run["r"], "adapter_params": run["adapter_params"], "trainable_params": run["trainable_params"],
            "seeds": [], "macro": [], "scenarios": {}, "train_s": [], "rate": []})
        entry["seeds"].append(run["seed"])
        entry["macro"].append(run["test_auc_macro"])
        for scenario, auc in run["test_auc"].items():
            entry["scenarios"].setdefault(scenario, []).append(auc)
        entry["train_s"].append(run["train_s"])
        if run.get("samples_per_s"):
            entry["rate"].append(run["samples_per_s"])
    for methods in out.values():  # table order: METHODS order as in LABELS
        ordered = {m: methods[m] for m in LABELS if m in methods}
        methods.clear()
        methods.update(ordered)
    return out


def paired_differences(entry_a: dict, entry_b: dict) -> list[float]:
    """Macro AUC of a minus b for the seeds both ran."""
    b_by_seed = dict(zip(entry_b["seeds"], entry_b["macro"]))
    return [m - b_by_seed[s] for s, m in zip(entry_a["seeds"], entry_a["macro"]) if s in b_by_seed]


def render_markdown(results: dict) -> str:
    summary = summarize(results)
    s = results["settings"]
    lines = [f"Command: `{results.get('command', 'python -m benchmarks.quality')}`", "",
             f"Config `{s['config']}` with overrides {s['overrides'] or 'none'}; {s['steps']} steps, "
             f"max length {s['max_length']}, validation capped at {s['eval_rows']} rows (once, at the end); "
             "test split scored once per run.", ""]
    for dataset, methods in summary.items():
        scenarios = sorted({sc for e in methods.values() for sc in e["scenarios"]})
        lines += [f"### {dataset}", ""]
        if dataset in results.get("data", {}):
            lines += [f"Data: `{json.dumps(_data_note(results['data'][dataset]))}`", ""]
        head = ["method", "r", "adapter params", "trainable (incl. head)", *scenarios, "macro AUC",
                "seeds", "train s (median)", "samples/s (median)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, e in methods.items():
            row = [LABELS.get(method, method), str(e["r"]), f"{e['adapter_params']:,}", f"{e['trainable_params']:,}",
                   *[_fmt(e["scenarios"][sc]) if sc in e["scenarios"] and None not in e["scenarios"][sc] else "–"
                     for sc in scenarios],
                   f"**{_fmt(e['macro'])}**", str(len(e["seeds"])), f"{statistics.median(e['train_s']):.0f}",
                   f"{statistics.median(e['rate']):.1f}" if e["rate"] else "–"]
            lines.append("| " + " | ".join(row) + " |")
        if "mtl_lora" in methods and len(methods) > 1:
            lines += ["", "MTL-LoRA minus baseline, macro test AUC, paired by seed:", "",
                      "| baseline | difference (mean ± std) | MTL-LoRA better in |", "|---|---|---|"]
            for method, e in methods.items():
                if method != "mtl_lora":
                    d = paired_differences(methods["mtl_lora"], e)
                    if d:
                        m, sd = mean_std(d)
                        lines.append(f"| {LABELS.get(method, method)} | {m:+.4f} ± {sd:.4f} | "
                                     f"{sum(x > 0 for x in d)} of {len(d)} seeds |")
        lines.append("")
    return "\n".join(lines)


def _data_note(info: dict) -> dict:
    """The row counts worth printing (per split: rows kept, dropped as seen in train)."""
    if "splits" in info:
        return {"splits": info["splits"]}
    return {split: {k: v for k, v in d.items() if k in ("rows", "quarantined", "dropped_seen_in_train")}
            for split, d in info.items()}


def render_plot(results: dict, path: Path) -> Path:
    """Per dataset: macro AUC per method (mean ± std, seeds as dots) and per-scenario mean AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = summarize(results)
    fig, axes = plt.subplots(len(summary), 2, figsize=(12, 3.6 * len(summary)), squeeze=False)
    for (dataset, methods), (ax_macro, ax_sc) in zip(summary.items(), axes):
        names = list(methods)
        for i, m in enumerate(names):
            mean, sd = mean_std(methods[m]["macro"])
            ax_macro.errorbar(i, mean, yerr=sd, fmt="o", capsize=6, color=f"C{i}", markersize=8)
            ax_macro.scatter([i + 0.12] * len(methods[m]["macro"]), methods[m]["macro"], s=12, color=f"C{i}", alpha=0.6)
        ax_macro.set_xticks(range(len(names)),
                            [f"{LABELS.get(m, m)}\n{methods[m]['adapter_params'] / 1e3:.0f}k adapter params" for m in names],
                            fontsize=8)
        ax_macro.set_ylabel("macro test ROC-AUC")
        ax_macro.set_title(f"{dataset}: macro AUC over seeds (mean ± std, dots = seeds)")
        ax_macro.grid(axis="y", alpha=0.3)
        scenarios = sorted({sc for e in methods.values() for sc in e["scenarios"]})
        width = 0.8 / max(len(names), 1)
        for i, m in enumerate(names):
            # A scenario without an AUC (one class only in a tiny test split) is left out of its bar.
            vals = [[v for v in methods[m]["scenarios"].get(sc, []) if v is not None] for sc in scenarios]
            means = [statistics.fmean(v) if v else 0.0 for v in vals]
            sds = [mean_std(v)[1] if v else 0.0 for v in vals]
            ax_sc.bar(np.arange(len(scenarios)) + i * width, means, width, yerr=sds, capsize=2,
                      color=f"C{i}", label=LABELS.get(m, m))
        ax_sc.set_xticks(np.arange(len(scenarios)) + 0.4 - width / 2, scenarios)
        finite = [v for e in methods.values() for vs in e["scenarios"].values() for v in vs if v is not None]
        if finite:
            ax_sc.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.02))
        ax_sc.set_ylabel("test ROC-AUC (mean over seeds)")
        ax_sc.set_title(f"{dataset}: per scenario")
        ax_sc.legend(fontsize=7, loc="lower right")
        ax_sc.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def insert_block(doc: Path, block: str) -> Path:
    """Put ``block`` between the BEGIN/END markers of ``doc`` (created, or appended to, when missing)."""
    text = doc.read_text() if doc.is_file() else "# Quality: MTL-LoRA against LoRA baselines\n\n"
    wrapped = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + wrapped + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + wrapped + "\n"
    with atomic_path(doc) as tmp:
        tmp.write_text(text)
    return doc


def write_reports(results: dict, out: Path, docs: Path | None = None) -> list[Path]:
    """out/quality.md and out/quality.png; with ``docs`` also docs/quality.png and the block in docs/quality.md."""
    block = render_markdown(results)
    with atomic_path(out / "quality.md") as tmp:
        tmp.write_text(block)
    paths = [out / "quality.md", render_plot(results, out / "quality.png")]
    if docs is not None:
        paths += [insert_block(docs / "quality.md", block), render_plot(results, docs / "quality.png")]
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results.json written by python -m benchmarks.quality")
    p.add_argument("--docs", default="", help="also write DIR/quality.png and the tables into DIR/quality.md")
    args = p.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    for written in write_reports(json.loads(path.read_text()), path.parent, Path(args.docs) if args.docs else None):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
