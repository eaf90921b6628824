"""Leak-free train/valid/test assignment by a stable hash of a group key.

    h = stable_hash(table["query"])            # uint64 per row: the same on every machine, run and batch
    split = assign_splits(h, valid_fraction=0.1, test_fraction=0.1, seed=0)   # int8: 0 train, 1 valid, 2 test

Rows with the same key value get the same hash and so the same split: no query lands in two splits,
whatever the file layout or batch boundaries. The hash is a 64-bit polynomial over the UTF-8 bytes
(mod 2**64), finished with splitmix64. It takes three vectorised numpy passes over the bytes of a chunk
(multiply by a power table, ``add.reduceat`` per string, rescale) and no per-row Python.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "valid", "test")

_P = np.uint64(0x100000001B3)  # FNV-1 prime; odd, hence invertible mod 2**64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NULL_HASH = np.uint64(0x6A09E667F3BCC908)  # what a null key hashes to (before the final mix)
_CHUNK_BYTES = 1 << 20  # bytes hashed per pass: bounds the two power tables to 16 MiB together
_tables: tuple[np.ndarray, np.ndarray] | None = None


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i (mod 2**64) for i < n, grown on demand and cached."""
    global _tables
    if _tables is None or len(_tables[0]) < n:
        size = max(n, _CHUNK_BYTES + 1)
        inv = _P
        for _ in range(6):  # Newton iteration for the inverse mod 2**64: doubles the correct bits each step
            inv = inv * (np.uint64(2) - _P * inv)
        pw = np.full(size, _P, dtype=np.uint64)
        ipw = np.full(size, inv, dtype=np.uint64)
        pw[0] = ipw[0] = 1
        _tables = (np.cumprod(pw), np.cumprod(ipw))
    return _tables


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: every input bit affects every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_bytes(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Polynomial hash sum_j b_j P**j of each string; offsets (n+1,) int64 into data (uint8)."""
    n = len(offsets) - 1
    out = np.empty(n, dtype=np.uint64)
    i = 0
    while i < n:
        # rows [i, j): as many whole strings as fit in one chunk (at least one)
        j = int(np.searchsorted(offsets, offsets[i] + _CHUNK_BYTES, side="right")) - 1
        j = min(max(j, i + 1), n)
        start, end = int(offsets[i]), int(offsets[j])
        pw, ipw = _power_tables(end - start + 1)
        rel = offsets[i : j + 1] - start
        prod = np.empty(end - start + 1, dtype=np.uint64)
        np.multiply(data[start:end], pw[: end - start], out=prod[:-1])  # b_k * P**k, k from chunk start
        prod[-1] = 0  # so that reduceat at a trailing empty string reads a zero
        h = np.add.reduceat(prod, rel[:-1])  # per string: sum over its bytes
        lengths = np.diff(rel)
        h[lengths == 0] = 0  # reduceat returns prod[start] for empty segments
        h *= ipw[rel[:-1]]  # shift each sum to start at P**0: position independent
        out[i:j] = h ^ (lengths.astype(np.uint64) * _GOLDEN)
        i = j
    return out


def stable_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 hash per row of a string/binary (or any castable) column; nulls share one hash."""
    if isinstance(values, pa.ChunkedArray):
        parts = [stable_hash(c) for c in values.chunks]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
    arr = values
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
            or pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        arr = pc.cast(arr, pa.string())
    wide = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    off_type = np.int64 if wide else np.int32
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=off_type, count=n + 1, offset=arr.offset * np.dtype(off_type).itemsize)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    with np.errstate(over="ignore"):
        h = _hash_bytes(offsets.astype(np.int64), data)
        if arr.null_count:
            h[pc.is_null(arr).to_numpy(zero_copy_only=False)] = _NULL_HASH
        return splitmix64(h)


def assign_splits(hashes: np.ndarray, valid_fraction: float, test_fraction: float, seed: int = 0) -> np.ndarray:
    """int8 split code per row (0 train, 1 valid, 2 test) from key hashes; the seed reshuffles groups."""
    with np.errstate(over="ignore"):
        salt = splitmix64(np.array([seed % 2**64], dtype=np.uint64) + _GOLDEN)[0]
        u = (splitmix64(hashes ^ salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1)
    codes = np.zeros(len(hashes), dtype=np.int8)
    codes[u < test_fraction + valid_fraction] = 1
    codes[u < test_fraction] = 2
    return codes
