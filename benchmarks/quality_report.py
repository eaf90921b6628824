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
import math
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.atomic import atomic_path

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
LABELS = {"mtl_lora": "MTL-LoRA", "lora": "LoRA (same r)", "lora_matched": "LoRA (matched params)",
          "per_task_lora": "per-scenario LoRA"}


def label(method: str) -> str:
    """Table label: LABELS, "MTL-LoRA [tau1]" for a variant, else the adapter.method itself."""
    if method in LABELS:
        return LABELS[method]
    return f"MTL-LoRA [{method.split('+', 1)[1]}]" if method.startswith("mtl_lora+") else method


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
    for methods in out.values():  # table order: LABELS order, then any other method (variants) as they came
        ordered = {m: methods[m] for m in LABELS if m in methods} | {m: e for m, e in methods.items() if m not in LABELS}
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
            row = [label(method), str(e["r"]), f"{e['adapter_params']:,}", f"{e['trainable_params']:,}",
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
                            [f"{label(m)}\n{methods[m]['adapter_params'] / 1e3:.0f}k adapter params" for m in names],
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
                      color=f"C{i % 10}", label=label(m))
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

BASELINES = ("lora", "lora_matched", "per_task_lora")


def chosen(results: dict) -> dict[tuple[str, str, str], dict[int, dict]]:
    """(dataset, budget, method) -> seed -> the trial at the lr chosen on validation, once it has its test."""
    out: dict[tuple[str, str, str], dict[int, dict]] = {}
    for t in results["trials"]:
        sel = results["selected"].get(f"{t['dataset']}|{t['budget']}|{t['method']}")
        if sel and t["lr"] == sel["lr"] and t["seed"] in sel["seeds"] and "test_auc_macro" in t:
            out.setdefault((t["dataset"], t["budget"], t["method"]), {})[t["seed"]] = t
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def _order(values) -> list:
    return list(dict.fromkeys(values))


def _methods_order(methods) -> list[str]:
    methods = _order(methods)
    return [m for m in LABELS if m in methods] + [m for m in methods if m not in LABELS]


def paired_macro(a: dict[int, dict], b: dict[int, dict]) -> dict[int, float]:
    """seed -> macro test AUC of a minus b (both chosen trials)."""
    return {s: a[s]["test_auc_macro"] - b[s]["test_auc_macro"] for s in a if s in b}


def paired_scenario(a: dict[int, dict], b: dict[int, dict], scenario: str) -> dict[int, float]:
    """seed -> test AUC of a minus b in one scenario (seeds where either has no AUC are left out)."""
    out = {}
    for s in a:
        if s in b:
            x, y = a[s]["test_auc"].get(scenario), b[s]["test_auc"].get(scenario)
            if x is not None and y is not None:
                out[s] = x - y
    return out


def _delta(d: dict[int, float], per_seed: bool = False) -> str:
    if not d:
        return "–"
    m, sd = mean_std(list(d.values()))
    text = f"{m:+.4f} ± {sd:.4f}" if len(d) > 1 else f"{m:+.4f}"
    if per_seed:
        text += " (" + " / ".join(f"{v:+.4f}" for v in d.values()) + ")"
    return text


def _wins(d: dict[int, float]) -> str:
    return f"{sum(v > 0 for v in d.values())} of {len(d)}" if d else "–"


def _budget_label(name: str) -> str:
    return f"early stop, ≤ {name[2:]} steps" if name.startswith("es") else f"{name} steps"


def _diag_at(trial: dict, which: str) -> dict[str, float]:
    """The diag/... metrics a trial logged at init (step 0), or {} when it logged none."""
    return (trial.get("diag") or {}).get("0", {}) if which == "init" else (trial.get("diag") or {})


def _diag_value(trial: dict, which: str, key: str) -> float | None:
    """``key`` at init (step 0) or at the last step that logged it (gradients: the last update's)."""
    diag = trial.get("diag") or {}
    steps = sorted((int(s) for s, m in diag.items() if key in m), reverse=which != "init")
    if not steps or (which == "init" and steps[0] != 0):
        return None
    return diag[str(steps[0])][key]


def _diag_mean(trials: dict[int, dict], which: str, key: str) -> float | None:
    vals = [v for t in trials.values() if (v := _diag_value(t, which, key)) is not None]
    return statistics.fmean(vals) if vals else None


def _fmt_pair(a: float | None, b: float | None, digits: int = 2) -> str:
    f = (lambda v: "–" if v is None else f"{v:.{digits}f}")
    return f"{f(a)} → {f(b)}"


def render_protocol_markdown(results: dict) -> str:
    s = results["settings"]
    picks = chosen(results)
    # A command stopped before its end records no wall time: then there is no list to head.
    lines = ["Commands (wall time on this machine):", ""] if results.get("commands") else []
    for c in results.get("commands", []):
        lines.append(f"- `{c['command']}`: {c['wall_s'] / 60:.0f} min ({c['trained']} trials trained, "
                     f"{c['tested']} tests scored)")
    lines += ["", (f"Config `{s['config']}` with overrides {s['overrides'] or 'none'}; max length {s['max_length']}; "
                   f"validation capped at {s['eval_rows']} rows per scenario. {_grids_sentence(results)} The lr "
                   "with the best "
                   "validation macro AUC (mean over seeds) is chosen, and only its trials are scored on the test "
                   f"split, once each. Early stopping: validation every {s['es_eval_every']} steps, patience "
                   f"{s['es_patience']} validations, best validated checkpoint tested. Differences are paired by "
                   "seed."), ""]
    datasets = _order(t["dataset"] for t in results["trials"])
    budgets = _order(t["budget"] for t in results["trials"])
    for dataset in datasets:
        for budget in budgets:
            methods = _methods_order(m for (d, b, m) in picks if (d, b) == (dataset, budget))
            if methods:
                lines += _protocol_section(results, picks, dataset, budget, methods)
    grid = render_grid_markdown(results)
    if grid:
        lines += grid
    return "\n".join(lines)


def _grids_sentence(results: dict) -> str:
    """Which learning rates each method was tuned over (one grid for all, or the exceptions named)."""
    grids: dict[tuple[float, ...], list[str]] = {}
    for key, sel in results["selected"].items():
        method = key.split("|")[2]
        names = grids.setdefault(tuple(sel["lrs"]), [])
        if method not in names:
            names.append(method)
    if not grids:
        return ""
    def fmt(lrs: tuple[float, ...]) -> str:
        return ", ".join(f"{x:g}" for x in lrs)

    if len(grids) == 1:
        return f"Learning-rate grid {fmt(next(iter(grids)))}, the same for every method."
    widest = max(grids, key=len)
    rest = "; ".join(f"{', '.join(label(m) for m in names)}: {fmt(lrs)}" for lrs, names in grids.items()
                     if lrs != widest)
    return (f"Learning-rate grid {fmt(widest)} for {', '.join(label(m) for m in grids[widest])}; {rest} "
            "(a variant runs at the lr MTL-LoRA chose, so it had fewer tuning trials).")


def _protocol_section(results: dict, picks: dict, dataset: str, budget: str, methods: list[str]) -> list[str]:
    rows = results.get("train_rows", {}).get(dataset, {})
    cell = results.get("grid", {}).get(dataset)
    title = f"### {dataset} · {_budget_label(budget)}"
    if cell:
        title += f" (conflict {cell['conflict']:g}, imbalance {cell['imbalance']:g}:1)"
    lines = [title, ""]
    if rows:
        lines += ["Training rows: " + ", ".join(f"{k} {v:,}" for k, v in rows.items()), ""]
    by = {m: picks[(dataset, budget, m)] for m in methods}
    scenarios = sorted({sc for trials in by.values() for t in trials.values() for sc in t["test_auc"]})
    lrs = sorted({lr for m in methods for lr in results["selected"][f"{dataset}|{budget}|{m}"]["lrs"]})
    head = ["method", "r", "adapter params", "lr", *[f"val @ {lr:g}" for lr in lrs], "steps (best)", *scenarios,
            "macro test AUC", "seeds", "train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        trials = by[m]
        any_t = next(iter(trials.values()))
        sel = results["selected"][f"{dataset}|{budget}|{m}"]
        table = _lr_means(results, dataset, budget, m, sel["seeds"])
        val_cells = [("failed" if table[lr] == -math.inf else
                      "**" + f"{table[lr]:.4f}" + "**" if lr == sel["lr"] else f"{table[lr]:.4f}")
                     if table.get(lr) is not None else "–" for lr in lrs]
        steps = statistics.median(t["steps"] for t in trials.values())
        best = [t["best_step"] for t in trials.values() if t.get("best_step") is not None]
        per_sc = []
        for sc in scenarios:
            v = [t["test_auc"].get(sc) for t in trials.values()]
            per_sc.append(_fmt([x for x in v if x is not None]) if any(x is not None for x in v) else "–")
        lines.append("| " + " | ".join([
            label(m), str(any_t["r"]), f"{any_t['adapter_params']:,}", f"{sel['lr']:g}", *val_cells,
            f"{steps:.0f} ({statistics.median(best):.0f})" if best else f"{steps:.0f}", *per_sc,
            f"**{_fmt([t['test_auc_macro'] for t in trials.values()])}**", str(len(trials)),
            f"{statistics.median(t['train_s'] for t in trials.values()):.0f}"]) + " |")
    family = [m for m in methods if m == "mtl_lora" or m.startswith("mtl_lora+")]
    baselines = [m for m in methods if m not in family]
    if "mtl_lora" in by and baselines:
        lines += ["", "MTL-LoRA minus baseline, macro test AUC, paired by seed (per seed in brackets):", "",
                  "| baseline | difference (mean ± std) | MTL-LoRA better in |", "|---|---|---|"]
        for b in baselines:
            d = paired_macro(by["mtl_lora"], by[b])
            lines.append(f"| {label(b)} | {_delta(d, per_seed=True)} | {_wins(d)} seeds |")
        lines += ["", "Per scenario, MTL-LoRA minus baseline (test AUC, paired by seed), next to its training rows:", "",
                  "| scenario | train rows | " + " | ".join(f"vs {label(b)}" for b in baselines) + " |",
                  "|---|---|" + "---|" * len(baselines)]
        for sc in scenarios:
            cells = []
            for b in baselines:
                d = paired_scenario(by["mtl_lora"], by[b], sc)
                cells.append(f"{_delta(d)} ({_wins(d)})" if d else "–")
            lines.append(f"| {sc} | {rows.get(sc, 0):,} | " + " | ".join(cells) + " |")
    variants = [m for m in family if m != "mtl_lora"]
    if variants and "mtl_lora" in by:
        ref = "lora" if "lora" in by else None
        lines += ["", "Variants of MTL-LoRA (within the paper's method), macro test AUC, paired by seed:", "",
                  "| variant | overrides | lr | macro test AUC | vs MTL-LoRA | better in | "
                  + (f"vs {label(ref)} | better in |" if ref else ""),
                  "|---|---|---|---|---|---|" + ("---|---|" if ref else "")]
        for v in variants:
            dv = paired_macro(by[v], by["mtl_lora"])
            row = [label(v), "`" + " ".join(results.get("variants", {}).get(v, [])) + "`",
                   f"{results['selected'][f'{dataset}|{budget}|{v}']['lr']:g}",
                   _fmt([t["test_auc_macro"] for t in by[v].values()]), _delta(dv, per_seed=True), _wins(dv)]
            if ref:
                dl = paired_macro(by[v], by[ref])
                row += [_delta(dl), _wins(dl)]
            lines.append("| " + " | ".join(row) + " |")
    with_diag = [m for m in methods if any(_diag_at(t, "init") for t in by[m].values())]
    if with_diag:
        lines += ["", ("Diagnostics (training.diagnostics; means over the chosen trials; init → last logged step). "
                       "Entropy of softmax(w_t/τ) as a share of log n; tasks per B_i: effective number of scenarios "
                       "using each B_i; Λ drift: ||Λ_t − I|| / ||I||; gradient norms before clipping:"), "",
                  "| method | entropy / log n | top p | tasks per B_i | Λ drift | grad adapters | grad task | grad head |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in with_diag:
            def pair(key, digits=2, t=by[m]):
                return _fmt_pair(_diag_mean(t, "init", key), _diag_mean(t, "final", key), digits)

            lines.append(f"| {label(m)} | {pair('diag/entropy_frac')} | {pair('diag/top_p_mean')} | "
                         f"{pair('diag/tasks_eff_mean')} | {pair('diag/lambda_drift_mean', 3)} | "
                         f"{pair('diag/grad_norm/adapters', 3)} | {pair('diag/grad_norm/task', 4)} | "
                         f"{pair('diag/grad_norm/head', 3)} |")
    lines.append("")
    return lines


def _lr_means(results: dict, dataset: str, budget: str, method: str, seeds: list[int]) -> dict[float, float | None]:
    from benchmarks.protocol import lr_table

    mine = [t for t in results["trials"] if (t["dataset"], t["budget"], t["method"]) == (dataset, budget, method)
            and t["seed"] in seeds]
    return lr_table(mine, seeds)


def grid_deltas(results: dict, baseline: str = "lora") -> dict[str, dict]:
    """budget -> {"cells": {(conflict, imbalance): {seed: delta}}, "real": {dataset: {seed: delta}}}:
    macro test AUC of MTL-LoRA minus ``baseline``, paired by seed, for every grid cell and every other dataset."""
    picks = chosen(results)
    out: dict[str, dict] = {}
    for (dataset, budget, method), trials in picks.items():
        if method != "mtl_lora" or (dataset, budget, baseline) not in picks:
            continue
        d = paired_macro(trials, picks[(dataset, budget, baseline)])
        entry = out.setdefault(budget, {"cells": {}, "real": {}})
        cell = results.get("grid", {}).get(dataset)
        if cell:
            entry["cells"][(cell["conflict"], cell["imbalance"])] = d
        else:
            entry["real"][dataset] = d
    return {b: e for b, e in out.items() if e["cells"]}


def render_grid_markdown(results: dict) -> list[str]:
    lines: list[str] = []
    for baseline in ("lora", "lora_matched"):
        for budget, e in grid_deltas(results, baseline).items():
            conflicts = sorted({c for c, _ in e["cells"]})
            imbalances = sorted({i for _, i in e["cells"]})
            lines += [f"### Synthetic dials · {_budget_label(budget)}: MTL-LoRA minus {label(baseline)}", "",
                      ("Macro test AUC, paired by seed: mean ± std (MTL-LoRA better in). Columns: conflict of the "
                       "markets' rules (0 = one task, 1 = opposite rules); rows: largest / smallest scenario's "
                       "rows."), "",
                      "| imbalance \\ conflict | " + " | ".join(f"{c:g}" for c in conflicts) + " |",
                      "|---|" + "---|" * len(conflicts)]
            for i in imbalances:
                cells = [f"{_delta(e['cells'][(c, i)])} ({_wins(e['cells'][(c, i)])})" if (c, i) in e["cells"] else "–"
                         for c in conflicts]
                lines.append(f"| {i:g}:1 | " + " | ".join(cells) + " |")
            for dataset, d in e["real"].items():
                lines.append(f"| {_outside_label(dataset)} | {_delta(d)} ({_wins(d)}) |" + " |" * (len(conflicts) - 1))
            lines.append("")
    return lines


def _outside_label(dataset: str) -> str:
    """A dataset shown beside the dials: WDC is the real-data row; the demo markets are off the dials."""
    return f"{dataset} (real data)" if dataset == "wdc" else f"{dataset} (not on the dials)"


def render_heatmap(results: dict, path: Path, baseline: str = "lora") -> Path | None:
    """MTL-LoRA minus ``baseline`` over the synthetic dials, one panel per budget; real datasets as a strip
    below. Cells: mean paired difference (colour), ± std over seeds and the seeds MTL-LoRA won (text)."""
    deltas = grid_deltas(results, baseline)
    if not deltas:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budgets = list(deltas)
    n_real = max(len(e["real"]) for e in deltas.values())
    fig = plt.figure(figsize=(1.5 + 4.4 * len(budgets), 3.8 + 1.1 * bool(n_real)), layout="constrained")
    gs = fig.add_gridspec(2 if n_real else 1, len(budgets), height_ratios=[4, 1] if n_real else [1])
    every = [v for e in deltas.values() for d in [*e["cells"].values(), *e["real"].values()] for v in d.values()]
    vlim = max(0.01, max((abs(v) for v in every), default=0.01))
    image = None
    for col, budget in enumerate(budgets):
        e = deltas[budget]
        conflicts = sorted({c for c, _ in e["cells"]})
        imbalances = sorted({i for _, i in e["cells"]})
        grid = np.full((len(imbalances), len(conflicts)), np.nan)
        ax = fig.add_subplot(gs[0, col])
        for (c, i), d in e["cells"].items():
            if not d:
                continue
            m, sd = mean_std(list(d.values()))
            r, k = imbalances.index(i), conflicts.index(c)
            grid[r, k] = m
            ax.text(k, r, f"{m:+.3f}\n± {sd:.3f}\n{_wins(d)}", ha="center", va="center", fontsize=8)
        image = ax.imshow(grid, cmap="RdBu", vmin=-vlim, vmax=vlim, aspect="auto", origin="lower")
        ax.set_xticks(range(len(conflicts)), [f"{c:g}" for c in conflicts])
        ax.set_yticks(range(len(imbalances)), [f"{i:g}:1" for i in imbalances])
        ax.set_xlabel("conflict (0: one rule, 1: opposite rules)", fontsize=8)
        if col == 0:
            ax.set_ylabel("imbalance (largest : smallest)", fontsize=8)
        ax.set_title(f"{_budget_label(budget)}: MTL-LoRA − {label(baseline)}", fontsize=9)
        if n_real:
            strip = fig.add_subplot(gs[1, col])
            names = list(e["real"])
            row = np.full((1, max(1, len(names))), np.nan)
            for k, name in enumerate(names):
                d = e["real"][name]
                if d:
                    m, sd = mean_std(list(d.values()))
                    row[0, k] = m
                    strip.text(k, 0, f"{m:+.3f} ± {sd:.3f}  {_wins(d)}", ha="center", va="center", fontsize=8)
            strip.imshow(row, cmap="RdBu", vmin=-vlim, vmax=vlim, aspect="auto")
            strip.set_xticks(range(len(names)), [_outside_label(n) for n in names], fontsize=8)
            strip.set_yticks([])
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="macro test AUC difference (paired by seed)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _legacy_view(results: dict) -> dict:
    """The chosen trials of the non-grid datasets as protocol-1 runs (dataset "name · budget"), for the plot."""
    runs = []
    for (dataset, budget, method), trials in chosen(results).items():
        if dataset in results.get("grid", {}):
            continue
        for seed, t in trials.items():
            runs.append({**t, "dataset": f"{dataset} · {_budget_label(budget)}", "method": method, "seed": seed})
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
