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
every input row is scored exactly once. A marker only finishes the unit it names when its input is the same
file, unchanged (path, size, modification time and rows, as listed now), and its row-group range is the
planned one (``serving.unit_rows`` unchanged). ``reconcile`` deletes the files of the job's units whose
input is gone or changed, or that another plan named (another ``unit_rows``, files added or removed before
them, the one-file-per-input layout before units), so the output never keeps rows of an input that is no
longer there; other jobs' files in the same folder are left alone.

Every file-system access of scoring outputs goes through the functions below (paths, existence, markers,
writers, listing and deletion), so another file system can replace the local one here alone.
"""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kernel import storage
from kernel.environment import writing
from serving.scoring.plan import Unit

QUARANTINE_DIR = "_quarantine"
DONE_DIR = "_done"
JOB_DIR = "_job"  # --workers N: the resolved config the child processes read
# The names of unit outputs and quarantines (and of the one-file-per-input layout before units):
# part-<file, 5 digits>-<unit, 4 digits>-<stem>.parquet, part-<file, 5 digits>-<stem>.parquet.
PART_NAME = re.compile(r"^part-\d{5}-.+\.parquet$")

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
    """Finished: marker and output present, the marker's input is this unit's file unchanged (path, size,
    modification time, rows) and its row-group range is this unit's (a marker of another plan, i.e. another
    serving.unit_rows, does not finish it) and, when ``model_version`` is given,
    scored by that model: a resume with another model rescores the unit rather than mixing two models'
    scores in one output."""
    if not (storage.is_file(marker_path(out, unit)) and storage.is_file(output_path(out, unit))):
        return False
    marker = read_marker(out, unit)
    if not _finishes(marker, unit):
        return False
    return model_version is None or marker.get("model_version") == model_version


def read_marker(out, unit: Unit) -> dict:
    return storage.read_json(marker_path(out, unit), f"completion marker of {unit.name}")


def mark_done(out: Path, unit: Unit, summary: dict) -> None:
    """The unit's completion marker, written after its output and quarantine are in place (one object on an
    object store, a temporary file renamed locally: either way seen whole or not at all)."""
    with writing(marker_path(out, unit)):
        _write_marker(out, unit, summary)


def _write_marker(out: Path, unit: Unit, summary: dict) -> None:
    storage.write_json(marker_path(out, unit), {
        "input": str(unit.path), "source": unit.shard.identity, "file": unit.shard.index, "unit": unit.index,
        "output": _rel(unit.rel_dir, f"{unit.name}.parquet"),
        "quarantine": _rel(QUARANTINE_DIR, unit.rel_dir, f"{unit.name}.parquet"), **unit.extent(), **summary})


def _rel(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def clear_unit(out: Path, unit: Unit) -> None:
    """Remove a unit's marker (first: it is no longer finished), output and quarantine; a unit that is
    redone starts from nothing."""
    for p in (marker_path(out, unit), output_path(out, unit), quarantine_path(out, unit)):
        storage.delete(p)


def reconcile(out: Path | str, units: list[Unit], roots: list[str]) -> dict:
    """Make the output folder hold only what this job scores now: remove the files of every unit of this
    job whose input is gone from the listing, has changed (size, modification time or rows), or was planned
    otherwise (another serving.unit_rows, or another place in the file order because files were added or
    removed before it).

    A unit is this job's when its marker's input lies under one of ``roots`` (the job's inputs as given,
    resolved: a folder, or a file) or is one of the planned files; markers of other inputs (another job's
    files in a shared folder) are left alone. Outputs without a marker (the layout before units) are
    removed when they carry a planned file's index and stem, or the name of a unit removed here; an output
    whose writer was killed between it and its marker, of an input that is gone since, is not found.
    Call it from the one process that plans the job, before any unit is scored. Returns {"units": how many
    units' files were removed, "inputs": {input path: "gone" | "changed" | "replanned"}}.
    """
    planned = {u.name: u for u in units}
    current = {str(u.path): u.shard.identity for u in units}
    bases = [r.rstrip("/") for r in roots]
    files = {u.shard.prefix: u.shard.path.stem for u in units}

    def of_planned_file(stem: str) -> bool:  # part-<index>-...-<stem> of a file of this plan
        return stem.endswith("-" + files.get(stem[: len("part-00000-")], "\0"))

    removed: dict[str, str] = {}
    stems: set[str] = set()
    for name in storage.entries(_at(out, DONE_DIR)):
        stem = name[: -len(".json")]
        if not name.endswith(".json") or not PART_NAME.match(stem + ".parquet"):
            continue
        try:
            marker = storage.read_json(_at(out, DONE_DIR, name), f"completion marker {name}")
        except Exception:  # noqa: BLE001 - an unreadable marker finishes nothing
            marker = {}
        source = str(marker.get("input", ""))
        ours = (stem in planned or of_planned_file(stem) or source in current
                or any(source == b or source.startswith(b + "/") for b in bases))
        if not ours or (stem in planned and _finishes(marker, planned[stem])):
            continue
        removed[source or stem] = ("gone" if source not in current else
                                   "changed" if (marker.get("source") or {}) != current[source] else "replanned")
        storage.delete(_at(out, DONE_DIR, name))  # first: the unit is no longer finished
        for rel in (marker.get("output"), marker.get("quarantine")):
            if rel:
                storage.delete(_at(out, rel))
        stems.add(stem)
    wanted = {str(output_path(out, u)) for u in units} | {str(quarantine_path(out, u)) for u in units}
    for rel, _ in storage.files(out):
        top, name = rel.split("/", 1)[0], rel.rsplit("/", 1)[-1]
        if top in (DONE_DIR, JOB_DIR) or not PART_NAME.match(name) or str(_at(out, rel)) in wanted:
            continue
        stem = name[: -len(".parquet")]
        if stem in stems or of_planned_file(stem):
            storage.delete(_at(out, rel))
            stems.add(stem)
    return {"units": len(stems), "inputs": removed}


def _finishes(marker: dict, unit: Unit) -> bool:
    """Whether a marker finishes ``unit`` as planned now: the same input, unchanged, and the same row groups."""
    return (marker.get("source") == unit.shard.identity and marker.get("input") == str(unit.path)
            and marker.get("row_groups") == unit.extent()["row_groups"])


class PartWriter:
    """Streams record batches into ``final`` through a local temporary file; ``commit`` publishes it whole
    (kernel.storage.StagedFile: a rename beside a local ``final``, one upload to an object store).

    With no batch written, ``commit`` writes an empty file of ``schema`` (a unit with zero scored rows
    still gets its output, so readers and ``--resume`` see it as finished).
    """

    def __init__(self, final, schema: pa.Schema):
        self.final = final
        self._file = storage.StagedFile(final)
        self.schema = schema
        self.rows = 0
        with writing(final):
            self._writer = pq.ParquetWriter(self._file.tmp, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            with writing(self.final):  # a full disk or a file-size limit names the file
                self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def commit(self):
        try:
            with writing(self.final):
                self._writer.close()
                return self._file.commit()
        except BaseException:
            self._file.abort()  # e.g. the footer did not fit on the disk: no temporary is left behind
            raise

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the write failed (e.g. a full disk): the temporary goes anyway
            pass
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
