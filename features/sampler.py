"""Mixed-scenario micro-batches: scenario sampling strategies, length bucketing, disjoint ranks, exact resume.

    sampler = MixedScenarioSampler(features.task_ids, features.lengths, batch_size=32, strategy="temperature",
                                   alpha=0.5, seed=0, rank=rank, world_size=world)
    batches = iter(sampler)                 # endless: each item is this rank's (batch_size,) int64 row indices
    state = sampler.state_dict()            # JSON-able; a fresh sampler + load_state_dict continues exactly

How rows are drawn. Each slot of a global batch (``world_size * batch_size`` rows) picks a scenario t
with probability p_t, where with n_t rows in scenario t

    proportional  p_t ∝ n_t        uniform  p_t = 1 / T        temperature  p_t ∝ n_t ** alpha

then takes the next row of t's own shuffled order (a fresh permutation each time t is used up, so within
a scenario every row is seen once per pass). Draws are made a pool of ``POOL_BATCHES`` global batches at a
time. With length bucketing the pool is sorted by length before it is cut into global batches, which are
then served in random order: each micro-batch holds rows of similar length (less padding) and still mixes
scenarios. Every rank computes the same global stream from the seed and keeps its slice of each global
batch, so ranks need no communication; a row repeated inside a global batch (a small scenario starting a
new pass) is swapped with a neighbouring batch, so ranks never share a row in a step unless a scenario
has fewer rows than it is drawn in a single global batch.

Resume. The state is (pool number, global batches already taken from it, each scenario's pass number and
position at the pool's start). A pool is a pure function of that state and the seed, so a resumed stream is
the uninterrupted stream, row for row.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

STRATEGIES = ("proportional", "uniform", "temperature")
POOL_BATCHES = 64  # global batches drawn (and length-sorted) together


def scenario_probabilities(counts: np.ndarray, strategy: str, alpha: float = 0.5) -> np.ndarray:
    """p_t for each scenario from its row count n_t; scenarios without rows get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    if strategy == "proportional":
        w = counts
    elif strategy == "uniform":
        w = (counts > 0).astype(np.float64)
    elif strategy == "temperature":
        w = np.where(counts > 0, counts ** alpha, 0.0)
    else:
        raise ValueError(f"sampler strategy {strategy!r} is not one of {STRATEGIES}")
    if w.sum() <= 0:
        raise ValueError("sampler: no rows to sample from")
    return w / w.sum()


def _spread_repeats(batches: np.ndarray, reach: int = 8) -> None:
    """Swap rows with nearby global batches (in place) until no row occurs twice in one global batch.

    A scenario drawn more often in a pool than it has rows starts a new pass inside the pool, and after a
    length sort a row's two occurrences sit side by side. Swapping a repeat with a row of a neighbouring
    batch (similar lengths when sorted) keeps every row's count and makes the ranks' slices disjoint.
    Impossible cases (a scenario with fewer rows than its draws in one batch) are left as they are.
    """
    n = len(batches)
    for i in range(n):
        _, first = np.unique(batches[i], return_index=True)
        if len(first) == batches.shape[1]:
            continue
        repeats = np.setdiff1d(np.arange(batches.shape[1]), first)
        for p in repeats:
            value = batches[i, p]
            for j in sorted((j for j in range(max(0, i - reach), min(n, i + reach + 1)) if j != i),
                            key=lambda j: (abs(j - i), j < i)):
                if value in batches[j]:
                    continue
                free = np.flatnonzero(~np.isin(batches[j], batches[i]))
                if free.size:
                    q = free[0] if j > i else free[-1]  # the neighbour's row closest in length
                    batches[i, p], batches[j, q] = batches[j, q], value
                    break


class MixedScenarioSampler:
    def __init__(self, task_ids: np.ndarray, lengths: np.ndarray, batch_size: int, strategy: str = "temperature",
                 alpha: float = 0.5, seed: int = 0, rank: int = 0, world_size: int = 1, length_bucketing: bool = True):
        task_ids = np.asarray(task_ids, dtype=np.int64)
        if len(task_ids) != len(lengths):
            raise ValueError(f"sampler: {len(task_ids)} task ids but {len(lengths)} lengths")
        if not 0 <= rank < world_size:
            raise ValueError(f"sampler: rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"sampler: batch_size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.length_bucketing = seed, length_bucketing
        self.strategy, self.alpha = strategy, alpha
        n_tasks = int(task_ids.max()) + 1 if len(task_ids) else 0
        # Rows of each scenario, in a fixed order (its permutations index into this).
        self.rows = [np.flatnonzero(task_ids == t) for t in range(n_tasks)]
        self.probs = scenario_probabilities(np.array([len(r) for r in self.rows]), strategy, alpha)
        self._pool = 0  # index of the pool being served
        self._taken = 0  # global batches of that pool already yielded
        self._cursors = [[0, 0] for _ in self.rows]  # per scenario: [pass number, position] at the pool's start
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _permutation(self, task: int, epoch: int) -> np.ndarray:
        """Scenario ``task``'s row order in pass ``epoch`` (the latest one cached per scenario)."""
        cached = self._perm_cache.get(task)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, 1, task, epoch]).permutation(len(self.rows[task])))
            self._perm_cache[task] = cached
        return cached[1]

    def _draw(self, task: int, count: int, cursor: list[int]) -> np.ndarray:
        """The next ``count`` rows of ``task``'s stream; advances ``cursor`` = [pass, position]."""
        out, need = [], count
        while need:
            perm = self._permutation(task, cursor[0])
            take = perm[cursor[1] : cursor[1] + need]
            out.append(self.rows[task][take])
            need -= len(take)
            cursor[1] += len(take)
            if cursor[1] == len(perm):
                cursor[0], cursor[1] = cursor[0] + 1, 0
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _make_pool(self) -> tuple[np.ndarray, list[list[int]]]:
        """(POOL_BATCHES, global_batch) row indices of the current pool, and the cursors after it."""
        rng = np.random.default_rng([self.seed, 0, self._pool])
        size = POOL_BATCHES * self.global_batch
        slots = rng.choice(len(self.rows), size=size, p=self.probs)  # scenario of each slot
        cursors = [list(c) for c in self._cursors]
        pool = np.empty(size, dtype=np.int64)
        for t in np.flatnonzero(np.bincount(slots, minlength=len(self.rows))):
            where = np.flatnonzero(slots == t)
            pool[where] = self._draw(int(t), len(where), cursors[t])
        if self.length_bucketing:  # sort by length (ties in slot order), then cut into global batches
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
        batches = pool.reshape(POOL_BATCHES, self.global_batch)
        _spread_repeats(batches)
        if self.length_bucketing:  # length-sorted batches, served in random order
            batches = batches[rng.permutation(POOL_BATCHES)]
        return batches, cursors

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            batches, after = self._make_pool()
            while self._taken < POOL_BATCHES:
                batch = batches[self._taken]
                self._taken += 1  # the state now points past the batch being handed out
                yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].copy()
            self._pool, self._taken, self._cursors = self._pool + 1, 0, after

    def state_dict(self) -> dict:
        return {"pool": self._pool, "taken": self._taken, "cursors": [list(map(int, c)) for c in self._cursors],
                "seed": self.seed, "strategy": self.strategy, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_rows": int(len(self.lengths))}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "strategy", "world_size", "batch_size", "num_rows"):
            if state.get(key) != mine[key]:
                raise ValueError(f"sampler state was saved with {key}={state.get(key)!r}, this sampler has {mine[key]!r}")
        if len(state["cursors"]) != len(self._cursors):
            raise ValueError(f"sampler state has {len(state['cursors'])} scenarios, this sampler has {len(self._cursors)}")
        self._pool, self._taken = int(state["pool"]), int(state["taken"])
        self._cursors = [list(map(int, c)) for c in state["cursors"]]
