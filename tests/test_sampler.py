"""MixedScenarioSampler: determinism, disjoint ranks, strategy proportions, one pass per scenario, exact resume."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from features.sampler import POOL_BATCHES, MixedScenarioSampler, scenario_probabilities

SIZES = [3000, 600, 90]  # rows per scenario: deliberately unbalanced


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    task_ids = rng.permutation(np.repeat(np.arange(len(SIZES)), SIZES))
    lengths = rng.integers(8, 128, len(task_ids))
    return task_ids, lengths


def take(sampler: MixedScenarioSampler, n: int) -> list[np.ndarray]:
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("bucketing", [True, False])
def test_deterministic_per_seed(bucketing):
    t, lengths = data()
    a = take(MixedScenarioSampler(t, lengths, 16, seed=1, length_bucketing=bucketing), 80)
    b = take(MixedScenarioSampler(t, lengths, 16, seed=1, length_bucketing=bucketing), 80)
    c = take(MixedScenarioSampler(t, lengths, 16, seed=2, length_bucketing=bucketing), 80)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(x.shape == (16,) and x.dtype == np.int64 and (0 <= x).all() and (x < len(t)).all() for x in a)


def test_ranks_get_disjoint_rows_that_together_form_the_global_batch():
    t, lengths = data()
    world = 4
    streams = [take(MixedScenarioSampler(t, lengths, 8, seed=3, rank=r, world_size=world), 100) for r in range(world)]
    for step in range(100):
        rows = np.concatenate([streams[r][step] for r in range(world)])
        assert len(np.unique(rows)) == len(rows) == 8 * world
    # Ranks split one global stream: a single process with world_size 1 and a 4x batch sees the same rows.
    single = take(MixedScenarioSampler(t, lengths, 8 * world, seed=3), 100)
    for step in range(100):
        assert np.array_equal(np.concatenate([streams[r][step] for r in range(world)]), single[step])


@pytest.mark.parametrize("strategy,alpha", [("proportional", 0.5), ("uniform", 0.5), ("temperature", 0.5),
                                            ("temperature", 0.0)])
def test_scenario_shares_follow_the_strategy(strategy, alpha):
    t, lengths = data()
    draws = np.concatenate(take(MixedScenarioSampler(t, lengths, 32, strategy=strategy, alpha=alpha, seed=0), 400))
    observed = np.bincount(t[draws], minlength=len(SIZES)) / len(draws)
    n = np.array(SIZES, dtype=float)
    expected = {"proportional": n / n.sum(), "uniform": np.full(3, 1 / 3),
                "temperature": n**alpha / (n**alpha).sum()}[strategy]
    assert np.allclose(scenario_probabilities(n, strategy, alpha), expected)
    sigma = np.sqrt(expected * (1 - expected) / len(draws))
    assert (np.abs(observed - expected) < 5 * sigma).all(), (observed, expected)


@pytest.mark.parametrize("bucketing", [True, False])
def test_batches_mix_scenarios_and_each_scenario_is_seen_once_per_pass(bucketing):
    t, lengths = data()
    sampler = MixedScenarioSampler(t, lengths, 32, strategy="uniform", seed=5, length_bucketing=bucketing)
    batches = take(sampler, 3 * POOL_BATCHES)  # whole pools
    assert np.mean([len(np.unique(t[b])) > 1 for b in batches]) > 0.9
    assert all(len(np.unique(b)) == len(b) for b in batches)  # no row twice in a batch, despite many passes
    stream = np.concatenate(batches)
    for task, size in enumerate(SIZES):
        counts = np.bincount(stream[t[stream] == task], minlength=len(t))[t == task]
        assert counts.max() - counts.min() <= 1  # pass after pass: every row once before any row again
    assert np.bincount(stream[t[stream] == 2]).max() > 10  # the 90-row scenario went through many passes


def test_length_bucketing_cuts_padding():
    t, lengths = data()

    def padding(bucketing: bool) -> float:
        batches = take(MixedScenarioSampler(t, lengths, 32, seed=0, length_bucketing=bucketing), 128)
        return float(np.mean([lengths[b].max() * len(b) - lengths[b].sum() for b in batches]))

    assert padding(True) < 0.25 * padding(False)


@pytest.mark.parametrize("stop", [0, 5, POOL_BATCHES - 1, POOL_BATCHES + 7])
@pytest.mark.parametrize("bucketing", [True, False])
def test_resume_continues_the_uninterrupted_stream(stop, bucketing):
    t, lengths = data()
    kwargs = dict(batch_size=16, seed=9, rank=1, world_size=2, length_bucketing=bucketing)
    full = take(MixedScenarioSampler(t, lengths, **kwargs), stop + 40)
    first = MixedScenarioSampler(t, lengths, **kwargs)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = MixedScenarioSampler(t, lengths, **kwargs)
    resumed.load_state_dict(state)
    tail = take(resumed, 40)
    assert all(np.array_equal(x, y) for x, y in zip(head + tail, full))


def test_state_from_another_setup_is_refused():
    t, lengths = data()
    state = MixedScenarioSampler(t, lengths, 16, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        MixedScenarioSampler(t, lengths, 16, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        MixedScenarioSampler(t, lengths, 8, seed=1).load_state_dict(state)


def test_bad_arguments_are_named():
    t, lengths = data()
    with pytest.raises(ValueError, match="strategy"):
        MixedScenarioSampler(t, lengths, 8, strategy="random")
    with pytest.raises(ValueError, match="rank"):
        MixedScenarioSampler(t, lengths, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="lengths"):
        MixedScenarioSampler(t, lengths[:-1], 8)


def test_a_task_without_rows_is_never_drawn():
    t, lengths = data()
    t = np.where(t == 1, 3, t)  # task 1 has no rows now; tasks 0, 2, 3 do
    sampler = MixedScenarioSampler(t, lengths, 16, strategy="uniform")
    assert sampler.probs[1] == 0 and np.allclose(sampler.probs[[0, 2, 3]], 1 / 3)
    drawn = np.concatenate(take(sampler, 50))
    assert set(np.unique(t[drawn])) == {0, 2, 3}
