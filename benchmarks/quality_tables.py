"""The quality benchmark's tables, as markdown, from its results.json (``benchmarks.quality_report`` writes them).

results.json of the current protocol (``"protocol": 2``): per dataset and budget, each method's chosen lr
and the validation macro AUC of every lr, per-scenario test AUCs (mean ± sample std over seeds), MTL-LoRA
minus each baseline paired by seed, per scenario next to its training rows, the variants as paired deltas,
the diagnostics at init and at the end, and the synthetic grid cells as a conflict × imbalance table.
``summarize`` reads the earlier layout (one lr, one run per method and seed).
"""
from __future__ import annotations

import math
import statistics

from benchmarks.protocol import chosen, lr_table, mean_std, paired_macro, paired_scenario

LABELS = {"mtl_lora": "MTL-LoRA", "lora": "LoRA (same r)", "lora_matched": "LoRA (matched params)",
          "per_task_lora": "per-scenario LoRA"}


def label(method: str) -> str:
    """Table label: LABELS, "MTL-LoRA [tau1]" for a variant, else the adapter.method itself."""
    if method in LABELS:
        return LABELS[method]
    return f"MTL-LoRA [{method.split('+', 1)[1]}]" if method.startswith("mtl_lora+") else method


def fmt_values(values: list[float]) -> str:
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
        ordered = ({m: methods[m] for m in LABELS if m in methods}
                   | {m: e for m, e in methods.items() if m not in LABELS})
        methods.clear()
        methods.update(ordered)
    return out


def paired_differences(entry_a: dict, entry_b: dict) -> list[float]:
    """Macro AUC of a minus b for the seeds both ran."""
    b_by_seed = dict(zip(entry_b["seeds"], entry_b["macro"]))
    return [m - b_by_seed[s] for s, m in zip(entry_a["seeds"], entry_a["macro"]) if s in b_by_seed]


def _order(values) -> list:
    return list(dict.fromkeys(values))


def _methods_order(methods) -> list[str]:
    methods = _order(methods)
    return [m for m in LABELS if m in methods] + [m for m in methods if m not in LABELS]


def delta_text(d: dict[int, float], per_seed: bool = False) -> str:
    if not d:
        return "–"
    m, sd = mean_std(list(d.values()))
    text = f"{m:+.4f} ± {sd:.4f}" if len(d) > 1 else f"{m:+.4f}"
    if per_seed:
        text += " (" + " / ".join(f"{v:+.4f}" for v in d.values()) + ")"
    return text


def wins_text(d: dict[int, float]) -> str:
    return f"{sum(v > 0 for v in d.values())} of {len(d)}" if d else "–"


def budget_label(name: str) -> str:
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
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

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
    """One (dataset, budget): the methods' table, MTL-LoRA minus each baseline, the variants, the diagnostics."""
    rows = results.get("train_rows", {}).get(dataset, {})
    cell = results.get("grid", {}).get(dataset)
    title = f"### {dataset} · {budget_label(budget)}"
    if cell:
        title += f" (conflict {cell['conflict']:g}, imbalance {cell['imbalance']:g}:1)"
    lines = [title, ""]
    if rows:
        lines += ["Training rows: " + ", ".join(f"{k} {v:,}" for k, v in rows.items()), ""]
    by = {m: picks[(dataset, budget, m)] for m in methods}  # method -> seed -> chosen trial
    scenarios = sorted({sc for trials in by.values() for t in trials.values() for sc in t["test_auc"]})
    lines += _methods_table(results, dataset, budget, by, scenarios)
    family = [m for m in methods if m == "mtl_lora" or m.startswith("mtl_lora+")]
    baselines = [m for m in methods if m not in family]
    if "mtl_lora" in by and baselines:
        lines += _baseline_deltas(by, baselines, scenarios, rows)
    variants = [m for m in family if m != "mtl_lora"]
    if variants and "mtl_lora" in by:
        lines += _variants_table(results, dataset, budget, by, variants)
    with_diag = [m for m in methods if any(_diag_at(t, "init") for t in by[m].values())]
    if with_diag:
        lines += _diagnostics_table(by, with_diag)
    lines.append("")
    return lines


def _methods_table(results: dict, dataset: str, budget: str, by: dict, scenarios: list[str]) -> list[str]:
    """Per method: r, adapter params, the chosen lr, validation at every lr, steps, test AUCs, seeds, time."""
    selected = {m: results["selected"][f"{dataset}|{budget}|{m}"] for m in by}
    lrs = sorted({lr for sel in selected.values() for lr in sel["lrs"]})
    head = ["method", "r", "adapter params", "lr", *[f"val @ {lr:g}" for lr in lrs], "steps (best)", *scenarios,
            "macro test AUC", "seeds", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, trials in by.items():
        any_t = next(iter(trials.values()))
        sel = selected[m]
        table = _lr_means(results, dataset, budget, m, sel["seeds"])
        val_cells = [("failed" if table[lr] == -math.inf else
                      "**" + f"{table[lr]:.4f}" + "**" if lr == sel["lr"] else f"{table[lr]:.4f}")
                     if table.get(lr) is not None else "–" for lr in lrs]
        steps = statistics.median(t["steps"] for t in trials.values())
        best = [t["best_step"] for t in trials.values() if t.get("best_step") is not None]
        per_sc = []
        for sc in scenarios:
            v = [t["test_auc"].get(sc) for t in trials.values()]
            per_sc.append(fmt_values([x for x in v if x is not None]) if any(x is not None for x in v) else "–")
        lines.append("| " + " | ".join([
            label(m), str(any_t["r"]), f"{any_t['adapter_params']:,}", f"{sel['lr']:g}", *val_cells,
            f"{steps:.0f} ({statistics.median(best):.0f})" if best else f"{steps:.0f}", *per_sc,
            f"**{fmt_values([t['test_auc_macro'] for t in trials.values()])}**", str(len(trials)),
            f"{statistics.median(t['train_s'] for t in trials.values()):.0f}"]) + " |")
    return lines


def _baseline_deltas(by: dict, baselines: list[str], scenarios: list[str], rows: dict) -> list[str]:
    """MTL-LoRA minus each baseline, macro and per scenario (next to its training rows), paired by seed."""
    lines = ["", "MTL-LoRA minus baseline, macro test AUC, paired by seed (per seed in brackets):", "",
             "| baseline | difference (mean ± std) | MTL-LoRA better in |", "|---|---|---|"]
    for b in baselines:
        d = paired_macro(by["mtl_lora"], by[b])
        lines.append(f"| {label(b)} | {delta_text(d, per_seed=True)} | {wins_text(d)} seeds |")
    lines += ["", "Per scenario, MTL-LoRA minus baseline (test AUC, paired by seed), next to its training rows:", "",
              "| scenario | train rows | " + " | ".join(f"vs {label(b)}" for b in baselines) + " |",
              "|---|---|" + "---|" * len(baselines)]
    for sc in scenarios:
        cells = []
        for b in baselines:
            d = paired_scenario(by["mtl_lora"], by[b], sc)
            cells.append(f"{delta_text(d)} ({wins_text(d)})" if d else "–")
        lines.append(f"| {sc} | {rows.get(sc, 0):,} | " + " | ".join(cells) + " |")
    return lines


def _variants_table(results: dict, dataset: str, budget: str, by: dict, variants: list[str]) -> list[str]:
    """Each MTL-LoRA variant's macro test AUC, paired against MTL-LoRA (and LoRA when it ran)."""
    ref = "lora" if "lora" in by else None
    lines = ["", "Variants of MTL-LoRA (within the paper's method), macro test AUC, paired by seed:", "",
             "| variant | overrides | lr | macro test AUC | vs MTL-LoRA | better in | "
             + (f"vs {label(ref)} | better in |" if ref else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if ref else "")]
    for v in variants:
        dv = paired_macro(by[v], by["mtl_lora"])
        row = [label(v), "`" + " ".join(results.get("variants", {}).get(v, [])) + "`",
               f"{results['selected'][f'{dataset}|{budget}|{v}']['lr']:g}",
               fmt_values([t["test_auc_macro"] for t in by[v].values()]), delta_text(dv, per_seed=True), wins_text(dv)]
        if ref:
            dl = paired_macro(by[v], by[ref])
            row += [delta_text(dl), wins_text(dl)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _diagnostics_table(by: dict, methods: list[str]) -> list[str]:
    """training.diagnostics at init and at the last logged step, means over each method's chosen trials."""
    lines = ["", ("Diagnostics (training.diagnostics; means over the chosen trials; init → last logged step). "
                  "Entropy of softmax(w_t/τ) as a share of log n; tasks per B_i: effective number of scenarios "
                  "using each B_i; Λ drift: ||Λ_t − I|| / ||I||; gradient norms before clipping:"), "",
             "| method | entropy / log n | top p | tasks per B_i | Λ drift | grad adapters | grad task | grad head |",
             "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        def pair(key, digits=2, t=by[m]):
            return _fmt_pair(_diag_mean(t, "init", key), _diag_mean(t, "final", key), digits)

        lines.append(f"| {label(m)} | {pair('diag/entropy_frac')} | {pair('diag/top_p_mean')} | "
                     f"{pair('diag/tasks_eff_mean')} | {pair('diag/lambda_drift_mean', 3)} | "
                     f"{pair('diag/grad_norm/adapters', 3)} | {pair('diag/grad_norm/task', 4)} | "
                     f"{pair('diag/grad_norm/head', 3)} |")
    return lines


def _lr_means(results: dict, dataset: str, budget: str, method: str, seeds: list[int]) -> dict[float, float | None]:
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
            lines += [f"### Synthetic dials · {budget_label(budget)}: MTL-LoRA minus {label(baseline)}", "",
                      ("Macro test AUC, paired by seed: mean ± std (MTL-LoRA better in). Columns: conflict of the "
                       "markets' rules (0 = one task, 1 = opposite rules); rows: largest / smallest scenario's "
                       "rows."), "",
                      "| imbalance \\ conflict | " + " | ".join(f"{c:g}" for c in conflicts) + " |",
                      "|---|" + "---|" * len(conflicts)]
            for i in imbalances:
                cells = [f"{delta_text(e['cells'][(c, i)])} ({wins_text(e['cells'][(c, i)])})"
                         if (c, i) in e["cells"] else "–" for c in conflicts]
                lines.append(f"| {i:g}:1 | " + " | ".join(cells) + " |")
            for dataset, d in e["real"].items():
                lines.append(f"| {outside_label(dataset)} | {delta_text(d)} ({wins_text(d)}) |"
                             + " |" * (len(conflicts) - 1))
            lines.append("")
    return lines


def outside_label(dataset: str) -> str:
    """A dataset shown beside the dials: WDC is the real-data row; the demo markets are off the dials."""
    return f"{dataset} (real data)" if dataset == "wdc" else f"{dataset} (not on the dials)"


