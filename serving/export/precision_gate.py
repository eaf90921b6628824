"""The accuracy gate of lower precisions: per scenario, each candidate's scores against fp32's on validation rows.

    gate_precisions(stage, "data/valid.parquet", manifest, cfg)     # fills manifest["onnx"]["gate"] and ["serve"]

For every scenario the gate scores its validation rows (at most serving.precision_gate.max_rows, the first
ones) through the same scorer as ``serving.score`` (serving.scoring.scorer), once in fp32 (ONNX Runtime)
and once per candidate (serving.onnx.candidates: the int8 graphs of serving.export.onnx_graphs, torch
bf16 where this machine has fast bf16 kernels), and records per candidate:

    max_abs_dp   max over the scenario's rows of |p_candidate - p_fp32|, p = sigmoid(logit)
    auc_change   AUC(labels, p_candidate) - AUC(labels, p_fp32)

A candidate passes a scenario when max_abs_dp <= serving.precision_gate.max_abs_dp and |auc_change| <=
max_auc_change; a scenario whose rows hold one class only has no AUC, so nothing passes it. The gate also
times each precision over all the gate's rows (rows/s on this machine, serving.threads threads): per
scenario and engine, ``serve`` names the fastest precision that passed (fp32 when none did, or when fp32
itself was faster). What ``serving.precision=auto`` scores with is that choice (serving.scoring.runtime).
Graphs of failed candidates are deleted unless serving.onnx.keep_failed.

A warm-started model (manifest ``started_from``, training.warm_start) often has no validation rows for the
scenarios it already knew (a new market added with train.adapt=task_only). Such a scenario whose fp32 graph is
byte-identical to the starting export's is served in the precision that export chose for it, when that
precision is rebuilt from the fp32 graph alone (int8_dynamic, int8_partial, bf16: not int8_static, which is
calibrated on rows) and the starting export's gate was at least as strict as this one: its production scores
do not move. Its verdict says ``inherited`` and from which model version.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.tokenize import build_features
from kernel.atomic import write_json_atomic
from kernel.config import Config
from modeling.hardware import fast_bf16
from serving.export.onnx_graphs import INT8_VARIANTS, write_int8
from serving.layout import MANIFEST_FILE
from serving.scoring.scorer import BatchScorer

ENGINE_OF = {"bf16": "torch", **dict.fromkeys(INT8_VARIANTS, "onnxruntime")}


def gate_rows(table: pa.Table, scenarios: list[str], max_rows: int) -> pa.Table:
    """The validation rows the gate scores: per known scenario its first ``max_rows`` rows with a 0/1 label."""
    parts = []
    for name in scenarios:
        rows = table.filter(pc.and_(pc.equal(table["scenario"], name), pc.is_valid(table["label"])))
        parts.append(rows.slice(0, max_rows))
    return pa.concat_tables(parts)


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, None when the rows hold one class only."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def judge(labels: np.ndarray, p_ref: np.ndarray, p_cand: np.ndarray, max_abs_dp: float, max_auc_change: float) -> dict:
    """One scenario, one candidate: its errors against fp32 and whether it passes the thresholds."""
    dp = float(np.abs(p_cand - p_ref).max()) if len(p_ref) else None
    a_ref, a_cand = auc(labels, p_ref), auc(labels, p_cand)
    change = None if a_ref is None else a_cand - a_ref
    passed = dp is not None and change is not None and dp <= max_abs_dp and abs(change) <= max_auc_change
    why = ("no validation rows" if dp is None else "one class only: no AUC" if change is None
           else None if passed else f"max |dp| {dp:.4g} (limit {max_abs_dp:g}), AUC change {change:+.4g} "
                                    f"(limit {max_auc_change:g})")
    return {"max_abs_dp": dp, "auc": a_cand, "auc_change": change, "passed": passed, "why": why}


def calibration_feeds(scorer: BatchScorer, table: pa.Table, rows: int, graph_inputs: set[str]) -> list[dict]:
    """Input feeds (numpy int64) of the first ``rows`` validation rows, in batches of serving.batch_size, for
    static int8 calibration; tokenized as scoring tokenizes."""
    part = table.slice(0, rows)
    feats = build_features(part, scorer.tokenizer, scorer.model.task_map, scorer.max_length, cache_dir=None,
                           pair_format=scorer.pair_format)
    feeds = []
    for start in range(0, len(feats), scorer.serving.batch_size):
        batch = feats.collate(np.arange(start, min(start + scorer.serving.batch_size, len(feats))),
                              scorer.tokenizer.pad_token_id)
        feeds.append({k: batch[k].numpy().astype(np.int64) for k in graph_inputs if k in batch})
    return feeds


def _scores(stage: Path, cfg: Config, table: pa.Table, engine: str, precision: str) -> tuple[np.ndarray, float]:
    """(probabilities in row order, seconds of the timed pass) of ``table`` scored with this engine/precision."""
    serving = dataclasses.replace(cfg.serving, engine=engine, precision=precision, calibrate=False,
                                  unknown_scenario="quarantine")
    scorer = BatchScorer(stage, serving, "precision-gate")
    names = np.asarray(table["scenario"].to_pylist(), dtype=object)
    warm = np.concatenate([np.flatnonzero(names == s)[:2] for s in scorer.scenarios])
    scorer.logits(table.take(warm), names[warm])  # sessions and kernels set up outside the timed pass
    t0 = time.perf_counter()
    logits = scorer.logits(table, names)
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), time.perf_counter() - t0


def gate_precisions(stage: Path, valid: pa.Table, manifest: dict, cfg: Config, fitted_on: str) -> None:
    """Write the int8 candidates, judge every candidate per scenario, record the gate and the choice."""
    onnx, gate_cfg, ocfg = manifest["onnx"], cfg.serving.precision_gate, cfg.serving.onnx
    scenarios = list(manifest["scenarios"])
    table = gate_rows(valid, scenarios, gate_cfg.max_rows)
    int8 = [c for c in ocfg.candidates if c in INT8_VARIANTS]
    if int8:
        import onnx as onnx_lib

        first = stage / next(iter(onnx["graphs"].values()))["fp32"]
        inputs = {i.name for i in onnx_lib.load(str(first), load_external_data=False).graph.input}
        ref = BatchScorer(stage, dataclasses.replace(cfg.serving, engine="torch", precision="fp32",
                                                     calibrate=False), "precision-gate")
        feeds = calibration_feeds(ref, table.take(np.random.default_rng(0).permutation(table.num_rows)),
                                  ocfg.calibration_rows, inputs)
        onnx["quantization"] = write_int8(stage, onnx["graphs"], int8, feeds)
        write_json_atomic(stage / MANIFEST_FILE, manifest)  # the scorer reads the graphs' paths from it
    labels = table["label"].to_numpy(zero_copy_only=False).astype(np.int64)
    names = np.asarray(table["scenario"].to_pylist(), dtype=object)
    p_ref, sec = _scores(stage, cfg, table, "onnxruntime", "fp32")
    # torch fp32 too: serving.engine=auto serves on CPU whichever engine is faster here (runtime.measured_faster)
    speed = {"onnxruntime": {"fp32": table.num_rows / sec},
             "torch": {"fp32": table.num_rows / _scores(stage, cfg, table, "torch", "fp32")[1]}}
    results = {s: {"rows": int((names == s).sum()), "positives": int(labels[names == s].sum()),
                   "auc_fp32": auc(labels[names == s], p_ref[names == s]), "candidates": {}} for s in scenarios}
    for cand in ocfg.candidates:
        engine = ENGINE_OF[cand]
        if cand == "bf16" and not fast_bf16():
            for s in scenarios:
                results[s]["candidates"][cand] = {"max_abs_dp": None, "auc": None, "auc_change": None, "passed": False,
                                                  "why": NO_FAST_BF16}
            continue
        if engine == "onnxruntime" and any(cand not in g for g in onnx["graphs"].values()):
            continue  # int8_static without calibration rows
        p, sec = _scores(stage, cfg, table, engine, cand)
        speed[engine][cand] = table.num_rows / sec
        for s in scenarios:
            m = names == s
            results[s]["candidates"][cand] = judge(labels[m], p_ref[m], p[m], gate_cfg.max_abs_dp,
                                                   gate_cfg.max_auc_change)
    onnx["gate"] = {"max_abs_dp": gate_cfg.max_abs_dp, "max_auc_change": gate_cfg.max_auc_change,
                    "fitted_on": fitted_on, "threads": cfg.serving.threads or _torch_threads(),
                    "rows_per_s": {e: {k: round(v, 1) for k, v in d.items()} for e, d in speed.items()},
                    "scenarios": results}
    onnx["serve"] = {s: {e: fastest_passed(results[s]["candidates"], d) for e, d in speed.items()}
                     for s in scenarios}
    inherit_unchanged(onnx, results, manifest.get("started_from"), gate_cfg)
    if not ocfg.keep_failed:
        for s, files in onnx["graphs"].items():
            for cand in [c for c in files if c != "fp32" and not results[s]["candidates"].get(c, {}).get("passed")]:
                (stage / files.pop(cand)).unlink(missing_ok=True)


REBUILT_FROM_FP32 = ("fp32", "int8_dynamic", "int8_partial", "bf16")  # the same fp32 graph gives the same scores


def inherit_unchanged(onnx: dict, results: dict, start: dict | None, gate_cfg) -> None:
    """Serve each scenario the gate had no rows for, and whose fp32 graph the starting export also had, as the
    starting export did (see the module docstring); its verdicts and ``serve`` entry are rewritten."""
    served = (start or {}).get("served")
    if not served:
        return
    as_strict = (served["gate"]["max_abs_dp"] <= gate_cfg.max_abs_dp
                 and served["gate"]["max_auc_change"] <= gate_cfg.max_auc_change)
    for s, res in results.items():
        before = served["scenarios"].get(s)
        if res["rows"] or before is None or before["fp32_digest"] != onnx["fp32_digest"].get(s) or not as_strict:
            continue
        for engine, precision in before["serve"].items():
            if precision not in REBUILT_FROM_FP32 or (precision != "fp32" and precision not in res["candidates"]):
                continue  # int8_static, or a candidate this export does not build: fp32 as for any unjudged one
            if precision != "fp32":
                res["candidates"][precision] = {
                    "max_abs_dp": None, "auc": None, "auc_change": None, "passed": True,
                    "inherited": served["model_version"],
                    "why": f"inherited from {served['model_version']}: the same fp32 graph, no validation rows here"}
            onnx["serve"][s][engine] = precision


NO_FAST_BF16 = ("not measured: no fast bf16 kernels on the exporting machine (oneDNN needs AVX-512 or AMX; "
                "elsewhere torch's bf16 matmul is 10-50x slower than fp32)")


def fastest_passed(candidates: dict[str, dict], speed: dict[str, float]) -> str:
    """Of fp32 and the candidates that passed (measured on this engine), the one with the most rows/s."""
    ok = ["fp32"] + [c for c, r in candidates.items() if r["passed"] and c in speed]
    return max(ok, key=lambda c: speed.get(c, 0.0))


def served_summary(manifest: dict) -> list[str]:
    """One line per scenario: what it is served in by default, and why lower precisions were refused."""
    onnx = manifest.get("onnx") or {}
    gate, serve = onnx.get("gate") or {}, onnx.get("serve") or {}
    lines = []
    for s, res in (gate.get("scenarios") or {}).items():
        refused = "; ".join(f"{c}: {r['why']}" for c, r in res["candidates"].items() if not r["passed"])
        inherited = "; ".join(f"{c} {r['why']}" for c, r in res["candidates"].items() if r.get("inherited"))
        lines.append(f"{s}: onnxruntime {serve[s].get('onnxruntime')}, torch {serve[s].get('torch', 'fp32')}"
                     + (f" ({inherited})" if inherited else "") + (f" (refused {refused})" if refused else ""))
    return lines


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
