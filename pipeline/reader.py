"""Stream Parquet files, directories and hive-partitioned datasets (``market=us/part-0.parquet``).

    src = ParquetSource.open("data/")                      # every file's footer is checked up front
    flt = build_filter({"market": ["us", "uk"]})           # an expression built in code, never parsed text
    for part in src.parts(flt):                            # partitions pruned, then row groups by statistics
        for batch, rows in part.batches(["query", "title", "market"], batch_rows=65536, row_filter=flt):
            ...   # batch: pa.RecordBatch; rows: int64 row numbers of those rows inside part.path

Nothing holds more than one record batch: files are read row group by row group. Partition values come
from the path as strings and are appended to a batch when asked for by name. ``key=value`` components at
the end of the input path itself count too: ``traffic/market=us`` (or a file inside it) gives every file
below it ``market=us``, exactly as when ``traffic`` is the input. A file that is not Parquet,
is corrupt, or lacks a filtered column raises DataError / ConfigError naming the file (all at once);
``open(..., problems=[...])`` collects those problems instead, so a caller can add its own checks of the
readable files (columns, types) and report everything in one error.

A data page that cannot be read (a corrupt file whose footer is intact) raises DataError naming the file,
or, when ``batches`` is given ``unreadable``, is reported there and reading goes on with the next row group:

    for batch, rows in part.batches(cols, unreadable=lost.append): ...  # lost: Unreadable(row_group, rows, error)
"""
from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kernel import storage
from kernel.errors import ConfigError, DataError


@dataclass(frozen=True)
class RowFilter:
    """A pushed-down row filter: the expression and the column names it reads."""

    expression: ds.Expression
    columns: tuple[str, ...]


def build_filter(filters: dict[str, list]) -> RowFilter | None:
    """``{"market": ["us", "uk"], "lang": ["en"]}`` -> market in (us, uk) AND lang in (en)."""
    if not filters:
        return None
    expr = None
    for name, values in sorted(filters.items()):
        values = values if isinstance(values, list) else [values]
        term = ds.field(name).isin(values)
        expr = term if expr is None else expr & term
    return RowFilter(expr, tuple(sorted(filters)))


@dataclass(frozen=True)
class Unreadable:
    """Rows of one row group that could not be read: file row numbers [first_row, end_row) and why."""

    row_group: int
    first_row: int
    end_row: int
    error: str

    @property
    def rows(self) -> int:
        return self.end_row - self.first_row


@dataclass
class FilePart:
    """One Parquet file of the source, with its hive partition values and surviving row groups."""

    path: str  # as the user knows it: a local path, or the full URI (s3://bucket/key)
    schema: pa.Schema  # the file's own (physical) schema
    partition: dict[str, str]
    num_rows: int
    row_groups: list[int]
    _row_starts: np.ndarray = field(repr=False)  # first row number of each row group in the file
    filesystem: pafs.FileSystem | None = field(default=None, repr=False)  # None: the local file system
    fs_path: str = ""  # the path inside ``filesystem``
    rel_dir: str = ""  # the file's folders below the input's partition base ("market=us/day=1")
    size: int = -1  # bytes, from the listing (-1: unknown)
    mtime_ns: int = -1  # modification time, from the listing (-1: unknown)

    def identity(self) -> dict:
        """What tells this file from another one at the same path: its size, modification time and rows."""
        return {"path": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns, "rows": self.num_rows}

    def batches(
        self,
        columns: list[str],
        batch_rows: int = 65536,
        row_filter: RowFilter | None = None,
        use_threads: bool = True,
        unreadable: Callable[[Unreadable], None] | None = None,
    ) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
        """Yield (batch, row numbers). ``columns`` may name file columns and partition keys.

        A row group whose data cannot be read raises DataError naming the file; with ``unreadable``, the
        rows of it not yet yielded are passed to it instead (before data.filters: they cannot be read to be
        filtered) and reading goes on with the next row group."""
        wanted = list(dict.fromkeys(list(columns) + list(row_filter.columns if row_filter else ())))
        file_cols = [c for c in wanted if c in self.schema.names]
        part_cols = [c for c in wanted if c not in self.schema.names and c in self.partition]
        try:
            pf = pq.ParquetFile(self.fs_path or self.path, filesystem=self.filesystem)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.path}: cannot read Parquet data ({e})") from e
        for rg in self.row_groups:
            first, end = int(self._row_starts[rg]), int(self._row_starts[rg + 1])
            try:
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=file_cols,
                                             use_threads=use_threads):
                    rows = np.arange(first, first + batch.num_rows, dtype=np.int64)
                    first += batch.num_rows
                    for name in part_cols:
                        batch = batch.append_column(name, pa.repeat(self.partition[name], batch.num_rows))
                    if row_filter is not None:
                        batch, rows = _apply_filter(batch, rows, row_filter)
                    if batch.num_rows:
                        yield batch, rows
            except (pa.ArrowException, OSError) as e:
                if unreadable is None or first >= end:
                    raise DataError(f"{self.path}: cannot read Parquet data ({e})") from e
                unreadable(Unreadable(rg, first, end, f"{type(e).__name__}: {str(e).strip()[:300]}"))


def _apply_filter(batch: pa.RecordBatch, rows: np.ndarray, row_filter: RowFilter) -> tuple[pa.RecordBatch, np.ndarray]:
    # Carry the row numbers through the filter as a column, so positions survive.
    table = pa.Table.from_batches([batch.append_column("__row", pa.array(rows))]).filter(row_filter.expression)
    kept = table.column("__row").to_numpy()
    table = table.drop_columns(["__row"]).combine_chunks()
    out = table.to_batches()[0] if table.num_rows else batch.slice(0, 0)
    return out, kept


class ParquetSource:
    """The Parquet files under a path, opened with ``pyarrow.dataset`` and hive partitioning."""

    def __init__(self, root, files: list[str], dataset: ds.FileSystemDataset, metadata: dict[str, object],
                 filesystem: pafs.FileSystem, shown, base: str, stats: dict[str, tuple[int, int]] | None = None):
        self.root = root
        self.files = files  # paths inside ``filesystem``
        self.dataset = dataset
        self._metadata = metadata
        self.filesystem = filesystem
        self.shown = shown  # fs path -> the path or URI the user knows
        self.base = base  # where hive partitions are counted from
        self.stats = stats or {}  # fs path -> (size, mtime ns) from the listing

    @classmethod
    def open(cls, source: str | Path, what: str = "input", problems: list[str] | None = None) -> "ParquetSource | None":
        """A local file or folder, or any pyarrow.fs URI (s3://bucket/traffic/, gs://, hdfs://, file://). The
        one way the project opens Parquet data; errors name the path and ``what`` it is.

        Every file's footer is read up front. Files that are missing or unreadable raise one DataError listing
        them all, or with ``problems`` are appended to it and left out (None when no readable file is left)."""
        fs, root = storage.resolve(source)
        info = fs.get_file_info(root)
        kind = info.type
        found: list[str] = []
        if kind == pafs.FileType.NotFound:
            found.append(f"{what} {source} does not exist")
        elif kind == pafs.FileType.File:
            listed = [info]
        else:  # like pyarrow: names starting with "_" or "." (e.g. _SUCCESS, .crc) are not data
            listed = sorted((f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                             if f.type == pafs.FileType.File and not any(
                                 s.startswith(("_", ".")) for s in posixpath.relpath(f.path, root).split("/"))),
                            key=lambda f: f.path)
            if not listed:
                found.append(f"{what} directory {source} holds no Parquet files")
        shown = _displayer(source, root)
        metadata, stats = {}, {}
        for f in listed if not found else []:
            try:
                metadata[f.path] = pq.read_metadata(f.path, filesystem=fs)
                stats[f.path] = (f.size if f.size is not None else -1, f.mtime_ns if f.mtime_ns is not None else -1)
            except Exception as e:  # noqa: BLE001 - any failure here means "not readable Parquet"
                found.append(f"{shown(f.path)}: not a readable Parquet file ({type(e).__name__}: {e})")
        if found and problems is None:
            raise DataError(f"unreadable {what}:\n  - " + "\n  - ".join(found))
        if problems is not None:
            problems.extend(found)
        files = sorted(metadata)
        if not files:
            return None
        base = partition_base(root, is_dir=kind == pafs.FileType.Directory)
        keys = _partition_keys(base, files)
        partitioning = ds.partitioning(pa.schema([(k, pa.string()) for k in keys]), flavor="hive") if keys else None
        try:
            dataset = ds.dataset(files, filesystem=fs, format="parquet", partitioning=partitioning,
                                 partition_base_dir=base if keys else None)
        except pa.ArrowException as e:
            raise DataError(f"{what} {source}: cannot open as a Parquet dataset ({e})") from e
        return cls(Path(root) if not storage.is_uri(source) else source, files, dataset, metadata,
                   filesystem=fs, shown=shown, base=base, stats=stats)

    @property
    def num_rows(self) -> int:
        """Rows in all files (from the footers), before any filter."""
        return sum(m.num_rows for m in self._metadata.values())

    def parts(self, row_filter: RowFilter | None = None) -> list[FilePart]:
        """The files whose partitions pass the filter, with row groups pruned by column statistics."""
        expr = row_filter.expression if row_filter else None
        try:
            fragments = list(self.dataset.get_fragments(filter=expr) if expr is not None
                             else self.dataset.get_fragments())
            out = []
            for frag in fragments:
                meta = self._metadata[frag.path]
                sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
                if expr is None:
                    groups = list(range(meta.num_row_groups))
                else:
                    groups = sorted(g.id for f in frag.split_by_row_group(filter=expr, schema=self.dataset.schema)
                                    for g in f.row_groups)
                rel = posixpath.relpath(posixpath.dirname(frag.path), self.base)
                out.append(FilePart(
                    path=self.shown(frag.path), schema=meta.schema.to_arrow_schema(),
                    partition={k: str(v) for k, v in ds.get_partition_keys(frag.partition_expression).items()},
                    num_rows=meta.num_rows, row_groups=groups, _row_starts=starts,
                    filesystem=self.filesystem, fs_path=frag.path, rel_dir="" if rel == "." else rel,
                    size=self.stats.get(frag.path, (-1, -1))[0], mtime_ns=self.stats.get(frag.path, (-1, -1))[1],
                ))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ConfigError(f"data.filters: cannot apply {expr} to {self.root} ({e})") from e
        return sorted(out, key=lambda p: p.path)


def partition_base(root: str | Path, is_dir: bool | None = None) -> str:
    """The folder hive partitions are counted from: the input folder (a file's own folder), moved up past
    every trailing ``key=value`` component (``/d/traffic/market=us/day=1`` -> ``/d/traffic``). Paths are
    posix strings inside a file system (a local path, or ``bucket/key`` of an object store)."""
    root = str(root).rstrip("/") or "/"
    if is_dir is None:
        is_dir = Path(root).is_dir()
    base = root if is_dir else posixpath.dirname(root)
    while "=" in posixpath.basename(base) and posixpath.dirname(base) != base:
        base = posixpath.dirname(base)
    return base


def _partition_keys(root: str, files: list[str]) -> list[str]:
    """Hive keys in path order (``market=us/day=1/x.parquet`` -> [market, day])."""
    keys: list[str] = []
    for f in files:
        for part in posixpath.relpath(f, root).split("/")[:-1]:
            if "=" in part:
                k = part.split("=", 1)[0]
                if k not in keys:
                    keys.append(k)
    return keys


def _displayer(source: str | Path, root: str):
    """fs path -> what error messages and source_file show: the local path, or the URI with its scheme."""
    if not storage.is_uri(source):
        return lambda p: p
    scheme = str(source).split("://", 1)[0]
    return lambda p: f"{scheme}://{p}"
