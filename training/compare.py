"""Pick between adapter methods trained on the same data and budget, by validation macro AUC with a paired CI.

    evidence = compare_on_validation({"mtl_lora": dir_a, "lora": dir_b}, data_dir, rounds=200, seed=0)
    evidence["winner"], evidence["methods"]["lora"]["auc_macro"], evidence["pairs"]["mtl_lora-lora"]

Every trained-model folder scores the whole validation split (the same rows, in the same order). Each
method's metrics are ``evaluation.metrics``' of its probabilities, as in early stopping. Per scenario, the
AUC of each method is bootstrapped on the same stratified resamples (``evaluation.metrics`` draws them from
the seed, the scenario and the labels only), so the difference of two methods' macro AUCs
gets a paired percentile CI: per round, the mean over scenarios of the AUC differences. The winner is the
method with the highest validation macro AUC; ``decisive`` says whether the CI of its lead over the runner-up
excludes 0 (a lead inside the noise is recorded as such, and the winner is still the higher one).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from evaluation.metrics import CI_LEVEL, scenario_metrics, summarize
from features.tokenize import build_features
from kernel import storage
from kernel.errors import DataError
from modeling.artifact import load_trained
from modeling.base import load_tokenizer
from training.evaluate import predict, probabilities


def validation_scores(model_dir: Path, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(task ids, labels, logits, scenario names) of a trained-model folder on the whole validation split."""
    cfg, task_map, model = load_trained(model_dir)
    tok = load_tokenizer(cfg)
    table = pq.read_table(str(storage.join(data_dir, "valid.parquet")))
    feats = build_features(table, tok, task_map, cfg.features.max_length, pair_format=cfg.features.pair_format)
    logits = predict(model, feats, np.arange(len(feats)), 64, tok.pad_token_id, torch.device("cpu"))
    return feats.task_ids, feats.labels, logits, task_map.names


def compare_on_validation(model_dirs: dict[str, Path], data_dir: str | Path, rounds: int = 200,
                          seed: int = 0) -> dict:
    """The evidence for choosing one of ``model_dirs`` (method -> trained-model folder): see the module doc."""
    scored = {m: validation_scores(d, data_dir) for m, d in model_dirs.items()}
    first = next(iter(scored.values()))
    task_ids, labels, names = first[0], first[1], first[3]
    for m, (t, y, _, n) in scored.items():
        if n != names or not np.array_equal(t, task_ids) or not np.array_equal(y, labels, equal_nan=True):
            raise DataError(f"method {m}: its validation rows differ from the others' (compare on the same data)")
    scenarios = np.asarray(names, dtype=object)[task_ids]
    methods, samples = {}, {}
    for m, (_, _, logits, _) in scored.items():
        per = scenario_metrics(scenarios, labels, probabilities(logits), bootstrap_rounds=rounds, seed=seed,
                               keep_samples=True, names=names)
        with_auc = {name: e for name, e in per.items() if e["auc"] is not None}  # not a single class
        methods[m] = {"auc": {name: e["auc"] for name, e in with_auc.items()},
                      "auc_macro": summarize(per)["auc_macro"], "model_dir": str(model_dirs[m])}
        draws = [e["auc_samples"] for e in with_auc.values()]
        samples[m] = np.mean(draws, axis=0) if draws else np.empty(0)  # (rounds,) macro AUC per resample
    ranked = sorted(methods, key=lambda m: -(methods[m]["auc_macro"] or -1.0))
    alpha = (1 - CI_LEVEL) / 2 * 100
    pairs = {}
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            diff = samples[a] - samples[b]
            lo, hi = (float(v) for v in np.percentile(diff, [alpha, 100 - alpha])) if len(diff) else (None, None)
            pairs[f"{a}-{b}"] = {"delta": methods[a]["auc_macro"] - methods[b]["auc_macro"], "ci_low": lo,
                                 "ci_high": hi}
    winner = ranked[0]
    lead = pairs.get(f"{winner}-{ranked[1]}") if len(ranked) > 1 else None
    return {"winner": winner, "ranked": ranked, "methods": methods, "pairs": pairs,
            "decisive": bool(lead and lead["ci_low"] is not None and lead["ci_low"] > 0),
            "rows": int(len(labels)), "rounds": rounds}
