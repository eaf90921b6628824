"""The job's summary: built once as a dict, printed as text and written as JSON beside the run.

    summary = build_summary(ctx, exit_code)      # what the steps recorded (job.state), as plain JSON values
    print(format_summary(summary))               # the text every run ends with
    write_summary(ctx.paths.root, summary)       # <run root>/summary.json, whole or not at all

The printed text is a rendering of the JSON and nothing else, so a scheduler that reads summary.json sees
what the log shows. Every AUC names the data it was measured on (``quality.data``):

    test_split  the ingest's held-out test split (data.score_input empty: the job scores it)
    traffic     the scored traffic of data.score_input
    validation  the ingest's validation split (model selection)

Promotion's figures (in the registry's version description) are on ``promotion.eval_data``, the test split.
"""
from __future__ import annotations

from kernel import storage
from kernel.provenance import provenance

SUMMARY_FILE = "summary.json"
PER_SCENARIO = ("auc", "auc_ci_low", "auc_ci_high", "n")
OUTPUTS = ("data", "train", "export", "scores", "monitor")
MACRO_KEYS = ("auc_macro", "auc_macro_partial", "auc_macro_scenarios", "scenarios_total", "scenarios_without_auc")


def _macro(summary: dict | None) -> dict | None:
    if not summary or summary.get("auc_macro") is None and not summary.get("scenarios_total"):
        return None
    return {k: summary.get(k) for k in MACRO_KEYS}


def build_summary(ctx, exit_code: int, steps: list[str], champion: str | None = None) -> dict:
    """The run's outcome from the steps' records (``ctx``: job.steps.JobContext). ``steps``: this
    invocation's steps (a skipped step's old record says nothing about this run); ``champion``: the registry's
    champion version as the registry has it now (None: no champion, or tracking is off)."""
    cfg, p = ctx.cfg, ctx.paths
    train, mon, promo = ctx.info("train"), ctx.info("monitor"), ctx.info("promote")
    mon_summary = mon.get("summary") or {}
    per = mon_summary.get("metrics") or {}
    quality = None
    if per:
        quality = {"data": p.score_data, "path": str(p.score_input),
                   "scenarios": [{"scenario": s, **{k: m.get(k) for k in PER_SCENARIO}} for s, m in per.items()],
                   "macro": _macro(mon_summary.get("overall"))}
    promotion = None
    if "promote" in steps and "passed" in promo:  # this run's gate (run now, or up to date): its verdict
        promotion = {k: promo.get(k) for k in ("passed", "candidate_version", "champion_version", "reasons",
                                               "eval_data", "eval_path")}
    return {
        "run_key": p.run_key, "exit_code": exit_code, **provenance(),
        "validation": ({**_macro(train["val"]), "run_id": train.get("run_id")} if train.get("val") else None),
        "quality": quality,
        "promotion": promotion, "registered_model": cfg.tracking.registered_model,
        "champion": champion if cfg.tracking.enabled else None, "tracking": cfg.tracking.enabled,
        "paths": {name: str(getattr(p, name)) for name in OUTPUTS},
        "mlflow": cfg.tracking_uri,
    }


def _describe_macro(m: dict) -> str:
    """"0.8312", or "0.8312 (over 3 of 4 scenarios; no AUC for jp)" (evaluation.metrics.describe_macro's words)."""
    text = "n/a" if m.get("auc_macro") is None else f"{m['auc_macro']:.4f}"
    if m.get("auc_macro_partial"):
        text += (f" (over {m['auc_macro_scenarios']} of {m['scenarios_total']} scenarios; no AUC for "
                 f"{', '.join(m['scenarios_without_auc'])})")
    return text


def format_summary(s: dict) -> str:
    """The printed summary: validation macro AUC, per-scenario AUC on the scored data, the registry's
    decision, where the outputs are."""
    lines = ["", "=== summary ===" + (f" (run {s['run_key']})" if s["run_key"] else "")]
    if s["validation"]:
        v = s["validation"]
        lines.append(f"validation macro AUC {_describe_macro(v)} (MLflow run {v['run_id']})")
    q = s["quality"]
    if q:
        lines.append(f"{'scenario':<14}{q['data'] + ' AUC':>16}{'  95% CI':>18}{'rows':>8}")
        for m in q["scenarios"]:
            name, auc = m["scenario"], m.get("auc")
            ci = f"[{m.get('auc_ci_low') or 0:.3f}, {m.get('auc_ci_high') or 0:.3f}]" if auc is not None else ""
            lines.append(f"{name:<14}{(f'{auc:.4f}' if auc is not None else 'n/a'):>16}{ci:>18}{m.get('n') or 0:>8}")
        macro = q["macro"] or {}
        if macro.get("auc_macro") is not None:
            missing = macro.get("scenarios_without_auc") or []
            note = (f"  (over {macro['auc_macro_scenarios']} of {macro['scenarios_total']} scenarios; no AUC "
                    f"for {', '.join(missing)})" if missing else "")
            lines.append(f"{'macro':<14}{macro['auc_macro']:>16.4f}{note}")
        lines.append(f"({q['data']}: {q['path']})")
    promo, name = s["promotion"], s["registered_model"]
    if promo:
        verdict = (f"version {promo['candidate_version']} promoted" if promo["passed"]
                   else f"gate failed, version {promo['candidate_version']} not promoted: "
                        f"{'; '.join(promo['reasons'] or [])}")
        on = f" (gate on {promo['eval_data']})" if promo.get("eval_data") else ""
        lines.append(f"promotion {verdict}{on}")
    if s["tracking"]:  # the champion as the registry has it now, whatever ran (or was skipped)
        lines.append(f"registry champion: models:/{name}@champion is version {s['champion']}" if s["champion"]
                     else f"registry: models:/{name} has no champion")
    for name in OUTPUTS:
        lines.append(f"{name:<8} {s['paths'][name]}")
    lines.append(f"mlflow   {s['mlflow']}  (mlflow ui --backend-store-uri {s['mlflow']})")
    lines.append(f"version  {s['version']} (git {s['git_commit']})")
    return "\n".join(lines)


def write_summary(root, summary: dict) -> str:
    """``<root>/summary.json`` (a local folder or an object-store URI), written whole or not at all."""
    path = storage.join(root, SUMMARY_FILE)
    storage.write_json(path, summary)
    return str(path)
