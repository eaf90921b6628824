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
BUCKET_ROWS = 250_000  # target rows per bucket: what pass 2 holds in memory at once
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
    """int8 code per row: 0 keep, CODE['duplicate'], or CODE['conflicting_label']."""
    n = table.num_rows
    rows = pa.array(np.arange(n, dtype=np.int64))
    t = table.select(DEDUPE_KEYS).append_column("_row", rows).append_column("label", table.column("label"))
    groups = t.group_by(DEDUPE_KEYS, use_threads=False).aggregate(
        [("_row", "min"), ("label", "min"), ("label", "max")]
    )
    codes = np.zeros(n, dtype=np.int8)
    if groups.num_rows == n:  # every row distinct: the common case
        return codes
    first = groups.column("_row_min").to_numpy()
    codes[:] = CODE["duplicate"]
    codes[first] = 0
    conflict = pc.fill_null(pc.not_equal(groups.column("label_min"), groups.column("label_max")), False)
    conflict = conflict.to_numpy(zero_copy_only=False)
    if conflict.any():
        codes[first[conflict]] = CODE["conflicting_label"]
        later = np.flatnonzero(codes == CODE["duplicate"])  # non-first rows: usually few
        if later.size:
            keys = groups.filter(pa.array(conflict)).select(DEDUPE_KEYS)
            hit = t.take(pa.array(later)).join(keys, keys=DEDUPE_KEYS, join_type="left semi")
            codes[hit.column("_row").to_numpy()] = CODE["conflicting_label"]
    return codes
