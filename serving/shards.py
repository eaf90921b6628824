"""Input shards of a batch-scoring job: planning, per-shard outputs written atomically, completion markers.

    shards = plan_shards(list_inputs(["data/day1", "extra.parquet"]))       # one shard per input file
    mine = [s for s in shards if s.index % world == rank]                  # disjoint across workers
    if not is_done(out, s): ... write with ShardWriter ..., then mark_done(out, s, counts)

Layout under the output folder (names starting with "_" are skipped by pyarrow dataset discovery, so
``pyarrow.dataset.dataset(out)`` reads exactly the scores):

    <dirs>/part-00003-<file stem>.parquet          scores of input shard 3
    _quarantine/<dirs>/part-00003-<stem>.parquet   rows of shard 3 that were not scored, with their reason
    _done/part-00003-<stem>.json                   completion marker: counts, model version, seconds

``<dirs>`` are the input file's folders below its input root (hive partitions such as ``market=us/day=1``
included), so the output keeps the input's layout and ``pyarrow.dataset.dataset(out, partitioning="hive")``
reads the partition values back.
    _job/config.yaml                    (--workers N) the resolved config the worker processes read

A shard's files are written under temporary names and renamed; the marker is written last. A job killed at
any point leaves either a complete shard (marker present) or one that ``--resume`` redoes from scratch, so
every input row is scored exactly once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kernel.atomic import AtomicFile, write_json_atomic
from kernel.errors import DataError

QUARANTINE_DIR = "_quarantine"
DONE_DIR = "_done"
JOB_DIR = "_job"  # --workers N: the resolved config the child processes read


@dataclass(frozen=True)
class Shard:
    index: int
    path: Path
    rel_dir: str = ""  # the input file's folders below its input root ("" for a file given directly)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-{self.path.stem}"


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


def shards_for_rank(shards: list[Shard], rank: int, world: int) -> list[Shard]:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    return [s for s in shards if s.index % world == rank]


def output_path(out: Path, shard: Shard) -> Path:
    return out / shard.rel_dir / f"{shard.name}.parquet"


def quarantine_path(out: Path, shard: Shard) -> Path:
    return out / QUARANTINE_DIR / shard.rel_dir / f"{shard.name}.parquet"


def marker_path(out: Path, shard: Shard) -> Path:
    return out / DONE_DIR / f"{shard.name}.json"


def is_done(out: Path, shard: Shard, model_version: str | None = None) -> bool:
    """Finished (marker and output present) and, when ``model_version`` is given, by that model: a resume
    with another model rescores the shard rather than mixing two models' scores in one output."""
    if not (marker_path(out, shard).is_file() and output_path(out, shard).is_file()):
        return False
    return model_version is None or read_marker(out, shard).get("model_version") == model_version


def read_marker(out: Path, shard: Shard) -> dict:
    return json.loads(marker_path(out, shard).read_text())


def mark_done(out: Path, shard: Shard, summary: dict) -> None:
    marker_path(out, shard).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker_path(out, shard), {"input": str(shard.path), **summary})


def clear_shard(out: Path, shard: Shard) -> None:
    """Remove a shard's outputs and marker (a shard that is redone starts from nothing)."""
    for p in (marker_path(out, shard), output_path(out, shard), quarantine_path(out, shard)):
        p.unlink(missing_ok=True)


class ShardWriter:
    """Streams record batches into ``final`` through a temporary file; ``commit`` renames it into place.

    With no batch written, ``commit`` writes an empty file of ``schema`` (a shard with zero scored rows
    still gets its output, so readers and ``--resume`` see it as finished).
    """

    def __init__(self, final: Path, schema: pa.Schema):
        self._file = AtomicFile(final)
        self.final, self.tmp = self._file.final, self._file.tmp
        self.schema = schema
        self.rows = 0
        self._writer = pq.ParquetWriter(self.tmp, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def commit(self) -> Path:
        self._writer.close()
        return self._file.commit()

    def abort(self) -> None:
        self._writer.close()
        self._file.abort()


def holds_results(out: Path) -> bool:
    """Whether ``out`` holds any file a scoring run wrote (a shard's output, quarantine or marker), not
    counting ``_job/`` (the resolved config handed to local workers). False for a missing folder."""
    if not out.is_dir():
        return False
    return any(p.is_file() for p in out.rglob("*") if p.relative_to(out).parts[0] != JOB_DIR)


def remove_stale_temporaries(out: Path) -> int:
    """Delete temporary files left by killed workers (``.part-*.tmp<pid>``); returns how many."""
    n = 0
    if out.is_dir():
        for p in out.rglob(".part-*.tmp*"):
            p.unlink(missing_ok=True)
            n += 1
    return n
