"""Tokenised (query, ad text) pairs as an Arrow table, cached as Parquet shards.

    features = build_features(table, tokenizer, task_map, max_length=128, cache_dir=Path("runs/demo/features"))
    batch = features.collate(np.array([0, 5, 9]), pad_id=tokenizer.pad_token_id)
    # {"input_ids": (3, Lmax) long, "attention_mask": (3, Lmax) long, "token_type_ids": (3, Lmax) long,
    #  "task_ids": (3,) long, "labels": (3,) float32, "weights": (3,) float32}; Lmax = longest of the three

``table`` holds the canonical columns of ``pipeline.ingest`` (query, title, description, url, label,
scenario, weight). The ad side of each pair is ``ad_text``: "title | description | url", empty parts
skipped. The base model's fast tokenizer encodes pairs in batches, with its pair template or, for a
tokenizer without one, the text pair format (``modeling.pairs``); its ids are flattened into Arrow list
arrays with numpy. The cache key hashes the tokenizer's serialised state (vocabulary, normaliser, special
tokens, template), max_length, the pair format, the task map and the table's values (per-row content
hashes, so chunking does not matter); a hit reads the shards back without tokenising anything.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from kernel.atomic import publish_dir, staging_dir
from kernel.hashing import bytes_digest, stable_hash
from kernel.task_map import TaskMap
from modeling.pairs import PairFormat, encode_pairs, resolve_pair_format

FEATURES_VERSION = 1  # bump when the layout or the ad-text recipe changes: old cache entries are ignored
SHARD_ROWS = 100_000  # rows per cached Parquet shard
AD_FIELDS = ("title", "description", "url")
CONTENT_FIELDS = ("query",) + AD_FIELDS + ("scenario", "label", "weight")


def ad_text(table: pa.Table) -> pa.Array:
    """"title | description | url" per row, skipping empty or missing parts (vectorised)."""
    parts = []
    for name in AD_FIELDS:
        if name in table.column_names:
            col = table.column(name)
            parts.append(pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col))
    if not parts:
        raise KeyError(f"ad_text: the table has none of the columns {AD_FIELDS}")
    out = pc.binary_join_element_wise(*parts, " | ", null_handling="skip")
    out = pc.fill_null(out, "")
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


class FeatureSet:
    """Token ids per row (``input_ids`` list<int32>, optional ``token_type_ids`` list<int8>) with
    ``length``, ``task_id``, ``label`` (float32; NaN when unlabelled) and ``weight``."""

    def __init__(self, table: pa.Table):
        self.table = table.combine_chunks()
        self._ids = self._flat("input_ids")
        self._types = self._flat("token_type_ids") if "token_type_ids" in self.table.column_names else None
        self._task_ids = self._column("task_id", np.int64)
        self._lengths = self._column("length", np.int64)
        self._labels = self._column("label", np.float32)
        self._weights = self._column("weight", np.float32)

    def _column(self, name: str, dtype: type) -> np.ndarray:
        col = self.table.column(name)
        return pc.fill_null(col, np.nan).to_numpy().astype(dtype) if col.null_count else col.to_numpy().astype(dtype)

    def _flat(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(offsets (n+1,) int64, values) of a list column: row i is values[offsets[i]:offsets[i+1]]."""
        col = self.table.column(name)
        arr = col.chunk(0) if col.num_chunks else pa.array([], col.type)
        return arr.offsets.to_numpy().astype(np.int64), arr.values.to_numpy()

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def task_ids(self) -> np.ndarray:
        return self._task_ids

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def _padded(self, flat: tuple[np.ndarray, np.ndarray], idx: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
        offsets, values = flat
        starts, lens = offsets[idx], offsets[idx + 1] - offsets[idx]
        width = int(lens.max()) if len(idx) else 0
        mask = np.arange(width)[None, :] < lens[:, None]  # (b, Lmax): True on real tokens, right-padded
        out = np.full((len(idx), width), pad, dtype=np.int64)
        # Flat positions of every real token, row by row (the row-major order of mask's True cells).
        first = np.cumsum(lens) - lens
        out[mask] = values[np.repeat(starts - first, lens) + np.arange(int(lens.sum()))]
        return out, mask

    def collate(self, indices: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        ids, mask = self._padded(self._ids, idx, pad_id)
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if self._types is not None:
            batch["token_type_ids"] = torch.from_numpy(self._padded(self._types, idx, 0)[0])
        batch["task_ids"] = torch.from_numpy(self._task_ids[idx])
        batch["labels"] = torch.from_numpy(self._labels[idx])
        batch["weights"] = torch.from_numpy(self._weights[idx])
        return batch


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids: the fast tokenizer's full JSON state (or the vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for transient in ("truncation", "padding"):  # set by each call's arguments, not part of the vocabulary
            state.pop(transient, None)
        vocabulary = json.dumps(state, sort_keys=True)
    else:
        vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps([tokenizer.special_tokens_map, list(tokenizer.model_input_names)], sort_keys=True,
                         default=str)
    return bytes_digest([type(tokenizer).__name__, vocabulary, special])


def table_fingerprint(table: pa.Table) -> str:
    """sha256 over the per-row content hashes of the content columns (one column at a time): depends on the
    values only, not on chunking, buffer layout or how the table was read."""
    cols = [c for c in CONTENT_FIELDS if c in table.column_names]
    header = json.dumps([cols, table.num_rows])
    return bytes_digest(itertools.chain([header], (stable_hash(table.column(name)).tobytes() for name in cols)), 32)


def cache_key(table: pa.Table, tokenizer, task_map: TaskMap, max_length: int, fmt: PairFormat) -> str:
    parts = [str(FEATURES_VERSION), tokenizer_fingerprint(tokenizer), str(max_length), json.dumps(task_map.names),
             table_fingerprint(table), json.dumps(fmt.describe(), sort_keys=True)]
    return bytes_digest("\n".join(parts), 24)


def _tokenize(table: pa.Table, tokenizer, task_map: TaskMap, max_length: int, batch_size: int,
              fmt: PairFormat) -> pa.Table:
    with_types = "token_type_ids" in tokenizer.model_input_names
    queries, ads = table.column("query").combine_chunks(), ad_text(table)
    ids, types, lengths = [], [], []
    for start in range(0, table.num_rows, batch_size):
        enc_ids, enc_types = encode_pairs(tokenizer, queries.slice(start, batch_size).to_pylist(),
                                          ads.slice(start, batch_size).to_pylist(), max_length, fmt, with_types)
        lens = np.fromiter(map(len, enc_ids), dtype=np.int64, count=len(enc_ids))
        total = int(lens.sum())
        ids.append(np.fromiter(itertools.chain.from_iterable(enc_ids), dtype=np.int32, count=total))
        if with_types:
            types.append(np.fromiter(itertools.chain.from_iterable(enc_types), dtype=np.int8, count=total))
        lengths.append(lens)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    cols = {"input_ids": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(ids) if ids else [], pa.int32()))}
    if with_types:
        cols["token_type_ids"] = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(types) if types else [],
                                                                             pa.int8()))
    label = table.column("label") if "label" in table.column_names else pa.nulls(table.num_rows, pa.int8())
    weight = table.column("weight") if "weight" in table.column_names else pa.array(np.ones(table.num_rows, np.float32))
    cols["length"] = pa.array(lens.astype(np.int32))
    cols["task_id"] = pa.array(task_map.ids(table.column("scenario")).astype(np.int32))
    cols["label"] = pc.cast(label, pa.float32())
    cols["weight"] = pc.cast(weight, pa.float32())
    return pa.table(cols)


def _read_cache(folder: Path) -> pa.Table | None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    shards = json.loads(manifest.read_text())["shards"]
    return pa.concat_tables([pq.read_table(folder / s) for s in shards])


def _write_cache(folder: Path, table: pa.Table) -> None:
    """Shards and manifest into a staging folder, published whole (a concurrent writer of the same key wins)."""
    with staging_dir(folder) as stage:
        shards = []
        for i, start in enumerate(range(0, max(table.num_rows, 1), SHARD_ROWS)):
            name = f"part-{i:05d}.parquet"
            pq.write_table(table.slice(start, SHARD_ROWS), stage / name)
            shards.append(name)
        (stage / "manifest.json").write_text(json.dumps({"rows": table.num_rows, "shards": shards}, indent=2))
        publish_dir(stage, folder, replace=False)


def build_features(table: pa.Table, tokenizer, task_map: TaskMap, max_length: int, cache_dir: Path | None = None,
                   batch_size: int = 1000, pair_format: PairFormat | str = "auto") -> FeatureSet:
    """Tokenise ``table``'s (query, ad text) pairs, or load them from ``cache_dir`` when cached.

    ``pair_format``: a resolved ``PairFormat`` or a kind for ``resolve_pair_format`` (modeling.pairs)."""
    fmt = pair_format if isinstance(pair_format, PairFormat) else resolve_pair_format(tokenizer, pair_format)
    folder = Path(cache_dir) / cache_key(table, tokenizer, task_map, max_length, fmt) if cache_dir is not None else None
    if folder is not None:
        cached = _read_cache(folder)
        if cached is not None:
            return FeatureSet(cached)
    features = _tokenize(table, tokenizer, task_map, max_length, batch_size, fmt)
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _write_cache(folder, features)
    return FeatureSet(features)
