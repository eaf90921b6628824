"""Per-scenario evaluation on the validation split, sharded across data-parallel ranks.

Each rank scores a contiguous, equal-sized slice (the last one padded with repeats that are dropped
again), so every rank runs the same number of forwards — ZeRO-3 gathers parameters collectively — and
after the all-gather every example counts exactly once.

    metrics = evaluate(engine_or_model, valid_features, task_map, batch_size=64, pad_id=0)
    metrics["auc_macro"], metrics["scenarios"]["us"]["auc"]
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from features.task_map import TaskMap
from features.tokenize import FeatureSet


def rank_slice(n: int, rank: int, world: int) -> np.ndarray:
    """Indices of this rank's share, padded to ceil(n / world) with -1 (padding is scored, then dropped)."""
    per = math.ceil(n / world)
    idx = np.arange(rank * per, (rank + 1) * per)
    idx[idx >= n] = -1
    return idx


@torch.no_grad()
def predict(model, features: FeatureSet, indices: np.ndarray, batch_size: int, pad_id: int,
            device: torch.device) -> np.ndarray:
    """Logits for ``indices`` (-1 entries are scored as row 0 and come back as NaN)."""
    out = np.empty(len(indices), dtype=np.float32)
    safe = np.where(indices >= 0, indices, 0)
    for start in range(0, len(safe), batch_size):
        batch = features.collate(safe[start : start + batch_size], pad_id)
        logits = model(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["task_ids"].to(device),
            batch["token_type_ids"].to(device) if "token_type_ids" in batch else None,
        )
        out[start : start + len(logits)] = logits.float().cpu().numpy()
    out[indices < 0] = np.nan
    return out


def gather_predictions(local_idx: np.ndarray, local_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (index, logit) pairs, padding removed: each example exactly once."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (local_idx, local_logits))
        idx = np.concatenate([p[0] for p in parts])
        logits = np.concatenate([p[1] for p in parts])
    else:
        idx, logits = local_idx, local_logits
    keep = idx >= 0
    return idx[keep], logits[keep]


def classification_metrics(task_ids: np.ndarray, labels: np.ndarray, logits: np.ndarray,
                           task_map: TaskMap) -> dict:
    """ROC-AUC, PR-AUC and log loss per scenario; macro AUC and row-weighted AUC over scenarios."""
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    per: dict[str, dict] = {}
    for t, name in enumerate(task_map.names):
        m = task_ids == t
        y, p = labels[m], probs[m]
        entry: dict = {"n": int(m.sum()), "positives": int(y.sum())}
        if entry["n"] and 0 < entry["positives"] < entry["n"]:
            entry.update(
                auc=float(roc_auc_score(y, p)),
                pr_auc=float(average_precision_score(y, p)),
                log_loss=float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
            )
        else:
            entry.update(auc=None, pr_auc=None, log_loss=None, reason="needs both classes")
        per[name] = entry
    scored = [(e["auc"], e["n"]) for e in per.values() if e["auc"] is not None]
    return {
        "scenarios": per,
        "auc_macro": float(np.mean([a for a, _ in scored])) if scored else None,
        "auc_weighted": float(np.average([a for a, _ in scored], weights=[n for _, n in scored])) if scored else None,
        "n": int(len(labels)),
    }


def evaluate(model, features: FeatureSet, task_map: TaskMap, batch_size: int, pad_id: int,
             device: torch.device, rank: int = 0, world: int = 1, max_rows: int = 0) -> dict:
    n = len(features) if not max_rows else min(max_rows, len(features))
    was_training = model.training
    model.eval()
    local = rank_slice(n, rank, world)
    logits = predict(model, features, local, batch_size, pad_id, device)
    if was_training:
        model.train()
    idx, logits = gather_predictions(local, logits)
    return classification_metrics(features.task_ids[idx], features.labels[idx], logits, task_map)


def flat_metrics(metrics: dict, prefix: str = "val") -> dict[str, float]:
    """MLflow metric names: val/auc/<scenario>, val/pr_auc/<scenario>, val/log_loss/<scenario>, val/auc_macro."""
    out = {f"{prefix}/auc_macro": metrics["auc_macro"], f"{prefix}/auc_weighted": metrics["auc_weighted"]}
    for name, e in metrics["scenarios"].items():
        for key in ("auc", "pr_auc", "log_loss"):
            out[f"{prefix}/{key}/{name}"] = e[key]
    return {k: v for k, v in out.items() if v is not None}
