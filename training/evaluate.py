"""Per-scenario evaluation on the validation split, sharded across data-parallel ranks.

Each rank scores a contiguous, equal-sized slice (the last one padded with repeats that are dropped
again), so every rank runs the same number of forwards — ZeRO-3 gathers parameters collectively — and
after the all-gather every example counts exactly once.

    metrics = evaluate(engine_or_model, valid_features, task_map, batch_size=64, pad_id=0)
    metrics["auc_macro"], metrics["scenarios"]["us"]["auc"]

``max_rows_per_scenario`` caps each scenario at that many rows, drawn by ``capped_rows``: the same rows
every evaluation (a fixed seed), stratified by label so each scenario keeps its positive rate. The metrics
are ``evaluation.metrics``' (the ones monitoring and the promotion gate read) of the sigmoid of the logits:
``{"scenarios": scenario_metrics(...), **summarize(...)}``. The macro AUC averages the scenarios that have an
AUC; ``auc_macro_scenarios`` says how many of ``scenarios_total`` that is, and ``auc_macro_partial`` is True
when some scenario could not be scored (a single class, or no rows).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from evaluation.metrics import scenario_metrics, summarize
from features.tokenize import FeatureSet
from kernel.metric_names import VAL, metric_name
from kernel.task_map import TaskMap


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


def capped_rows(task_ids: np.ndarray, labels: np.ndarray, cap: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices keeping at most ``cap`` rows of each task, stratified by label.

    Per task with n > cap rows: round(cap · positive rate) positives (at least one of each class when the
    task has both and cap >= 2) and the rest negatives, each drawn by a permutation that depends only on
    ``seed`` and the task id, so every evaluation of a run scores the same rows.
    """
    if cap <= 0:
        return np.arange(len(task_ids))
    keep = []
    for t in np.unique(task_ids):
        rows = np.flatnonzero(task_ids == t)
        if len(rows) <= cap:
            keep.append(rows)
            continue
        rng = np.random.default_rng([seed, int(t)])
        pos, neg = rows[labels[rows] == 1], rows[labels[rows] != 1]
        n_pos = int(round(cap * len(pos) / len(rows)))
        if len(pos) and len(neg) and cap >= 2:
            n_pos = min(max(n_pos, 1), cap - 1)
        n_pos = min(n_pos, len(pos))
        n_neg = min(cap - n_pos, len(neg))
        keep += [rng.permutation(pos)[:n_pos], rng.permutation(neg)[:n_neg]]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """sigmoid(logits) in float64: what the model's scores are."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def classification_metrics(task_ids: np.ndarray, labels: np.ndarray, logits: np.ndarray,
                           task_map: TaskMap) -> dict:
    """Per scenario of ``task_map`` (in its order, those without rows included) ``evaluation.metrics``' AUC,
    PR-AUC, log loss and calibration of the probabilities (no bootstrap), and their summary."""
    scenarios = np.asarray(task_map.names, dtype=object)[np.asarray(task_ids, dtype=np.int64)]
    per = scenario_metrics(scenarios, labels, probabilities(logits), bootstrap_rounds=0, names=task_map.names)
    return {"scenarios": per, **summarize(per)}


def evaluate(model, features: FeatureSet, task_map: TaskMap, batch_size: int, pad_id: int,
             device: torch.device, rank: int = 0, world: int = 1, max_rows_per_scenario: int = 0) -> dict:
    rows = capped_rows(features.task_ids, features.labels, max_rows_per_scenario)
    was_training = model.training
    model.eval()
    local = rank_slice(len(rows), rank, world)
    local_rows = np.where(local >= 0, rows[np.maximum(local, 0)] if len(rows) else 0, -1)
    logits = predict(model, features, local_rows, batch_size, pad_id, device)
    if was_training:
        model.train()
    idx, logits = gather_predictions(local_rows, logits)
    metrics = classification_metrics(features.task_ids[idx], features.labels[idx], logits, task_map)
    metrics["max_rows_per_scenario"] = int(max_rows_per_scenario)
    return metrics


def flat_metrics(metrics: dict, prefix: str = VAL) -> dict[str, float]:
    """MLflow metric names (kernel.metric_names, ``prefix`` names the data): val/auc/<scenario>,
    val/pr_auc/<scenario>, val/log_loss/<scenario>, val/auc_macro."""
    out = {metric_name(prefix, k): metrics.get(k) for k in ("auc_macro", "auc_weighted", "auc_macro_scenarios")}
    for name, e in metrics["scenarios"].items():
        for key in ("auc", "pr_auc", "log_loss"):
            out[metric_name(prefix, key, name)] = e[key]
    return {k: v for k, v in out.items() if v is not None}
