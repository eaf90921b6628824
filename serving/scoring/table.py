"""In-process scoring of a table: the export's calibration fit, monitoring, promotion, the pyfunc.

    scored = score_table("models:/ads-relevance@champion", table, tracking_uri=uri)   # canonical columns
    scored = score_chunks(scorer, table, chunk_rows)                                  # with a BatchScorer
    scored = score_user_rows(scorer, cfg.data, table, chunk_rows)   # the user's columns, as serving.score reads
    scorer = scorer_for(export_dir, cfg.serving, "ads-relevance/3")   # this process's model, loaded once

The rows keep their order and count; the model is the export's, with the export's own config.

One model per process: ``scorer_for`` keeps the last BatchScorer it built, keyed on everything that decides
its scores (the folder, its export digest, the version the scores carry, every serving setting), so a
caller that asks again (MLflow loading the pyfunc for every Spark task, monitoring scoring twice) reuses
the weights already in memory. With ``ADS_RELEVANCE_LOAD_LOG=<file>`` set, each model load (and each
pyfunc load and predict call) appends one JSON line to that file ({"event", "pid", "host", "export", ...}):
where and how often a fleet of workers loads its models.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from kernel.config import DataConfig, ServingConfig, load_config
from pipeline.validate import canonicalize_table
from serving.layout import read_manifest
from serving.registry.cache import resolve_model
from serving.scoring.scorer import QUARANTINED, BatchScorer

LOAD_LOG_ENV = "ADS_RELEVANCE_LOAD_LOG"
_SCORERS: dict[tuple, BatchScorer] = {}


def log_event(event: str, **fields) -> None:
    """One JSON line in $ADS_RELEVANCE_LOAD_LOG (when set): ``event``, this process, the time, ``fields``.
    Lines are appended whole (one write of a line under O_APPEND), so many processes may share the file."""
    path = os.environ.get(LOAD_LOG_ENV)
    if path:
        line = json.dumps({"event": event, "pid": os.getpid(), "host": socket.gethostname(),
                           "time": round(time.time(), 3), **fields}, default=str) + "\n"
        with open(path, "a") as f:
            f.write(line)


def scorer_for(export_dir: str | Path, serving: ServingConfig, version: str) -> BatchScorer:
    """This process's BatchScorer for ``export_dir`` with ``serving``, scores carrying ``version``: built (the
    weights read) only when the last one built differs in any of these or in the folder's export digest."""
    folder = Path(export_dir).resolve()
    key = (str(folder), read_manifest(folder)["model_version"], version,
           json.dumps(dataclasses.asdict(serving), sort_keys=True, default=str))
    if key not in _SCORERS:
        _SCORERS.clear()  # keep one model in memory
        t0 = time.time()
        _SCORERS[key] = BatchScorer(folder, serving, version)
        log_event("model_loaded", export=str(folder), version=version, seconds=round(time.time() - t0, 3))
    return _SCORERS[key]


def score_chunks(scorer: BatchScorer, table: pa.Table, chunk_rows: int) -> pa.Table:
    """Every row of ``table`` scored by ``scorer.score_all``, ``chunk_rows`` at a time, in input order."""
    parts = [scorer.score_all(table.slice(i, chunk_rows)) for i in range(0, table.num_rows, chunk_rows)]
    return pa.concat_tables(parts) if parts else scorer.score_all(table)


def score_table(model: str | Path, table: pa.Table, tracking_uri: str | None = None,
                calibrate: bool | None = None) -> pa.Table:
    """``table`` (canonical columns: query, title, ..., scenario) with scored_as, fallback, score (float32
    probability), model_version, query_len and title_len appended; row order and count are kept. Rows of an
    unknown scenario get a null score unless the model's config routes them to a fallback scenario.
    ``calibrate`` overrides serving.calibrate. The loaded model is kept for the next call (``scorer_for``)."""
    export_dir, version = resolve_model(model, tracking_uri)
    cfg = load_config(export_dir / "config.yaml")
    if calibrate is not None:
        cfg.serving.calibrate = calibrate
    return score_chunks(scorer_for(export_dir, cfg.serving, version), table, cfg.serving.chunk_rows)


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
