"""Exact and conflicting duplicates across all input files, in memory that does not grow with the input.

    spill = Spill(folder, n_buckets=bucket_count(total_rows), schema=accepted_schema)
    spill.write(accepted_batch, query_hash, split_key_hash)   # rows go to bucket query_hash % n_buckets
    spill.close()
    for table in spill.buckets():                              # one bucket at a time, memory-mapped
        codes = find_duplicates(table)                         # int8 per row: 0 keep, else a reason code

Two rows are duplicates when query, title, description, url and scenario are equal. Equal rows share the
query, hence the query hash, hence the bucket: each bucket is decided alone. Within a group the first row
(in input order) is kept and the rest are ``duplicate``; a group whose labels disagree is quarantined
entirely as ``conflicting_label`` (there is no telling which label is right).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from pipeline.validate import CODE

DEDUPE_KEYS = ["query", "title", "description", "url", "scenario"]
BUCKET_ROWS = 100_000  # target rows per bucket: what pass 2 holds in memory at once (~100 MiB)
MAX_BUCKETS = 1024  # open spill files; beyond MAX_BUCKETS * BUCKET_ROWS rows, buckets grow instead


def bucket_count(total_rows: int, bucket_rows: int = BUCKET_ROWS) -> int:
    return int(min(MAX_BUCKETS, max(1, math.ceil(total_rows / bucket_rows))))


class Spill:
    """Accepted rows, partitioned by query hash into Arrow IPC files (uncompressed: cheap to write,
    read back zero-copy). ``_khash`` (the split-key hash) travels with each row."""

    def __init__(self, folder: Path, n_buckets: int, schema: pa.Schema):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n = n_buckets
        self.schema = schema.append(pa.field("_khash", pa.uint64()))
        self._writers: dict[int, ipc.RecordBatchFileWriter] = {}
        self._closed = False

    def _path(self, b: int) -> Path:
        return self.folder / f"bucket-{b:05d}.arrow"

    def write(self, batch: pa.RecordBatch, query_hash: np.ndarray, key_hash: np.ndarray) -> None:
        if batch.num_rows == 0:
            return
        bucket = (query_hash % np.uint64(self.n)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")  # keeps input order inside each bucket
        counts = np.bincount(bucket, minlength=self.n)
        batch = batch.append_column("_khash", pa.array(key_hash, pa.uint64()))
        if self.n > 1:
            batch = batch.take(pa.array(order))
        start = 0
        for b in np.flatnonzero(counts):
            if b not in self._writers:
                self._writers[b] = ipc.new_file(str(self._path(b)), self.schema)
            self._writers[b].write_batch(batch.slice(start, int(counts[b])))
            start += int(counts[b])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for w in self._writers.values():
                w.close()

    def buckets(self) -> Iterator[pa.Table]:
        """Each non-empty bucket in order; its file is deleted once the caller moves on."""
        for b in sorted(self._writers):
            path = self._path(b)
            with pa.memory_map(str(path)) as source:
                table = ipc.open_file(source).read_all()
                yield table
            del table
            path.unlink()


def find_duplicates(table: pa.Table) -> np.ndarray:
    """int8 code per row: 0 keep, CODE['duplicate'], or CODE['conflicting_label'].

    The key columns are joined into one binary value per row with the byte 0xFF between them (0xFF never
    occurs in UTF-8, so the join is unambiguous), then dictionary-encoded: Arrow numbers distinct values in
    order of first appearance, so the group id of each row and "is the first of its group" come out of
    one hash pass, and the rest is numpy.
    """
    n = table.num_rows
    codes = np.zeros(n, dtype=np.int8)
    if n < 2:
        return codes
    parts = [table.column(k).combine_chunks().view(pa.binary()) for k in DEDUPE_KEYS]
    encoded = pc.dictionary_encode(pc.binary_join_element_wise(*parts, b"\xff"))
    if len(encoded.dictionary) == n:  # every row distinct: the common case
        return codes
    ids = encoded.indices.to_numpy().astype(np.int64)
    seen_before = np.maximum.accumulate(np.concatenate([[-1], ids[:-1]]))
    codes[ids <= seen_before] = CODE["duplicate"]  # ids grow by one at each first appearance
    label = table.column("label").combine_chunks()
    groups = len(encoded.dictionary)
    pos = np.bincount(ids, weights=_np(pc.equal(label, 1)), minlength=groups)
    neg = np.bincount(ids, weights=_np(pc.equal(label, 0)), minlength=groups)
    codes[((pos > 0) & (neg > 0))[ids]] = CODE["conflicting_label"]
    return codes


def _np(mask: pa.Array) -> np.ndarray:
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False).astype(np.float64)
