"""Units of a batch-scoring job: planning, per-unit outputs written atomically, completion markers.

    units = plan_units(shards, group_rows, unit_rows=50_000)   # row groups of each file, packed into units
    mine = units_for_rank(units, rank, world)                  # disjoint across workers (ordinal % world)
    if not is_done(out, u, version): clear_unit(out, u); ... ShardWriter(output_path(out, u)) ...; mark_done(...)

A shard is one input file; a unit is a run of whole row groups of one shard ([first_group, end_group)),
packed up to ``serving.unit_rows`` rows (a larger row group is a unit alone; a file of one row group is one
unit). Units are planned from the files' footers alone, so every worker, engine and resume sees the same
units. Layout under the output folder (names starting with "_" are skipped by pyarrow dataset discovery,
so ``pyarrow.dataset.dataset(out)`` reads exactly the scores):

    <dirs>/part-00003-0002-<file stem>.parquet          scores of unit 2 of input file 3, in input order
    _quarantine/<dirs>/part-00003-0002-<stem>.parquet   rows of that unit that were not scored, with reason
    _done/part-00003-0002-<stem>.json                   completion marker: counts, row range, model version,
                                                        pid and host of the process that scored it, seconds
    _job/config.yaml                    (--workers N) the resolved config the worker processes read

``<dirs>`` are the input file's folders below its input root (hive partitions such as ``market=us/day=1``
included), so the output keeps the input's layout and ``pyarrow.dataset.dataset(out, partitioning="hive")``
reads the partition values back.

A unit's files are written under temporary names and renamed; the marker is written last. A job killed at
any point leaves either a complete unit (marker present) or one that ``--resume`` redoes from scratch, so
every input row is scored exactly once. A marker only finishes the unit it names when its row-group range
is the planned one (``serving.unit_rows`` unchanged); ``remove_foreign_parts`` deletes a file's parts that
the current plan does not name (another ``unit_rows``, or the one-file-per-input layout before units).

Every file-system access of scoring outputs goes through the functions below (paths, existence, markers,
writers, listing and deletion), so another file system can replace the local one here alone.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kernel import storage
from kernel.atomic import AtomicFile
from kernel.errors import DataError

QUARANTINE_DIR = "_quarantine"
DONE_DIR = "_done"
JOB_DIR = "_job"  # --workers N: the resolved config the child processes read


@dataclass(frozen=True)
class Shard:
    """One input file, indexed in the job's (sorted) file order."""

    index: int
    path: Path
    rel_dir: str = ""  # the input file's folders below its input root ("" for a file given directly)

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


def list_inputs(inputs: list[str | Path] | str | Path) -> list[Path]:
    """Parquet files named directly or found (recursively, sorted) under directories; errors name the path."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.parquet")
                           if not any(part.startswith(("_", ".")) for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"--input {p}: directory holds no .parquet files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"--input {p}: no such file or directory")
    return files


def plan_shards(files: list[Path]) -> list[Shard]:
    """One shard per input file, indexed in the given (sorted) order: stable across runs and workers."""
    return [Shard(i, f) for i, f in enumerate(files)]


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


# Every path below is a local path or an object-store URI (kernel.storage): the output folder may be either.

def _at(out, *parts: str):
    return storage.join(out, *[p for p in parts if p])


def output_path(out, unit: Unit):
    return _at(out, unit.rel_dir, f"{unit.name}.parquet")


def quarantine_path(out, unit: Unit):
    return _at(out, QUARANTINE_DIR, unit.rel_dir, f"{unit.name}.parquet")


def marker_path(out, unit: Unit):
    return _at(out, DONE_DIR, f"{unit.name}.json")


def is_done(out: Path, unit: Unit, model_version: str | None = None) -> bool:
    """Finished: marker and output present, the marker's row-group range is this unit's (a marker of
    another plan, i.e. another serving.unit_rows, does not finish it) and, when ``model_version`` is given,
    scored by that model: a resume with another model rescores the unit rather than mixing two models'
    scores in one output."""
    if not (storage.is_file(marker_path(out, unit)) and storage.is_file(output_path(out, unit))):
        return False
    marker = read_marker(out, unit)
    if marker.get("row_groups") != unit.extent()["row_groups"]:
        return False
    return model_version is None or marker.get("model_version") == model_version


def read_marker(out, unit: Unit) -> dict:
    return storage.read_json(marker_path(out, unit), f"completion marker of {unit.name}")


def mark_done(out: Path, unit: Unit, summary: dict) -> None:
    """The unit's completion marker, written after its output and quarantine are in place (one object on an
    object store, a temporary file renamed locally: either way seen whole or not at all)."""
    storage.write_json(marker_path(out, unit), {"input": str(unit.path), "file": unit.shard.index,
                                                "unit": unit.index, **unit.extent(), **summary})


def clear_unit(out: Path, unit: Unit) -> None:
    """Remove a unit's marker (first: it is no longer finished), output and quarantine; a unit that is
    redone starts from nothing."""
    for p in (marker_path(out, unit), output_path(out, unit), quarantine_path(out, unit)):
        storage.delete(p)


def remove_foreign_parts(out: Path, units: list[Unit]) -> int:
    """Delete the outputs, quarantines and markers of this job's input files that ``units`` do not name;
    returns how many. These are parts of an earlier plan of the same file (another serving.unit_rows, or
    the layout before units: one ``part-00003-<stem>`` per file): left in place, they would hold rows a
    current unit scores again. Only names of this job's files (same index and stem, same folder) are
    touched. Call it from the one process that plans the job, before any unit is scored.
    """
    wanted: dict[int, set[str]] = {}
    shards: dict[int, Shard] = {}
    for u in units:
        wanted.setdefault(u.shard.index, set()).add(u.name)
        shards[u.shard.index] = u.shard
    # Where each file's parts may lie; every folder is listed once (many files share a folder).
    homes: dict[str, set[int]] = {}
    for i, shard in shards.items():
        for folder in (_at(out, shard.rel_dir), _at(out, QUARANTINE_DIR, shard.rel_dir), _at(out, DONE_DIR)):
            homes.setdefault(str(folder), set()).add(i)
    n = 0
    done_folder = str(_at(out, DONE_DIR))
    for folder, files in homes.items():
        suffix = ".json" if folder == done_folder else ".parquet"
        for name in storage.entries(folder):
            if not name.endswith(suffix):
                continue
            stem = name[: -len(suffix)]
            index = _file_index(stem)
            if index in files and stem not in wanted[index] and stem.endswith(f"-{shards[index].path.stem}"):
                storage.delete(storage.join(folder, name))
                n += 1
    return n


def _file_index(stem: str) -> int | None:
    """3 for "part-00003-..." (an output name of file 3), else None."""
    head, sep, _ = stem[len("part-"):].partition("-")
    return int(head) if stem.startswith("part-") and sep and head.isdigit() else None


class ShardWriter:
    """Streams record batches into ``final`` through a local temporary file; ``commit`` puts it in place: a
    rename beside a local ``final``, one upload (one PUT: seen whole or not at all) to an object store.

    With no batch written, ``commit`` writes an empty file of ``schema`` (a unit with zero scored rows
    still gets its output, so readers and ``--resume`` see it as finished).
    """

    def __init__(self, final, schema: pa.Schema):
        self.remote = storage.is_uri(final)
        self.final = final
        if self.remote:
            fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".parquet.tmp")
            os.close(fd)
            self.tmp = Path(tmp)
        else:
            self._file = AtomicFile(final)
            self.final, self.tmp = self._file.final, self._file.tmp
        self.schema = schema
        self.rows = 0
        self._writer = pq.ParquetWriter(self.tmp, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def commit(self):
        self._writer.close()
        if not self.remote:
            return self._file.commit()
        try:
            storage.put_file(self.tmp, self.final)
        finally:
            self.tmp.unlink(missing_ok=True)
        return self.final

    def abort(self) -> None:
        self._writer.close()
        if self.remote:
            self.tmp.unlink(missing_ok=True)
        else:
            self._file.abort()


def holds_results(out: Path) -> bool:
    """Whether ``out`` holds any file a scoring run wrote (a unit's output, quarantine or marker), not
    counting ``_job/`` (the resolved config handed to local workers). False for a missing folder."""
    return any(rel.split("/", 1)[0] != JOB_DIR for rel, _ in storage.files(out))


def remove_stale_temporaries(out: Path) -> int:
    """Delete temporary files left by killed workers (``.part-*.tmp<pid>``); returns how many."""
    n = 0
    if not storage.is_uri(out) and Path(out).is_dir():  # uploads leave no temporaries on an object store
        for p in Path(out).rglob(".part-*.tmp*"):
            p.unlink(missing_ok=True)
            n += 1
    return n
