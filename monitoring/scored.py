"""Batch scoring's output as monitoring reads it: validated numpy columns, its model version, quarantine size.

    cols = read_scored("runs/demo/scores", keys=True)   # {"scenario", "score", "label", "query_len", ...}
    scored_model_version("runs/demo/scores")            # "ads-relevance/3", or None when not one value
    count_rows("runs/demo/scores/_quarantine")

Input: a Parquet file or folder (hive partitions allowed; local or a URI), opened with
``pipeline.reader.ParquetSource`` like every Parquet input of the project, with columns ``scenario``
(string), ``score`` (probability), optionally ``label`` (0/1, nulls allowed: those rows only count for
drift) and ``query``, ``title`` (their lengths in characters are profiled; ``query_len`` and ``title_len``
columns are used instead when present). Folders and files whose names start with "_" or "." are not read as
scores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernel.errors import DataError
from pipeline.reader import ParquetSource

QUARANTINE_DIR = "_quarantine"  # batch scoring writes its rejected rows here, inside the output folder
ROW_KEY = ("source_file", "source_row")  # written by batch scoring: a row's input file and its position there


def read_scored(path: str | Path, keys: bool = False) -> dict[str, np.ndarray | None]:
    """Columns as numpy arrays: scenario, score, label (float, NaN = unlabelled; None if absent), query_len,
    title_len (None if absent); with ``keys`` also source_file (str) and source_row (int64), the row key
    that batch scoring writes (required then, nulls refused). Validated per file so errors name the file,
    the column and the row."""
    src = ParquetSource.open(path, "scored input")
    dset = src.dataset
    names = set(dset.schema.names)
    required = {"scenario", "score"} | (set(ROW_KEY) if keys else set())
    missing = required - names
    if missing:
        why = f" (the row key {ROW_KEY} that batch scoring writes)" if keys and missing & set(ROW_KEY) else ""
        raise DataError(f"{path}: scored input lacks columns {sorted(missing)}{why} (has {sorted(names)})")
    proj = {"scenario": pc.field("scenario").cast(pa.string()), "score": pc.field("score").cast(pa.float64())}
    if keys:
        proj["source_file"] = pc.field("source_file").cast(pa.string())
        proj["source_row"] = pc.field("source_row").cast(pa.int64())
    if "label" in names:
        proj["label"] = pc.field("label").cast(pa.float64())
    for col in ("query", "title"):
        if f"{col}_len" in names:  # lengths already computed by the scorer
            proj[f"{col}_len"] = pc.field(f"{col}_len").cast(pa.int64())
        elif col in names:
            proj[f"{col}_len"] = pc.utf8_length(pc.field(col).cast(pa.string()))
    parts = []
    for frag in dset.get_fragments():
        t = frag.to_table(schema=dset.schema, columns=proj)
        where = src.shown(frag.path)
        for col in ("scenario", "score", *(ROW_KEY if keys else ())):
            if t[col].null_count:
                row = pc.index(pc.is_null(t[col]), True).as_py()
                raise DataError(f"{where}: column {col}: {t[col].null_count} nulls (first at row {row})")
        s = t["score"].to_numpy()
        bad = np.flatnonzero(~np.isfinite(s) | (s < 0) | (s > 1))
        if len(bad):
            raise DataError(f"{where}: column score: {len(bad)} values outside [0, 1] "
                            f"(first at row {bad[0]}: {s[bad[0]]})")
        if "label" in proj:
            y = t["label"].to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~np.isnan(y) & (y != 0) & (y != 1))
            if len(bad):
                raise DataError(f"{where}: column label: {len(bad)} values are not 0/1 "
                                f"(first at row {bad[0]}: {y[bad[0]]})")
        parts.append(t)
    t = pa.concat_tables(parts)
    out: dict[str, np.ndarray | None] = {
        "scenario": t["scenario"].to_numpy(zero_copy_only=False).astype(str),
        "score": t["score"].to_numpy(),
    }
    out["label"] = t["label"].to_numpy(zero_copy_only=False) if "label" in proj else None
    for col in ("query_len", "title_len"):
        out[col] = t[col].fill_null(0).to_numpy() if col in proj else None
    if keys:
        out["source_file"] = t["source_file"].to_numpy(zero_copy_only=False).astype(str)
        out["source_row"] = t["source_row"].to_numpy()
    return out


def scored_model_version(path: str | Path) -> str | None:
    """The scored input's ``model_version`` column when it holds exactly one non-null value, else None."""
    dset = ParquetSource.open(path, "scored input").dataset
    if "model_version" not in dset.schema.names:
        return None
    values = pc.unique(dset.to_table(columns={"v": pc.field("model_version").cast(pa.string())})["v"]).drop_null()
    return values[0].as_py() if len(values) == 1 else None


def count_rows(path: str | Path) -> int:
    return ParquetSource.open(path, "quarantine file").num_rows
