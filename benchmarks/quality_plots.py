"""The quality benchmark's plots, as PNG files, from its results.json (``benchmarks.quality_report`` writes them).

    render_plot     per dataset: macro test AUC per method (mean ± std, seeds as dots) and per-scenario AUC
    render_heatmap  MTL-LoRA minus a baseline over the synthetic conflict × imbalance cells, one panel per
                    budget, the other datasets as a strip below
"""
from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.protocol import mean_std
from benchmarks.quality_tables import budget_label, grid_deltas, label, outside_label, summarize, wins_text
from kernel.atomic import atomic_path


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
            ax.text(k, r, f"{m:+.3f}\n± {sd:.3f}\n{wins_text(d)}", ha="center", va="center", fontsize=8)
        image = ax.imshow(grid, cmap="RdBu", vmin=-vlim, vmax=vlim, aspect="auto", origin="lower")
        ax.set_xticks(range(len(conflicts)), [f"{c:g}" for c in conflicts])
        ax.set_yticks(range(len(imbalances)), [f"{i:g}:1" for i in imbalances])
        ax.set_xlabel("conflict (0: one rule, 1: opposite rules)", fontsize=8)
        if col == 0:
            ax.set_ylabel("imbalance (largest : smallest)", fontsize=8)
        ax.set_title(f"{budget_label(budget)}: MTL-LoRA − {label(baseline)}", fontsize=9)
        if n_real:
            strip = fig.add_subplot(gs[1, col])
            names = list(e["real"])
            row = np.full((1, max(1, len(names))), np.nan)
            for k, name in enumerate(names):
                d = e["real"][name]
                if d:
                    m, sd = mean_std(list(d.values()))
                    row[0, k] = m
                    strip.text(k, 0, f"{m:+.3f} ± {sd:.3f}  {wins_text(d)}", ha="center", va="center", fontsize=8)
            strip.imshow(row, cmap="RdBu", vmin=-vlim, vmax=vlim, aspect="auto")
            strip.set_xticks(range(len(names)), [outside_label(n) for n in names], fontsize=8)
            strip.set_yticks([])
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="macro test AUC difference (paired by seed)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
