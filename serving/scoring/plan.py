"""What a scoring job scores: its input files, checked up front, planned into units of whole row groups.

    plan = Inputs(cfg, ["traffic/"])            # every file's columns checked against data.columns up front
    plan.units                                   # row-group runs of each file (serving.unit_rows), in order
    units_for_rank(plan.units, rank, world)      # disjoint across workers (ordinal % world)
    for accepted, quarantined, n in plan.batches(unit): ...   # one unit's rows, canonical, in input order

A shard is one input file; a unit is a run of whole row groups of one shard ([first_group, end_group)),
packed up to ``serving.unit_rows`` rows (a larger row group is a unit alone; a file of one row group is one
unit). Units are planned from the files' footers alone, so every worker, engine and resume sees the same
units. Inputs are read with ingestion's column mapping and validation (pipeline.reader, pipeline.validate);
files written by ingestion itself are read with the identity mapping.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernel import storage
from kernel.config import Config, ServingConfig
from kernel.errors import ConfigError
from pipeline.reader import ParquetSource, Unreadable, build_filter
from pipeline.validate import ColumnMapping, empty_batch, quarantine_schema

UNREADABLE = "unreadable"  # the quarantine reason of rows whose data page could not be read

# Columns that only ingestion's output has together: such input is read with the identity mapping.
INGESTED_SIGNATURE = {"query", "title", "description", "url", "label", "scenario", "weight", "source_file",
                      "source_row", "truncated"}


def check_serving_limits(serving: ServingConfig) -> None:
    """The serving values that need no model: sizes >= 1, the quarantine-rate gate in [0, 1]."""
    for name in ("batch_size", "chunk_rows"):
        if getattr(serving, name) < 1:
            raise ConfigError(f"serving.{name}: must be >= 1, got {getattr(serving, name)}")
    if not 0 <= serving.max_quarantine_rate <= 1:
        raise ConfigError(f"serving.max_quarantine_rate: must be in [0, 1], got {serving.max_quarantine_rate}")


@dataclass(frozen=True)
class Shard:
    """One input file, indexed in the job's (sorted) file order."""

    index: int
    path: Path
    rel_dir: str = ""  # the input file's folders below its input root ("" for a file given directly)
    identity: dict = dataclasses.field(default_factory=dict, compare=False)  # FilePart.identity(): path, size, ...

    @property
    def prefix(self) -> str:
        """What every output name of this file starts with: its units' names, and the one name per file
        of the layout before units (``part-00003-<stem>``)."""
        return f"part-{self.index:05d}-"


@dataclass(frozen=True)
class Unit:
    """The unit of work: row groups [first_group, end_group) of one input file, scored into its own files.

    ``first_row``/``num_rows`` are the file's row numbers those groups hold (before data.filters);
    ``ordinal`` is the unit's place among all the job's units (the order of files, then of row groups),
    which spreads units over workers (``ordinal % world == rank``) and names Ray's work items.
    """

    shard: Shard
    index: int  # within its file: 0, 1, ...
    ordinal: int
    first_group: int
    end_group: int
    first_row: int
    num_rows: int

    @property
    def path(self) -> Path:
        return self.shard.path

    @property
    def rel_dir(self) -> str:
        return self.shard.rel_dir

    @property
    def name(self) -> str:
        return f"{self.shard.prefix}{self.index:04d}-{self.shard.path.stem}"

    def extent(self) -> dict:
        """What of its file the unit covers; recorded in its marker and compared on resume."""
        return {"row_groups": [self.first_group, self.end_group],
                "rows": [self.first_row, self.first_row + self.num_rows]}


def plan_units(shards: list[Shard], group_rows: list[list[int]], unit_rows: int) -> list[Unit]:
    """Every file's row groups (``group_rows[i]``: the rows of each row group of ``shards[i]``, all of them,
    from the footer) packed in order into units of at most ``unit_rows`` rows; a row group is never split
    (one larger than ``unit_rows`` is a unit alone). A file without row groups is one empty unit.

    Only footers decide the plan (not data.filters, which prune row groups at read time), so the same
    inputs and ``unit_rows`` give the same units to every worker and every resume.
    """
    if unit_rows < 1:
        raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
    units: list[Unit] = []
    for shard, sizes in zip(shards, group_rows, strict=True):
        if not sizes:
            units.append(Unit(shard, 0, len(units), 0, 0, 0, 0))
            continue
        first, start_row, k = 0, 0, 0
        while first < len(sizes):
            end, rows = first + 1, sizes[first]
            while end < len(sizes) and rows + sizes[end] <= unit_rows:
                rows += sizes[end]
                end += 1
            units.append(Unit(shard, k, len(units), first, end, start_row, rows))
            first, start_row, k = end, start_row + rows, k + 1
    return units


def units_for_rank(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """This worker's units: round robin over the job's units, so one large file spreads over workers too."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    return [u for u in units if u.ordinal % world == rank]


class Inputs:
    """The input files (shards) and their units, with ingestion's column mapping checked against every file
    up front. ``units`` is the job's plan: the same for every worker, engine and resume.

    Files written by ingestion (all of INGESTED_SIGNATURE present) are already canonical and are read with
    the identity mapping; anything else goes through ``data.columns``.
    """

    def __init__(self, cfg: Config, inputs: list[str]):
        check_serving_limits(cfg.serving)
        self.filter = build_filter(cfg.data.filters)
        parts, problems = [], []  # every input's problems (missing, unreadable, columns) reported at once
        self.roots = []  # the inputs as given, resolved and spelt as the files' paths are (Shard.path)
        for item in inputs:  # local paths or object-store URIs; traffic/market=us keeps market=us in the layout
            item = item if storage.is_uri(item) else Path(item).resolve()
            self.roots.append(str(Path(str(item).rstrip("/"))))
            source = ParquetSource.open(item, problems=problems)
            if source is not None:
                parts.extend(source.parts(self.filter))
        data = cfg.data
        self.canonical = bool(parts) and all(INGESTED_SIGNATURE <= set(p.schema.names) for p in parts)
        if self.canonical:  # ingestion's own output (e.g. <work_dir>/data/test.parquet): identity mapping
            data = dataclasses.replace(data, columns=dataclasses.replace(
                data.columns, query="query", title="title", description="description", url="url", label="label",
                label_threshold=None, scenario="scenario", scenario_from_partition=None, scenario_constant=None,
                weight="weight"))
        # scenarios=[]: ingestion accepts every scenario; unknown ones are routed here (fallback/quarantine).
        self.mapping = ColumnMapping(data, scenarios=[], require_label=False)
        self.mapping.check_parts(parts, problems)
        self.parts = parts
        # Each output keeps its input's folders (hive partitions such as market=us/day=1) below --output.
        self.shards = [Shard(i, Path(p.path), p.rel_dir, p.identity()) for i, p in enumerate(parts)]
        if cfg.serving.unit_rows < 1:
            raise ConfigError(f"serving.unit_rows: must be >= 1, got {cfg.serving.unit_rows}")
        # Rows of every row group of each file, from the footers read above (FilePart's row starts cover all
        # of the file's groups, pruned or not): the plan does not depend on data.filters.
        group_rows = [np.diff(p._row_starts).tolist() for p in parts]
        self.units = plan_units(self.shards, group_rows, cfg.serving.unit_rows)
        self.batch_rows = cfg.data.batch_rows
        self.quarantine_schema = quarantine_schema(self.mapping.keys)

    def batches(self, unit: Unit, unreadable: list[Unreadable] | None = None):
        """(accepted canonical batch, quarantined batch, rows read) of one unit, streamed in input order.

        The unit's file part keeps only the unit's row groups (of those data.filters left); row numbers
        stay the file's own, so source_row is the row's number inside its file. With ``unreadable`` (a
        list), a row group whose data cannot be read is appended to it and its unread rows come out as
        quarantined rows with reason ``unreadable`` (values null); without it, DataError.
        """
        whole = self.parts[unit.shard.index]
        part = dataclasses.replace(whole, row_groups=[g for g in whole.row_groups
                                                      if unit.first_group <= g < unit.end_group])
        lost: list[Unreadable] = []
        for batch, rows in part.batches(self.mapping.read_columns(), self.batch_rows, self.filter,
                                        unreadable=None if unreadable is None else lost.append):
            accepted, quarantined = self.mapping.canonicalize(batch, rows, part)
            yield accepted, quarantined, batch.num_rows
            yield from self._drain(lost, unreadable, part.path)
        yield from self._drain(lost, unreadable, part.path)

    def _drain(self, lost: list[Unreadable], into: list[Unreadable] | None, path: str):
        """Quarantine rows (reason ``unreadable``) for the row groups that could not be read, batch_rows at a time."""
        while lost:
            gone = lost.pop(0)
            into.append(gone)
            for start in range(gone.first_row, gone.end_row, self.batch_rows):
                rows = pa.array(np.arange(start, min(start + self.batch_rows, gone.end_row), dtype=np.int64))
                cols = {f.name: pa.nulls(len(rows), f.type) for f in self.quarantine_schema}
                cols.update(reason=pa.repeat(pa.scalar(UNREADABLE, pa.string()), len(rows)),
                            column=pa.repeat(pa.scalar("", pa.string()), len(rows)),
                            source_file=pa.repeat(pa.scalar(str(path), pa.string()), len(rows)), source_row=rows)
                batch = pa.RecordBatch.from_pydict(cols, schema=self.quarantine_schema)
                yield empty_batch(self.mapping.schema()), batch, len(rows)

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
