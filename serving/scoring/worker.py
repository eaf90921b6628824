"""One worker's share of a batch-scoring job: the input files planned into units, each unit scored into its
own files.

    data = Inputs(cfg, ["traffic/"])             # every file's columns checked against data.columns up front
    data.units                                   # row-group runs of each file (serving.unit_rows), in order
    run_worker(cfg, export_dir, "ads-relevance/3", ["traffic/"], out, resume=True, rank=0, world=1)
    score_unit(scorer, data, data.units[7], out)   # one unit: output + quarantine, then its marker

Inputs are read with ingestion's column mapping and validation (pipeline.reader, pipeline.validate); files
written by ingestion itself are read with the identity mapping. A unit's output, its quarantine and its
marker are written atomically (serving.scoring.outputs), so every engine (one process, local workers, Ray actors)
runs the same ``score_unit`` on the same units, and resumes exactly.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernel import storage
from kernel.config import Config
from kernel.errors import ConfigError
from pipeline.reader import ParquetSource, build_filter
from pipeline.validate import ColumnMapping, quarantine_schema
from serving.scoring import outputs as sh
from serving.scoring.scorer import BatchScorer

# The scored output after the pass-through keys (documented in README.md, "Scoring output"):
OUTPUT_FIXED = [
    ("source_file", pa.string()),       # the input file of the row
    ("source_row", pa.int64()),         # its row number in that file
    ("scenario", pa.string()),          # as read
    ("scored_as", pa.string()),         # the scenario whose weights scored it (differs with fallback)
    ("fallback", pa.bool_()),           # scored as serving.fallback_scenario
    ("score", pa.float32()),            # the served probability: score_calibrated with serving.calibrate, else score_raw
    ("score_raw", pa.float32()),        # sigmoid(logit)
    ("score_calibrated", pa.float32()),  # per-scenario calibration of score_raw; null without calibration.json
    ("decision", pa.bool_()),           # score_calibrated >= the scenario's threshold; null without one
    ("label", pa.int8()),               # 0/1 when the input had a usable label, else null
    ("label_invalid", pa.bool_()),      # a label value was present but unusable
    ("model_version", pa.string()),     # the registry's name/version (or the export's digest)
    ("query_len", pa.int32()),          # characters (drift monitoring)
    ("title_len", pa.int32()),
]


def output_schema(key_types: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(key_types.items()) + OUTPUT_FIXED)


# Columns that only ingestion's output has together: such input is read with the identity mapping.
INGESTED_SIGNATURE = {"query", "title", "description", "url", "label", "scenario", "weight", "source_file",
                      "source_row", "truncated"}


class Inputs:
    """The input files (shards) and their units, with ingestion's column mapping checked against every file
    up front. ``units`` is the job's plan: the same for every worker, engine and resume (serving.scoring.outputs).

    Files written by ingestion (all of INGESTED_SIGNATURE present) are already canonical and are read with
    the identity mapping; anything else goes through ``data.columns``.
    """

    def __init__(self, cfg: Config, inputs: list[str]):
        self.filter = build_filter(cfg.data.filters)
        parts = []
        for item in inputs:  # local paths or object-store URIs; traffic/market=us keeps market=us in the layout
            parts.extend(ParquetSource.open(item if storage.is_uri(item) else Path(item).resolve()).parts(self.filter))
        data = cfg.data
        self.canonical = bool(parts) and all(INGESTED_SIGNATURE <= set(p.schema.names) for p in parts)
        if self.canonical:  # ingestion's own output (e.g. <work_dir>/data/test.parquet): identity mapping
            data = dataclasses.replace(data, columns=dataclasses.replace(
                data.columns, query="query", title="title", description="description", url="url", label="label",
                label_threshold=None, scenario="scenario", scenario_from_partition=None, scenario_constant=None,
                weight="weight"))
        # scenarios=[]: ingestion accepts every scenario; unknown ones are routed here (fallback/quarantine).
        self.mapping = ColumnMapping(data, scenarios=[], require_label=False)
        self.mapping.check_parts(parts)
        self.parts = parts
        # Each output keeps its input's folders (hive partitions such as market=us/day=1) below --output.
        self.shards = [sh.Shard(i, Path(p.path), p.rel_dir) for i, p in enumerate(parts)]
        if cfg.serving.unit_rows < 1:
            raise ConfigError(f"serving.unit_rows: must be >= 1, got {cfg.serving.unit_rows}")
        # Rows of every row group of each file, from the footers read above (FilePart's row starts cover all
        # of the file's groups, pruned or not): the plan does not depend on data.filters.
        group_rows = [np.diff(p._row_starts).tolist() for p in parts]
        self.units = sh.plan_units(self.shards, group_rows, cfg.serving.unit_rows)
        self.batch_rows = cfg.data.batch_rows
        self.schema = output_schema(self.mapping.key_types)
        self.quarantine_schema = quarantine_schema(self.mapping.keys)

    def rows(self, unit: sh.Unit) -> int:
        return unit.num_rows

    def batches(self, unit: sh.Unit):
        """(accepted canonical batch, quarantined batch, rows read) of one unit, streamed in input order.

        The unit's file part keeps only the unit's row groups (of those data.filters left); row numbers
        stay the file's own, so source_row is the row's number inside its file.
        """
        whole = self.parts[unit.shard.index]
        part = dataclasses.replace(whole, row_groups=[g for g in whole.row_groups
                                                      if unit.first_group <= g < unit.end_group])
        for batch, rows in part.batches(self.mapping.read_columns(), self.batch_rows, self.filter):
            accepted, quarantined = self.mapping.canonicalize(batch, rows, part)
            yield accepted, quarantined, batch.num_rows

    def to_quarantine(self, table: pa.Table, reason: str, column: str = "") -> pa.Table:
        """Accepted-schema rows -> quarantine rows (values as strings) with ``reason`` and ``column``."""
        cols = {}
        for f in self.quarantine_schema:
            if f.name in ("reason", "column"):
                value = reason if f.name == "reason" else column
                cols[f.name] = pa.repeat(pa.scalar(value, pa.string()), table.num_rows)
            else:
                cols[f.name] = pc.cast(table.column(f.name), f.type)
        return pa.table(cols, schema=self.quarantine_schema)


def score_unit(scorer: BatchScorer, inputs: Inputs, unit: sh.Unit, out: Path, progress=None) -> dict:
    """Score one unit into its output + quarantine files (atomically), then write its marker; the summary.

    Whatever an earlier attempt left of the unit is removed first, so a unit that is redone (resume, a
    retried Ray task) ends with exactly one score per row. The marker records the process that scored it.
    """
    t0 = time.time()
    sh.clear_unit(out, unit)
    writer = sh.ShardWriter(sh.output_path(out, unit), inputs.schema)
    quarantine = sh.ShardWriter(sh.quarantine_path(out, unit), inputs.quarantine_schema)
    counts = Counter()
    reasons = Counter()
    pending: list[pa.RecordBatch] = []

    def flush() -> None:
        table = pa.Table.from_batches(pending).combine_chunks()
        pending.clear()
        for start in range(0, table.num_rows, scorer.serving.chunk_rows):
            scored, unknown = scorer.score(table.slice(start, scorer.serving.chunk_rows))
            writer.write(scored)
            counts["scored"] += scored.num_rows
            counts["fallback"] += int(pc.sum(scored.column("fallback")).as_py() or 0)
            if unknown.num_rows:
                quarantine.write(inputs.to_quarantine(unknown, "unknown_scenario", inputs.mapping.scenario_column))
                reasons["unknown_scenario"] += unknown.num_rows
            if progress is not None:
                progress.update(scored.num_rows + unknown.num_rows)

    try:
        buffered = 0
        for accepted, rejected, n in inputs.batches(unit):
            counts["rows_in"] += n
            if rejected.num_rows:
                quarantine.write(pa.Table.from_batches([rejected]))
                reasons.update(rejected.column("reason").to_pylist())
                if progress is not None:
                    progress.update(rejected.num_rows)
            if accepted.num_rows:
                pending.append(accepted)
                buffered += accepted.num_rows
            if buffered >= scorer.serving.chunk_rows:
                flush()
                buffered = 0
        if pending:
            flush()
    except BaseException:
        writer.abort()
        quarantine.abort()
        raise
    quarantine.commit()
    writer.commit()
    summary = {"rows_in": counts["rows_in"], "scored": counts["scored"], "fallback": counts["fallback"],
               "quarantined": sum(reasons.values()), "by_reason": dict(reasons),
               "model_version": scorer.model_version, "pid": os.getpid(), "host": socket.gethostname(),
               "started": round(t0, 3), "seconds": round(time.time() - t0, 3)}
    sh.mark_done(out, unit, summary)
    return summary


def _progress(total: int, rank: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr, disable=quiet, position=rank,
                desc=f"scoring[{rank}]" if rank else "scoring", mininterval=1.0, dynamic_ncols=True)


def run_worker(cfg: Config, export_dir: Path, model_version: str, inputs: list[str], out: Path, resume: bool,
               rank: int = 0, world: int = 1, quiet: bool = False) -> list[dict]:
    """Score this worker's units (ordinal % world == rank); finished ones are skipped with ``resume``."""
    data = Inputs(cfg, inputs)
    mine = sh.units_for_rank(data.units, rank, world)
    todo = [u for u in mine if not (resume and sh.is_done(out, u, model_version))]
    if not todo:
        return []
    scorer = BatchScorer(export_dir, cfg.serving, model_version)
    results = []
    with _progress(sum(data.rows(u) for u in todo), rank, quiet) as bar:
        for unit in todo:
            results.append(score_unit(scorer, data, unit, out, bar))
    return results
