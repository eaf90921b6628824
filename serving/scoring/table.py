"""In-process scoring of a canonical table: the export's calibration fit, monitoring, promotion, the pyfunc.

    scored = score_table("models:/ads-relevance@champion", table, tracking_uri=uri)   # or an export folder
    scored = score_chunks(scorer, table, chunk_rows)                                  # with a BatchScorer

The rows keep their order and count; the model is the export's, with the export's own config.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from kernel.config import load_config
from serving.registry.cache import resolve_model
from serving.scoring.scorer import BatchScorer

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
