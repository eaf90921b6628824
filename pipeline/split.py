"""Leak-free train/valid/test assignment by a stable hash of a group key.

    h = stable_hash(table["query"])            # kernel.hashing: uint64 per row, the same everywhere
    split = assign_splits(h, valid_fraction=0.1, test_fraction=0.1, seed=0)   # int8: 0 train, 1 valid, 2 test

Rows with the same key value get the same hash and so the same split: no query lands in two splits,
whatever the file layout or batch boundaries.
"""
from __future__ import annotations

import numpy as np

from kernel.hashing import GOLDEN, splitmix64

SPLITS = ("train", "valid", "test")


def assign_splits(hashes: np.ndarray, valid_fraction: float, test_fraction: float, seed: int = 0) -> np.ndarray:
    """int8 split code per row (0 train, 1 valid, 2 test) from key hashes; the seed reshuffles groups."""
    with np.errstate(over="ignore"):
        salt = splitmix64(np.array([seed % 2**64], dtype=np.uint64) + GOLDEN)[0]
        u = (splitmix64(hashes ^ salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1)
    codes = np.zeros(len(hashes), dtype=np.int8)
    codes[u < test_fraction + valid_fraction] = 1
    codes[u < test_fraction] = 2
    return codes
