"""Validation metrics: the per-scenario row cap and the macro AUC, checked against direct recomputation.
Early stopping reads the same function as compare, monitoring and the promotion gate (evaluation.metrics)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluation.metrics import describe_macro, scenario_metrics, summarize
from kernel.task_map import TaskMap
from training.evaluate import capped_rows, classification_metrics, probabilities


def _sorted_by_scenario(seed: int = 0):
    """Rows grouped by scenario, as a concatenation of per-scenario files arrives (the first N rows: one scenario)."""
    rng = np.random.default_rng(seed)
    sizes, rates = [900, 300, 120, 40], [0.1, 0.3, 0.5, 0.25]
    task_ids = np.concatenate([np.full(n, t) for t, n in enumerate(sizes)])
    labels = np.concatenate([(rng.random(n) < r).astype(np.float32) for n, r in zip(sizes, rates)])
    return task_ids, labels


def test_cap_keeps_every_scenario_and_its_positive_rate():
    task_ids, labels = _sorted_by_scenario()
    rows = capped_rows(task_ids, labels, cap=100)
    assert np.all(np.diff(rows) > 0) and len(np.unique(rows)) == len(rows)
    for t in range(4):
        mine = rows[task_ids[rows] == t]
        n_t = int((task_ids == t).sum())
        assert len(mine) == min(100, n_t)
        if n_t > 100:  # stratified: the positive rate is kept to within one row
            rate = labels[task_ids == t].mean()
            assert abs(labels[mine].mean() - rate) <= 1 / 100 + 1e-9
    assert np.array_equal(rows, capped_rows(task_ids, labels, cap=100))  # the same rows every evaluation
    assert not np.array_equal(rows, capped_rows(task_ids, labels, cap=100, seed=1))
    assert np.array_equal(capped_rows(task_ids, labels, cap=0), np.arange(len(task_ids)))


def test_cap_keeps_both_classes_of_a_rare_positive_scenario():
    task_ids = np.zeros(1000, dtype=np.int64)
    labels = np.zeros(1000, dtype=np.float32)
    labels[[3, 500]] = 1  # 0.2 % positives: round(10 * 0.002) would be 0
    rows = capped_rows(task_ids, labels, cap=10)
    assert len(rows) == 10 and labels[rows].sum() == 1


def test_macro_auc_matches_a_direct_recomputation_and_says_when_it_is_partial():
    task_ids, labels = _sorted_by_scenario(1)
    rng = np.random.default_rng(2)
    logits = rng.normal(size=len(labels)) + 1.5 * labels
    tm = TaskMap(["a", "b", "c", "d"])
    rows = capped_rows(task_ids, labels, cap=80)
    m = classification_metrics(task_ids[rows], labels[rows], logits[rows], tm)
    direct = [roc_auc_score(labels[rows][task_ids[rows] == t], logits[rows][task_ids[rows] == t]) for t in range(4)]
    assert m["auc_macro"] == pytest.approx(np.mean(direct), abs=1e-12)
    assert m["auc_macro_scenarios"] == m["scenarios_total"] == 4 and not m["auc_macro_partial"]
    assert describe_macro(m) == f"{np.mean(direct):.4f}"

    single = labels.copy()
    single[task_ids == 3] = 0  # scenario d: one class, no AUC
    m = classification_metrics(task_ids, single, logits, tm)
    assert m["scenarios"]["d"]["auc"] is None and m["auc_macro_partial"] and m["auc_macro_scenarios"] == 3
    assert m["auc_macro"] == pytest.approx(np.mean([m["scenarios"][s]["auc"] for s in "abc"]), abs=1e-12)
    assert "over 3 of 4 scenarios; no AUC for d" in describe_macro(m)


def test_early_stopping_reads_the_monitoring_metrics_and_they_match_sklearn_with_ties_one_class_and_no_rows():
    rng = np.random.default_rng(5)
    task_ids = rng.integers(0, 3, 2000)  # scenario "none" (id 3) has no rows
    labels = (rng.random(2000) < 0.3).astype(np.float32)
    labels[task_ids == 2] = 1  # "one": a single class
    logits = np.round(rng.normal(size=2000) + 1.2 * labels, 1).astype(np.float32)  # coarse: many ties
    tm = TaskMap(["a", "b", "one", "none"])
    m = classification_metrics(task_ids, labels, logits, tm)
    assert list(m["scenarios"]) == tm.names
    for t in (0, 1):
        rows = task_ids == t
        e = m["scenarios"][tm.names[t]]
        assert e["auc"] == pytest.approx(roc_auc_score(labels[rows], logits[rows]), abs=1e-12)  # on the logits too
        assert e["pr_auc"] == pytest.approx(average_precision_score(labels[rows], logits[rows]), abs=1e-12)
    assert m["scenarios"]["one"]["auc"] is None and "only one class" in m["scenarios"]["one"]["reason"]
    assert m["scenarios"]["none"]["auc"] is None and m["scenarios"]["none"]["n"] == 0
    direct = [roc_auc_score(labels[task_ids == t], logits[task_ids == t]) for t in (0, 1)]
    assert m["auc_macro"] == pytest.approx(np.mean(direct), abs=1e-12)
    assert (m["auc_macro_scenarios"], m["scenarios_total"], m["auc_macro_partial"]) == (2, 4, True)
    assert m["scenarios_without_auc"] == ["one", "none"]
    # One schema: exactly what monitoring and the promotion gate compute from the same probabilities.
    per = scenario_metrics(np.asarray(tm.names)[task_ids], labels, probabilities(logits), bootstrap_rounds=0,
                           names=tm.names)
    assert m == {"scenarios": per, **summarize(per)}
