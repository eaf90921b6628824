"""Properties of the per-scenario metrics and of the per-scenario calibration."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from evaluation.calibration import ScenarioCalibrator
from evaluation.metrics import bootstrap_auc, scenario_metrics, scenario_seed, summarize, weighted_auc
from kernel.errors import DataError
from tests.monitoring_testkit import DATA, overlap_scores


@pytest.fixture(scope="module")
def wdc_valid():
    """Real labelled pairs of the four categories, scored by token overlap: (scenarios, labels, scores)."""
    s, y, p = [], [], []
    for cat in ("cameras", "computers", "shoes", "watches"):
        t = pq.read_table(DATA / cat / "valid.parquet")
        s.append(t["category"].to_numpy(zero_copy_only=False).astype(str))
        y.append(t["label"].to_numpy())
        p.append(overlap_scores(t["left"].to_pylist(), t["right"].to_pylist()))
    return np.concatenate(s), np.concatenate(y), np.concatenate(p)


def test_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 700)
    p = np.round(rng.uniform(size=700) * 0.5 + 0.3 * y, 1)  # coarse: many ties
    w = rng.uniform(0.1, 3.0, 700)
    assert weighted_auc(y, p, w) == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert weighted_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_real_data_metrics_agree_with_sklearn_and_ci_brackets_auc(wdc_valid):
    s, y, p = wdc_valid
    per = scenario_metrics(s, y, p, bootstrap_rounds=100)
    assert set(per) == set(s)
    for name, m in per.items():
        mask = s == name
        assert m["n"] == mask.sum() and m["positives"] == y[mask].sum()
        assert m["auc"] == pytest.approx(roc_auc_score(y[mask], p[mask]))
        assert m["pr_auc"] == pytest.approx(average_precision_score(y[mask], p[mask]))
        assert m["log_loss"] == pytest.approx(log_loss(y[mask], np.clip(p[mask], 1e-7, 1 - 1e-7)))
        assert m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"]
        assert sum(b["n"] for b in m["reliability"]) == m["n"]
    json.dumps(per)  # JSON-able as returned
    summ = summarize(per)
    assert summ["n"] == len(s)
    assert summ["auc_macro"] == pytest.approx(np.mean([m["auc"] for m in per.values()]))
    assert min(m["auc"] for m in per.values()) <= summ["auc_weighted"] <= max(m["auc"] for m in per.values())


def test_integer_weights_equal_duplicated_rows():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = rng.uniform(size=300)
    w = rng.integers(1, 4, 300)
    s = np.array(["a"] * 300)
    weighted = scenario_metrics(s, y, p, weights=w, bootstrap_rounds=0)["a"]
    dup = scenario_metrics(np.repeat(s, w), np.repeat(y, w), np.repeat(p, w), bootstrap_rounds=0)["a"]
    for k in ("auc", "pr_auc", "log_loss", "ece", "positive_rate"):
        assert weighted[k] == pytest.approx(dup[k], abs=1e-12), k


def test_auc_invariant_to_monotone_transform_and_ci_narrows_with_volume():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 4000)
    p = 1 / (1 + np.exp(-(rng.normal(size=4000) + y)))
    s = np.array(["a"] * 4000)
    a = scenario_metrics(s, y, p, bootstrap_rounds=100)["a"]
    b = scenario_metrics(s, y, p ** 3, bootstrap_rounds=100)["a"]
    assert a["auc"] == pytest.approx(b["auc"])
    assert (a["auc_ci_low"], a["auc_ci_high"]) == pytest.approx((b["auc_ci_low"], b["auc_ci_high"]))
    small = scenario_metrics(s[:250], y[:250], p[:250], bootstrap_rounds=100)["a"]
    assert a["auc_ci_high"] - a["auc_ci_low"] < small["auc_ci_high"] - small["auc_ci_low"]


def test_bootstrap_draws_are_paired_across_models():
    """Same labels and seed -> same resamples, so identical models differ by exactly zero in every round."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 500)
    p = rng.uniform(size=500)
    one = bootstrap_auc(y, p, None, 50, scenario_seed(0, "shoes"))
    two = bootstrap_auc(y, p.copy(), None, 50, scenario_seed(0, "shoes"))
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(one, bootstrap_auc(y, p, None, 50, scenario_seed(0, "watches")))


def test_ece_is_zero_when_each_bin_predicts_its_positive_rate():
    # Bin i: 20 rows scored (i + 0.5) / 10, of which 2i + 1 are positive, a rate of exactly (i + 0.5) / 10.
    y, p = [], []
    for i in range(10):
        k = 2 * i + 1
        y += [1] * k + [0] * (20 - k)
        p += [(i + 0.5) / 10] * 20
    m = scenario_metrics(np.array(["a"] * 200), np.array(y), np.array(p), bootstrap_rounds=0)["a"]
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)
    assert all(b["mean_pred"] == pytest.approx(b["frac_pos"]) for b in m["reliability"])


def test_one_class_scenario_reports_reason_not_crash():
    s = np.array(["a"] * 50 + ["b"] * 50)
    y = np.r_[np.zeros(50, int), np.arange(50) % 2]
    p = np.linspace(0, 1, 100)
    per = scenario_metrics(s, y, p, bootstrap_rounds=20)
    assert per["a"]["auc"] is None and per["a"]["auc_ci_low"] is None and "one class" in per["a"]["reason"]
    assert per["a"]["log_loss"] is not None and per["b"]["auc"] is not None
    assert summarize(per)["scenarios_without_auc"] == ["a"]


@pytest.mark.parametrize("bad, column", [(1.5, "score"), (np.nan, "score")])
def test_bad_scores_name_the_column_and_row(bad, column):
    p = np.full(10, 0.5)
    p[7] = bad
    with pytest.raises(DataError, match=rf"column {column}.*row 7"):
        scenario_metrics(np.array(["a"] * 10), np.arange(10) % 2, p)


def test_bad_labels_name_the_column():
    with pytest.raises(DataError, match="column label.*row 3"):
        scenario_metrics(np.array(["a"] * 5), np.array([0, 1, 0, 2, 1]), np.full(5, 0.5))


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibration_improves_fit_and_round_trips_through_json(wdc_valid, method, tmp_path):
    s, y, p = wdc_valid
    cal = ScenarioCalibrator.fit(s, y, p, method=method)
    assert cal.scenarios == sorted(set(s))
    q = cal.apply(s, p)
    assert np.all((q >= 0) & (q <= 1))
    raw = scenario_metrics(s, y, p, bootstrap_rounds=0)
    fitted = scenario_metrics(s, y, q, bootstrap_rounds=0)
    for name in raw:
        # Fitted on these rows, and identity is among the candidate maps: log loss can only improve.
        # Isotonic predicts each block's own positive rate, so its binned calibration error falls too.
        assert fitted[name]["log_loss"] < raw[name]["log_loss"]
        if method == "isotonic":
            assert fitted[name]["ece"] < raw[name]["ece"]
        order = np.argsort(p[s == name], kind="stable")
        assert np.all(np.diff(q[s == name][order]) >= -1e-12)  # monotone within a scenario
    path = cal.save(tmp_path / "calibration.json")
    again = ScenarioCalibrator.load(path)
    np.testing.assert_array_equal(again.apply(s, p), q)


def test_calibration_unknown_and_single_class_scenarios_pass_through():
    s = np.array(["a"] * 40 + ["b"] * 10)
    y = np.r_[np.arange(40) % 2, np.ones(10, int)]
    p = np.linspace(0.01, 0.99, 50)
    cal = ScenarioCalibrator.fit(s, y, p, method="platt")
    assert "b" in cal.skipped and cal.scenarios == ["a"]
    new = np.array(["b"] * 5 + ["zzz"] * 5)
    np.testing.assert_array_equal(cal.apply(new, p[:10]), p[:10])


def test_calibration_rejects_malformed_dict():
    with pytest.raises(DataError, match="scenarios.a"):
        ScenarioCalibrator.from_dict({"format_version": 1, "scenarios": {"a": {"method": "isotonic", "x": [0]}}})
    with pytest.raises(DataError, match="method"):
        ScenarioCalibrator.fit(["a"], [1], [0.5], method="beta")
