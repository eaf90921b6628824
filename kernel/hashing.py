"""Stable 64-bit hashes of string columns: the same value gives the same hash on every machine, run and batch.

    h = stable_hash(table["query"])            # uint64 per row; nulls share one hash
    splitmix64(h ^ salt)                        # the finaliser, for salted re-hashing

The hash is a 64-bit polynomial over the UTF-8 bytes (mod 2**64), finished with splitmix64. It takes three
vectorised numpy passes over the bytes of a chunk (multiply by a power table, ``add.reduceat`` per string,
rescale) and no per-row Python.

Every other digest of the project is a sha256, computed here:

    bytes_digest("some text", 16)              # sha256 hex of bytes or text (UTF-8), cut to 16 characters
    bytes_digest(parts_iterable)               # of several parts in order, consumed one at a time
    json_digest({"b": 1, "a": [2]}, 16)        # of json.dumps(obj, sort_keys=True): key order does not matter
    fingerprint_files(paths)                   # of the names and bytes of whole files (local or URIs)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_P = np.uint64(0x100000001B3)  # FNV-1 prime; odd, hence invertible mod 2**64
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
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
        out[i:j] = h ^ (lengths.astype(np.uint64) * GOLDEN)
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


def fingerprint_files(paths: list[str | Path]) -> str:
    """sha256 over the names and bytes of the given files (in order; local paths or URIs): identifies the exact
    data a run saw."""
    return fingerprint_files_and_each(paths)[0]


def fingerprint_files_and_each(paths: list[str | Path]) -> tuple[str, list[str]]:
    """``fingerprint_files(paths)`` and ``fingerprint_files([p])`` for each path, reading every file once."""
    from kernel import storage  # storage -> atomic; hashing stays importable on its own

    whole, each = hashlib.sha256(), []
    for p in paths:
        one = hashlib.sha256()
        for h in (whole, one):
            h.update(storage.name(p).encode())
        fs, path = storage.resolve(p)
        with fs.open_input_stream(path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                whole.update(chunk)
                one.update(chunk)
        each.append(one.hexdigest()[:16])
    return whole.hexdigest()[:16], each


def bytes_digest(parts: bytes | str | Iterable[bytes | str], length: int | None = None) -> str:
    """sha256 hex of ``parts`` (bytes, text as UTF-8, or an iterable of them hashed in order, one at a time, so
    large parts need not be held together), cut to its first ``length`` characters (None: all 64)."""
    h = hashlib.sha256()
    for part in (parts,) if isinstance(parts, (bytes, bytearray, memoryview, str)) else parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:length]


def json_digest(obj, length: int | None = None) -> str:
    """sha256 hex of ``json.dumps(obj, sort_keys=True)`` (values JSON cannot encode count as their ``str``),
    cut to ``length`` characters: equal for equal content whatever the order of the keys."""
    return bytes_digest(json.dumps(obj, sort_keys=True, default=str), length)


def file_digest(path: str | Path, length: int | None = None) -> str:
    """sha256 hex of one file's bytes (a local path or a URI), read 1 MiB at a time, cut to ``length``."""
    from kernel import storage  # storage -> atomic; hashing stays importable on its own

    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:
        return bytes_digest(iter(lambda: f.read(1 << 20), b""), length)
