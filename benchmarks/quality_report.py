"""Tables and plots of the quality benchmark (``benchmarks.quality``), from its results.json.

    python -m benchmarks.quality_report runs/quality/results.json --docs docs    # re-render only

Per dataset and method: per-scenario test ROC-AUC and macro AUC as mean ± sample std over seeds,
adapter and total trainable parameters, median training time; then MTL-LoRA minus each baseline,
paired by seed (same data order and head initialisation), with how many seeds MTL-LoRA won.

results.json of the current protocol (``"protocol": 2``: an lr grid per method, budgets, variants) adds,
per dataset and budget: the validation macro AUC of every lr and the chosen one, per-scenario paired
differences next to each scenario's training rows, the variants as paired deltas, the diagnostics at init
and at the end, and for the synthetic grid cells a heat map of MTL-LoRA minus LoRA (quality_grid.png).
Earlier results.json files (one lr, one run per method and seed) render as they always did.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.protocol import chosen, mean_std
from benchmarks.quality_plots import render_heatmap, render_plot
from benchmarks.quality_tables import (
    budget_label,
    fmt_values,
    label,
    paired_differences,
    render_protocol_markdown,
    summarize,
)
from kernel.atomic import atomic_path

# The protocol's tables are benchmarks.quality_tables, the plots benchmarks.quality_plots; this module writes
# them (and renders the earlier one-lr layout's tables itself).
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


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
            row = [label(method), str(e["r"]), f"{e['adapter_params']:,}", f"{e['trainable_params']:,}",
                   *[fmt_values(e["scenarios"][sc]) if sc in e["scenarios"] and None not in e["scenarios"][sc] else "–"
                     for sc in scenarios],
                   f"**{fmt_values(e['macro'])}**", str(len(e["seeds"])), f"{statistics.median(e['train_s']):.0f}",
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
                        lines.append(f"| {label(method)} | {m:+.4f} ± {sd:.4f} | "
                                     f"{sum(x > 0 for x in d)} of {len(d)} seeds |")
        lines.append("")
    return "\n".join(lines)


def _data_note(info: dict) -> dict:
    """The row counts worth printing (per split: rows kept, dropped as seen in train)."""
    if "splits" in info:
        return {"splits": info["splits"]}
    return {split: {k: v for k, v in d.items() if k in ("rows", "quarantined", "dropped_seen_in_train")}
            for split, d in info.items()}


def insert_block(doc: Path, block: str, name: str = "quality") -> Path:
    """Put ``block`` between the ``<!-- name:begin -->`` / ``<!-- name:end -->`` markers of ``doc`` (created,
    or appended to, when missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.is_file() else "# Quality: MTL-LoRA against LoRA baselines\n\n"
    wrapped = f"{begin}\n{block.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + wrapped + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + wrapped + "\n"
    with atomic_path(doc) as tmp:
        tmp.write_text(text)
    return doc


def write_reports(results: dict, out: Path, docs: Path | None = None, name: str = "quality") -> list[Path]:
    """out/quality.md and out/quality.png (+ out/quality_grid.png for grid cells); with ``docs`` also the
    plots as docs/<name>.png (docs/<name>_grid.png) and the block between docs/quality.md's <name> markers."""
    if results.get("protocol") == 2:
        return _write_protocol_reports(results, out, docs, name)
    block = render_markdown(results)
    with atomic_path(out / "quality.md") as tmp:
        tmp.write_text(block)
    paths = [out / "quality.md", render_plot(results, out / "quality.png")]
    if docs is not None:
        paths += [insert_block(docs / "quality.md", block, name), render_plot(results, docs / f"{name}.png")]
    return paths


# --- the protocol (results.json "protocol": 2) ------------------------------------------------------------

def _legacy_view(results: dict) -> dict:
    """The chosen trials of the non-grid datasets as protocol-1 runs (dataset "name · budget"), for the plot."""
    runs = []
    for (dataset, budget, method), trials in chosen(results).items():
        if dataset in results.get("grid", {}):
            continue
        for seed, t in trials.items():
            runs.append({**t, "dataset": f"{dataset} · {budget_label(budget)}", "method": method, "seed": seed})
    return {"runs": runs}


def _write_protocol_reports(results: dict, out: Path, docs: Path | None, name: str) -> list[Path]:
    block = render_protocol_markdown(results)
    with atomic_path(out / "quality.md") as tmp:
        tmp.write_text(block)
    paths = [out / "quality.md"]
    if docs is not None:
        paths.append(insert_block(docs / "quality.md", block, name))
    legacy = _legacy_view(results)
    for folder, stem in ((out, "quality"), *(((docs, name),) if docs is not None else ())):
        if legacy["runs"]:
            paths.append(render_plot(legacy, folder / f"{stem}.png"))
        heat = render_heatmap(results, folder / f"{stem}_grid.png")
        if heat is not None:
            paths.append(heat)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results.json written by python -m benchmarks.quality")
    p.add_argument("--docs", default="", help="also write DIR/quality.png and the tables into DIR/quality.md")
    p.add_argument("--docs-name", default="quality", help="marker name in DIR/quality.md and plot file stem")
    args = p.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    docs = Path(args.docs) if args.docs else None
    for written in write_reports(json.loads(path.read_text()), path.parent, docs, args.docs_name):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
