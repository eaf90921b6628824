"""Where a scoring job's rows end up: per-unit outputs written atomically, then completion markers.

    if not is_done(out, unit, version):
        clear_unit(out, unit)
        w = PartWriter(output_path(out, unit), output_schema(key_types)); w.write(scored); w.commit()
        mark_done(out, unit, summary)                 # last: the unit is finished

Layout under the output folder (names starting with "_" are skipped by pyarrow dataset discovery, so
``pyarrow.dataset.dataset(out)`` reads exactly the scores):

    <dirs>/part-00003-0002-<file stem>.parquet          scores of unit 2 of input file 3, in input order
    _quarantine/<dirs>/part-00003-0002-<stem>.parquet   rows of that unit that were not scored, with reason
    _done/part-00003-0002-<stem>.json                   completion marker: counts, row range, model version,
                                                        pid and host of the process that scored it, seconds
    _job/config.yaml                    (--workers N) the resolved config the worker processes read

``<dirs>`` are the input file's folders below its input root (hive partitions such as ``market=us/day=1``
included), so the output keeps the input's layout and ``pyarrow.dataset.dataset(out, partitioning="hive")``
reads the partition values back. Units are planned in serving.scoring.plan.

A unit's files are written under temporary names and renamed; the marker is written last. A job killed at
any point leaves either a complete unit (marker present) or one that ``--resume`` redoes from scratch, so
every input row is scored exactly once. A marker only finishes the unit it names when its row-group range
is the planned one (``serving.unit_rows`` unchanged); ``remove_foreign_parts`` deletes a file's parts that
the current plan does not name (another ``unit_rows``, or the one-file-per-input layout before units).

Every file-system access of scoring outputs goes through the functions below (paths, existence, markers,
writers, listing and deletion), so another file system can replace the local one here alone.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kernel import storage
from serving.scoring.plan import Shard, Unit

QUARANTINE_DIR = "_quarantine"
DONE_DIR = "_done"
JOB_DIR = "_job"  # --workers N: the resolved config the child processes read

# The scored output after the pass-through keys: (name, type, meaning). README.md ("Scoring output") and
# ``python -m serving.score --help`` show this table; serving.scoring.scorer computes the score columns.
OUTPUT_COLUMNS = (
    ("source_file", pa.string(), "the input file of the row"),
    ("source_row", pa.int64(), "its row number in that file"),
    ("scenario", pa.string(), "the row's scenario, as read"),
    ("scored_as", pa.string(), "the scenario whose weights scored it (serving.fallback_scenario for a fallback)"),
    ("fallback", pa.bool_(), "scored as serving.fallback_scenario (its own scenario is unknown to the model)"),
    ("status", pa.string(), "scored or fallback (rows that could not be scored are in _quarantine/ with a reason)"),
    ("score", pa.float32(), "the served probability: score_raw, or score_calibrated with serving.calibrate=true"),
    ("score_raw", pa.float32(), "sigmoid of the model's logit"),
    ("score_calibrated", pa.float32(), "the scenario's calibration (fitted at export) of score_raw; null without one"),
    ("decision", pa.bool_(), "score >= the scenario's threshold fitted on the same kind of score (max F1 on "
                             "validation, manifest thresholds); null without one"),
    ("label", pa.int8(), "0/1 when the input had a usable label, else null"),
    ("label_invalid", pa.bool_(), "a label value was present but unusable"),
    ("model_version", pa.string(), "the registry's name/version (an unregistered export: export-<digest>)"),
    ("query_len", pa.int32(), "characters of the query (drift monitoring)"),
    ("title_len", pa.int32(), "characters of the title (drift monitoring)"),
)
OUTPUT_FIXED = [(name, dtype) for name, dtype, _ in OUTPUT_COLUMNS]
_TYPE_NAMES = {"float": "float32", "double": "float64"}


def describe_columns() -> str:
    """The output columns as text lines (``--help``)."""
    lines = ["(your data.columns.keys)  as in the input: passed through, e.g. request and ad ids"]
    lines += [f"{name} ({_TYPE_NAMES.get(str(dtype), dtype)})  {meaning}" for name, dtype, meaning in OUTPUT_COLUMNS]
    return "\n".join("  " + line for line in lines)


def output_schema(key_types: dict[str, pa.DataType]) -> pa.Schema:
    """A unit's scored output: the pass-through keys, then OUTPUT_FIXED."""
    return pa.schema(list(key_types.items()) + OUTPUT_FIXED)


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


class PartWriter:
    """Streams record batches into ``final`` through a local temporary file; ``commit`` publishes it whole
    (kernel.storage.StagedFile: a rename beside a local ``final``, one upload to an object store).

    With no batch written, ``commit`` writes an empty file of ``schema`` (a unit with zero scored rows
    still gets its output, so readers and ``--resume`` see it as finished).
    """

    def __init__(self, final, schema: pa.Schema):
        self._file = storage.StagedFile(final)
        self.schema = schema
        self.rows = 0
        self._writer = pq.ParquetWriter(self._file.tmp, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def commit(self):
        self._writer.close()
        return self._file.commit()

    def abort(self) -> None:
        self._writer.close()
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
