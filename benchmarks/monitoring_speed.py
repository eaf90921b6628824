"""Speed of the bootstrap AUC confidence interval: vectorised rounds against a per-round scikit-learn loop.

    python benchmarks/monitoring_speed.py                          # 50k rows, 200 rounds, 5 repeats
    python benchmarks/monitoring_speed.py --rows 200000 --rounds 500 --repeats 3

Cases, each computing the same stratified bootstrap (identical resample draws, so the AUCs agree to 1e-12):
    sklearn_loop  the obvious way: per round, draw indices and call sklearn.metrics.roc_auc_score
    vectorised    evaluation.metrics.bootstrap_auc: per chunk of rounds, resample counts by one bincount,
                  one sort of the scores, AUC of every round from grouped cumulative sums
Cases are interleaved (A B A B ...) so machine noise hits both alike; medians and the ratio are printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from evaluation.metrics import bootstrap_auc, scenario_seed


def sklearn_loop(labels: np.ndarray, scores: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """Same draws as bootstrap_auc (positives then negatives per chunk), one roc_auc_score per round."""
    y = labels.astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    chunk = max(1, 2_000_000 // len(y))  # the chunking of bootstrap_auc, so the generator is consumed alike
    out = []
    for start in range(0, rounds, chunk):
        r = min(chunk, rounds - start)
        dp = pos[rng.integers(0, len(pos), size=(r, len(pos)))]
        dn = neg[rng.integers(0, len(neg), size=(r, len(neg)))]
        for i in range(r):
            idx = np.concatenate([dp[i], dn[i]])
            out.append(roc_auc_score(y[idx], scores[idx]))
    return np.asarray(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=args.rows) < 0.3).astype(np.int8)
    scores = np.round(1 / (1 + np.exp(-(rng.normal(size=args.rows) + 1.5 * labels))), 3)  # ties included

    times: dict[str, list[float]] = {"sklearn_loop": [], "vectorised": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("sklearn_loop", lambda g: sklearn_loop(labels, scores, args.rounds, g)),
                         ("vectorised", lambda g: bootstrap_auc(labels, scores, None, args.rounds, g))):
            t0 = time.perf_counter()
            results[name] = fn(scenario_seed(0, "bench"))
            times[name].append(time.perf_counter() - t0)
    diff = float(np.max(np.abs(results["sklearn_loop"] - results["vectorised"])))
    base = statistics.median(times["sklearn_loop"])
    print(f"rows {args.rows}, rounds {args.rounds}, repeats {args.repeats}; max |AUC difference| {diff:.2e}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>13}: median {med * 1000:9.1f} ms   speed-up vs sklearn_loop x{base / med:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
