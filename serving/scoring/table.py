"""In-process scoring of a table: the export's calibration fit, monitoring, promotion, the pyfunc.

    scored = score_table("models:/ads-relevance@champion", table, tracking_uri=uri)   # canonical columns
    scored = score_chunks(scorer, table, chunk_rows)                                  # with a BatchScorer
    scored = score_user_rows(scorer, cfg.data, table, chunk_rows)   # the user's columns, as serving.score reads

The rows keep their order and count; the model is the export's, with the export's own config.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from kernel.config import DataConfig, load_config
from pipeline.validate import canonicalize_table
from serving.registry.cache import resolve_model
from serving.scoring.scorer import QUARANTINED, BatchScorer

_SCORERS: dict[tuple, BatchScorer] = {}


def score_chunks(scorer: BatchScorer, table: pa.Table, chunk_rows: int) -> pa.Table:
    """Every row of ``table`` scored by ``scorer.score_all``, ``chunk_rows`` at a time, in input order."""
    parts = [scorer.score_all(table.slice(i, chunk_rows)) for i in range(0, table.num_rows, chunk_rows)]
    return pa.concat_tables(parts) if parts else scorer.score_all(table)


def score_table(model: str | Path, table: pa.Table, tracking_uri: str | None = None,
                calibrate: bool | None = None) -> pa.Table:
    """``table`` (canonical columns: query, title, ..., scenario) with scored_as, fallback, score (float32
    probability), model_version, query_len and title_len appended; row order and count are kept. Rows of an
    unknown scenario get a null score unless the model's config routes them to a fallback scenario.
    ``calibrate`` overrides serving.calibrate. The loaded model is cached per (folder, version, options)."""
    export_dir, version = resolve_model(model, tracking_uri)
    cfg = load_config(export_dir / "config.yaml")
    if calibrate is not None:
        cfg.serving.calibrate = calibrate
    key = (str(Path(export_dir).resolve()), version, cfg.serving.calibrate, cfg.serving.engine, cfg.serving.precision,
           cfg.serving.unknown_scenario, cfg.serving.fallback_scenario)
    if key not in _SCORERS:
        _SCORERS.clear()  # keep one model in memory
        _SCORERS[key] = BatchScorer(export_dir, cfg.serving, version)
    return score_chunks(_SCORERS[key], table, cfg.serving.chunk_rows)


def score_user_rows(scorer: BatchScorer, data: DataConfig, table: pa.Table, chunk_rows: int) -> pa.Table:
    """Rows in the user's own columns (``data.columns``, as ``serving.score`` reads a file), every one scored
    or told why not, in input order: the scorer's columns for rows that pass the mapping's checks, and
    status "quarantined" with ingestion's ``reason`` (e.g. empty_query) and null scores for those that do
    not. Rows of an unknown scenario are the scorer's: the configured fallback, else quarantined."""
    accepted, rejected = canonicalize_table(data, table)
    scored = score_chunks(scorer, accepted, chunk_rows)
    n = table.num_rows
    where = np.full(n, -1, dtype=np.int64)  # input row -> its row in ``scored`` (-1: rejected by the checks)
    where[accepted.column("source_row").to_numpy()] = np.arange(accepted.num_rows)
    take = pa.array(np.maximum(where, 0), mask=where < 0)
    out = {name: (scored.column(name).take(take) if scored.num_rows else pa.nulls(n, scored.schema.field(name).type))
           for name in scored.column_names}
    if len(rejected):
        rows = rejected.column("source_row").to_numpy()
        status = np.asarray(out["status"].to_pylist(), dtype=object)
        reason = np.asarray(out["reason"].to_pylist(), dtype=object)
        status[rows], reason[rows] = QUARANTINED, rejected.column("reason").to_numpy(zero_copy_only=False)
        out["status"], out["reason"] = pa.array(status.tolist(), pa.string()), pa.array(reason.tolist(), pa.string())
    out["model_version"] = pa.repeat(pa.scalar(scorer.model_version, pa.string()), n)
    return pa.table(out)
