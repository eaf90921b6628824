"""Tables and plot of the new-market benchmark (``benchmarks.new_market``), from its results.json.

    paths = write_report(results, out, docs)   # out/new_market_tables.md, out/new_market.png (+ into docs)

Every difference is paired by seed: an arm against the reference of its own method trained with the same seed
on the same k rows; a warm run's known markets against the model it started from; a nightly warm start
against the from-scratch run of the same seed. "±" is the standard deviation over seeds; "better in" counts
the seeds where the difference is positive, and "within 0.01" those where the new market's AUC is at most 0.01
below retraining's (the goal of adding a market). Cost: optimizer steps, and the median over seeds of the ratio of
wall seconds of training (set-up, validation and saving included) to the reference's.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

ARM_NAMES = {"mtl_task_only": "MTL-LoRA, task_only", "mtl_task_only_lr": "MTL-LoRA, task_only at train.lr",
             "mtl_all": "MTL-LoRA, all", "lora_all": "LoRA, fine-tuned", "ref/mtl_lora": "MTL-LoRA from scratch",
             "ref/lora": "LoRA from scratch"}
ARM_METHOD = {"mtl_task_only": "mtl_lora", "mtl_task_only_lr": "mtl_lora", "mtl_all": "mtl_lora", "lora_all": "lora"}
SECTION = "new-market"
GOAL = 0.01  # a new market's AUC within this of retraining's counts as reaching it


def _ms(values: list[float], digits: int = 4) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _signed(values: list[float]) -> str:
    if not values:
        return "–"
    sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):+.4f}{sd} ({sum(v > 0 for v in values)} of {len(values)})"


def _grid(trials: dict) -> tuple[list[str], list[int], list[int]]:
    keys = [re.match(r"add/([^/]+)/k(\d+)/s(\d+)/", k) for k in trials]
    found = [m.groups() for m in keys if m]
    holdouts = list(dict.fromkeys(h for h, _, _ in found))
    return holdouts, sorted({int(k) for _, k, _ in found}), sorted({int(s) for _, _, s in found})


def _arms(trials: dict, h: str, k: int) -> list[str]:
    """The arms run for ``h`` at ``k``: each in ARM_NAMES' order, followed by its runs at other step counts
    (``<arm>@<steps>``, fewest steps first), then the references."""
    found = {key.split("/")[-1] for key in trials if key.startswith(f"add/{h}/k{k}/")}
    arms = []
    for arm in (a for a in ARM_NAMES if not a.startswith("ref/")):
        arms += [arm, *sorted((f for f in found if f.startswith(f"{arm}@")), key=lambda f: int(f.split("@")[1]))]
    return arms + ["ref/mtl_lora", "ref/lora"]


def arm_name(arm: str) -> str:
    base, _, steps = arm.partition("@")
    return ARM_NAMES[base] + (f", {steps} steps" if steps else "")


def new_market_rows(trials: dict, h: str, k: int, seeds: list[int]) -> list[dict]:
    """One row per arm (and reference) of holdout ``h`` at ``k`` new rows: what the tables print."""
    rows = []
    for arm in _arms(trials, h, k):
        ref_method = arm[4:] if arm.startswith("ref/") else ARM_METHOD[arm.partition("@")[0]]
        runs, vs_ref, known_moves, cost = [], [], [], []
        for s in seeds:
            t = trials.get(f"ref/{h}/k{k}/s{s}/{ref_method}" if arm.startswith("ref/") else f"add/{h}/k{k}/s{s}/{arm}")
            if t is None:
                continue
            runs.append(t)
            ref = trials.get(f"ref/{h}/k{k}/s{s}/{ref_method}")
            if ref is not None:
                vs_ref.append(t["test_auc"][h] - ref["test_auc"][h])
                cost.append(t["train_s"] / ref["train_s"])
            start = trials.get(f"base/{h}/{ref_method}/s{s}")
            if start is not None:
                known_moves.append([t["test_auc"][m] - a for m, a in start["test_auc"].items()])
        if runs:
            flat = [d for moves in known_moves for d in moves]
            rows.append({"arm": arm, "name": arm_name(arm), "seeds": len(runs),
                         "new": [t["test_auc"][h] for t in runs], "vs_ref": vs_ref,
                         "within": sum(d >= -GOAL - 1e-9 for d in vs_ref),  # 0.79 - 0.80 is -0.010000000000000009
                         "known_max": max((abs(d) for d in flat), default=None),
                         "known_mean": statistics.mean(flat) if flat else None,
                         "steps": runs[0]["steps"], "train_s": statistics.median(t["train_s"] for t in runs),
                         "cost": statistics.median(cost) if cost else None})
    return rows


def nightly_rows(trials: dict) -> list[dict]:
    seeds = sorted({int(m.group(1)) for k in trials if (m := re.match(r"night/s(\d+)/scratch$", k))})
    names = ["scratch"] + sorted({k.split("/")[-1] for k in trials if re.match(r"night/s\d+/warm", k)},
                                 key=lambda n: float(n[4:]))
    rows = []
    for name in names:
        runs, diff, cost = [], [], []
        for s in seeds:
            t, ref = trials.get(f"night/s{s}/{name}"), trials.get(f"night/s{s}/scratch")
            if t is None or ref is None:
                continue
            runs.append(t)
            diff.append(t["test_auc_macro"] - ref["test_auc_macro"])
            cost.append(t["train_s"] / ref["train_s"])
        if runs:
            rows.append({"name": "from scratch on today's data" if name == "scratch" else
                         f"yesterday's model, {float(name[4:]):.0%} of the schedule", "key": name,
                         "steps": runs[0]["steps"], "macro": [t["test_auc_macro"] for t in runs],
                         "vs_scratch": diff, "train_s": statistics.median(t["train_s"] for t in runs),
                         "cost": statistics.median(cost)})
    return rows


def tables(results: dict) -> str:
    trials = results["trials"]
    holdouts, ks, seeds = _grid(trials)
    lines = []
    for h in holdouts:
        for k in ks:
            rows = new_market_rows(trials, h, k, seeds)
            if not rows:
                continue
            lines += [f"#### {h} added with k = {k} labelled rows", "",
                      f"| run | seeds | {h} test AUC | vs same method from scratch | within {GOAL} of it | "
                      "known markets' AUC change, largest \\|Δ\\| (mean Δ) | steps | train s | cost vs scratch |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                known = "–" if r["known_max"] is None else f"{r['known_max']:.4f} ({r['known_mean']:+.4f})"
                cost = "–" if r["cost"] is None else f"{r['cost']:.2f}"
                ref = r["arm"].startswith("ref/")
                within = "–" if ref or not r["vs_ref"] else f"{r['within']} of {len(r['vs_ref'])}"
                lines.append(f"| {r['name']} | {r['seeds']} | {_ms(r['new'])} | "
                             f"{'–' if ref else _signed(r['vs_ref'])} | {within} | {known} | "
                             f"{r['steps']} | {r['train_s']:.0f} | {cost} |")
            lines.append("")
    night = nightly_rows(trials)
    if night:
        lines += ["#### Nightly: yesterday's model continued on today's data", "",
                  "| run | steps | macro test AUC | vs from scratch (paired) | train s | cost vs scratch |",
                  "|---|---|---|---|---|---|"]
        for r in night:
            lines.append(f"| {r['name']} | {r['steps']} | {_ms(r['macro'])} | "
                         f"{'–' if r['key'] == 'scratch' else _signed(r['vs_scratch'])} | {r['train_s']:.0f} | "
                         f"{r['cost']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = results["trials"]
    holdouts, ks, seeds = _grid(trials)
    fig, axes = plt.subplots(1, len(holdouts) + 1, figsize=(5 * (len(holdouts) + 1), 4))
    colors: dict[str, str] = {}  # one colour per run across the panels: panels hold different sets of runs
    for ax, h in zip(axes, holdouts):
        by_arm: dict[str, list] = {}
        for k in ks:
            for r in new_market_rows(trials, h, k, seeds):
                by_arm.setdefault(r["arm"], []).append((k, statistics.mean(r["new"])))
        for arm, pts in by_arm.items():
            color = colors.setdefault(arm, f"C{len(colors) % 10}")
            style = "--" if arm.startswith("ref/") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=color, label=arm_name(arm))
        ax.set_xscale("log")
        ax.set_xlabel("labelled rows of the new market (k)")
        ax.set_ylabel(f"{h} test AUC (mean over seeds)")
        ax.set_title(f"adding {h}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    night = nightly_rows(trials)
    ax = axes[-1]
    if night:
        warm = [r for r in night if r["key"] != "scratch"]
        ax.plot([r["steps"] for r in warm], [statistics.mean(r["macro"]) for r in warm], marker="o",
                label="continued from yesterday")
        scratch = next((r for r in night if r["key"] == "scratch"), None)
        if scratch:
            ax.axhline(statistics.mean(scratch["macro"]), ls="--", color="grey",
                       label=f"from scratch ({scratch['steps']} steps)")
        ax.set_xlabel("optimizer steps today")
        ax.set_ylabel("macro test AUC (mean over seeds)")
        ax.set_title("nightly warm start")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path, docs: Path | None) -> list[Path]:
    """out/new_market_tables.md and out/new_market.png; with ``docs``, the same png there and the tables
    between the ``<!-- new-market:begin/end -->`` markers of docs/new_market.md (created when missing)."""
    text = tables(results)
    written = [out / "new_market_tables.md"]
    written[0].write_text(text)
    written.append(plot(results, out / "new_market.png"))
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        written.append(plot(results, docs / "new_market.png"))
        page = docs / "new_market.md"
        body = page.read_text() if page.is_file() else "# A new market, and the nightly warm start\n\n"
        begin, end = f"<!-- {SECTION}:begin -->", f"<!-- {SECTION}:end -->"
        block = f"{begin}\n{text}\n{end}"
        body = (re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, body, flags=re.S)
                if begin in body else body + "\n" + block + "\n")
        page.write_text(body)
        written.append(page)
    return written
