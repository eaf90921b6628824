"""Ingest: read a user's Parquet through the column mapping, validate, dedupe, split, write.

    python -m pipeline.ingest --config configs/demo.yaml --input data/ads/ --out runs/demo/data
    python -m pipeline.ingest --input synthetic --out runs/demo/data tracking.enabled=false
    python -m pipeline.ingest --help

``--input`` is a Parquet file, a directory, or a hive-partitioned dataset (``market=us/...``); "synthetic"
generates the demo data (``data.synthetic``) first. Written into ``--out``, each file whole or not at all
(built in a staging folder, then renamed; ``stats.json`` last):

    train.parquet valid.parquet test.parquet   accepted canonical rows, split by a hash of data.split.key
    quarantine.parquet                          rejected rows, raw values as strings, with a reason code and
                                                the user's column that failed the check (``column``)
    task_map.json                               scenario -> task id (data.scenarios, or sorted accepted scenarios)
    stats.json                                  per scenario: rows, positive rate, text-length quantiles, rejects

Two streaming passes keep memory flat as the input grows: (1) record batches are validated, bad rows go
to the quarantine, accepted rows are spilled into buckets by query hash; (2) each bucket is deduplicated,
split and written. The run fails when the reject rate (rejected / rows in) exceeds data.max_reject_rate
(RejectRateExceeded, exit 6); a reject rate equal to the threshold passes. It also fails when every row
is rejected, whatever the threshold (DataError, exit 2). A failed run publishes only
``<out>/_rejected/quarantine.parquet`` and ``<out>/_rejected/stats.json`` for inspection and leaves the
outputs of an earlier good run untouched; a later good run removes ``_rejected``.

Exit codes (kernel.exit_codes): 0 done, 2 bad configuration or input, 6 reject rate over the threshold,
8 no space left, a file-size limit or an unwritable path (named).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kernel import exit_codes, storage
from kernel.atomic import write_json_atomic
from kernel.config import Config, add_config_args, load_config
from kernel.environment import check_writable, writing
from kernel.errors import ConfigError, DataError, RejectRateExceeded
from kernel.exit_codes import run_cli
from kernel.hashing import stable_hash
from kernel.logs import add_logging_args, setup_from_args
from kernel.stage import Outcome, stage_tracker
from kernel.task_map import TASK_MAP_FILE, TaskMap
from kernel.tracking import open_tracker
from pipeline.dedupe import Spill, bucket_count, find_duplicates
from pipeline.reader import ParquetSource, build_filter
from pipeline.split import SPLITS, assign_splits
from pipeline.stats import IngestStats
from pipeline.synthetic import generate
from pipeline.validate import REASON_NAMES, ColumnMapping, empty_batch, quarantine_schema

OUTPUT_FILES = [f"{s}.parquet" for s in SPLITS] + ["quarantine.parquet", TASK_MAP_FILE, "stats.json"]
REJECTED_DIR = "_rejected"  # <out>/_rejected: quarantine.parquet + stats.json of a run that failed its gate
REJECTED_FILES = ["quarantine.parquet", "stats.json"]
log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    rows_in: int
    rows_accepted: int
    rows_quarantined: int
    by_reason: dict[str, int]
    by_scenario: dict[str, dict]  # scenario -> rows, positive_rate, splits, quarantined, text_chars, ...
    out_dir: Path
    splits: dict[str, int] = field(default_factory=dict)
    scenarios: list[str] = field(default_factory=list)  # the task map's order
    stats: dict = field(default_factory=dict)  # the full stats.json

    @property
    def reject_rate(self) -> float:
        return self.rows_quarantined / self.rows_in if self.rows_in else 0.0


class _Stream:
    """Pass 1 over a source: open, check every file's columns, then yield validated batches."""

    def __init__(self, cfg: Config, source: str | Path, scenarios: list[str] | None, require_label: bool):
        problems: list[str] = []  # unreadable files and column mismatches of every file, reported at once
        self.source = ParquetSource.open(source, problems=problems)
        self.filter = build_filter(cfg.data.filters)
        self.parts = self.source.parts(self.filter) if self.source is not None else []
        self.mapping = ColumnMapping(cfg.data, scenarios, require_label)
        self.mapping.check_parts(self.parts, problems)
        self.batch_rows = cfg.data.batch_rows
        self.accepted_schema = self.mapping.schema()
        self.quarantine_schema = quarantine_schema(self.mapping.keys)

    def __iter__(self) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch, int]]:
        """(accepted, quarantined, rows read) per record batch."""
        cols = self.mapping.read_columns()
        for part in self.parts:
            for batch, rows in part.batches(cols, self.batch_rows, self.filter):
                accepted, quarantined = self.mapping.canonicalize(batch, rows, part)
                yield accepted, quarantined, batch.num_rows


def _parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """Dictionary pages and statistics only where they pay: low-cardinality and numeric columns
    (on free text they cost a third of the write time and help no reader)."""
    dictionary = [c for c in ("scenario", "source_file", "reason", "column") if c in schema.names]
    stats = [f.name for f in schema if not pa.types.is_string(f.type)] + ["scenario"]
    return pq.ParquetWriter(path, schema, use_dictionary=dictionary, write_statistics=stats)


def _split_key(cfg: Config, schema: pa.Schema) -> str:
    key = cfg.data.split.key
    if key not in schema.names or key in ("source_row", "truncated"):
        raise ConfigError(f"data.split.key: {key!r} is not a canonical column or pass-through key "
                          f"(choose from {schema.names[:7] + list(cfg.data.columns.keys)})")
    return key


def _to_quarantine(table: pa.Table, codes: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Accepted-schema rows rejected by dedupe -> quarantine rows (values as strings)."""
    fixed = ("reason", "column", "source_file", "source_row")
    cols = [pc.cast(table.column(f.name), pa.string()) for f in schema if f.name not in fixed]
    cols += [REASON_NAMES.take(pa.array(codes)), pa.repeat(pa.scalar("", pa.string()), table.num_rows),  # cross-row
             table.column("source_file"), table.column("source_row")]
    return pa.Table.from_arrays(cols, schema=schema)


def _example(e: dict) -> str:
    where = f" in column '{e['column']}'" if e.get("column") else ""
    return f"{e['file']} row {e['row']}: {e['reason']}{where}"


def _gate_error(stats: IngestStats, limit: float, files: list[str], rejected: Path) -> DataError | None:
    """The error that stops the run, if any: reject rate over ``limit`` (a rate equal to it passes), or
    every row rejected (even with max_reject_rate=1.0: there would be nothing to train on)."""
    n, q = stats.rows_in, sum(stats.by_reason.values())
    if not n or (q / n <= limit and q < n):
        return None
    named = ", ".join(files[:3]) + (f" (+{len(files) - 3} more files)" if len(files) > 3 else "")
    top = ", ".join(f"{r} {c}" for r, c in stats.by_reason.most_common(5))
    eg = "; ".join(_example(e) for e in stats.examples[:3])
    kept = (f"The rejected rows are kept in {rejected / 'quarantine.parquet'} (counts: {rejected / 'stats.json'}); "
            f"no train/valid/test was written or changed.")
    if q / n > limit:
        return RejectRateExceeded(f"{named}: reject rate {q / n:.2%} ({q} of {n} rows) exceeds "
                                  f"data.max_reject_rate={limit:.2%}; top reasons: {top}; e.g. {eg}. {kept}")
    return DataError(f"{named}: all {n} rows were rejected, nothing is left to ingest; top reasons: {top}; "
                     f"e.g. {eg}. {kept}")


def _reject(error: DataError, stage: Path, stats: IngestStats, out_dir: Path, files: ExitStack) -> None:
    """Publish the quarantine and stats of a failed run under <out>/_rejected, then raise ``error``."""
    files.close()  # flush the quarantine's footer (and close the spill)
    write_json_atomic(stage / "stats.json", {**stats.to_dict(), "error": str(error)})
    storage.publish_files(stage, storage.join(out_dir, REJECTED_DIR), REJECTED_FILES)
    raise error


def run_ingest(cfg: Config, source: str | Path, out_dir: str | Path, tracker=None) -> IngestReport:
    """Validate, dedupe and split ``source`` into ``out_dir`` (a local folder or a URI); the report of what
    happened to every row. Raises DataError / RejectRateExceeded. The stage's entry point is ``run``."""
    out_dir, d = (out_dir if storage.is_uri(out_dir) else Path(out_dir)), cfg.data
    check_writable(out_dir, "--out")
    stream = _Stream(cfg, source, None, require_label=True)
    split_key = _split_key(cfg, stream.accepted_schema)
    stats = IngestStats(d.max_chars)
    rejected_dir = storage.join(out_dir, REJECTED_DIR)
    input_files = [p.path for p in stream.parts]
    # A full disk or a file-size limit while writing names the output folder (exit 8).
    with writing(out_dir), storage.staging(out_dir) as stage, ExitStack() as files:
        quarantine = files.enter_context(_parquet_writer(stage / "quarantine.parquet", stream.quarantine_schema))
        spill = Spill(stage / "spill", bucket_count(stream.source.num_rows), stream.accepted_schema)
        files.callback(spill.close)
        for accepted, rejected, n in stream:  # pass 1
            stats.rows_in += n
            if rejected.num_rows:
                quarantine.write_batch(rejected)
                stats.add_quarantined(rejected)
            if accepted.num_rows:
                qhash = stable_hash(accepted.column("query"))
                khash = qhash if split_key == "query" else stable_hash(accepted.column(split_key))
                spill.write(accepted, qhash, khash)
        spill.close()
        if stats.rows_in == 0:
            raise DataError(f"{source}: no rows to ingest" + (" after data.filters" if d.filters else ""))
        error = _gate_error(stats, d.max_reject_rate, input_files, rejected_dir)
        if error is not None:  # fail before the second pass if already over
            _reject(error, stage, stats, out_dir, files)
        writers = {s: files.enter_context(_parquet_writer(stage / f"{s}.parquet", stream.accepted_schema))
                   for s in SPLITS}
        for table in spill.buckets():  # pass 2
            codes = find_duplicates(table)
            keep = codes == 0
            if not keep.all():
                dup = _to_quarantine(table.filter(pa.array(~keep)), codes[~keep], stream.quarantine_schema)
                quarantine.write_table(dup)
                stats.add_quarantined(dup)
            split = assign_splits(table.column("_khash").to_numpy(), d.split.valid_fraction, d.split.test_fraction,
                                  d.split.seed)
            # One gather puts the kept rows in split order (input order within a split); slices are free.
            rows = np.flatnonzero(keep)
            rows = rows[np.argsort(split[rows], kind="stable")]
            table, split = table.drop_columns(["_khash"]).take(pa.array(rows)), split[rows]
            stats.add_accepted(table, split)
            bounds = np.searchsorted(split, np.arange(len(SPLITS) + 1))
            for i, s in enumerate(SPLITS):
                if bounds[i + 1] > bounds[i]:
                    writers[s].write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]))
        files.close()  # flush every Parquet footer before publishing
        error = _gate_error(stats, d.max_reject_rate, input_files, rejected_dir)  # duplicates count too
        if error is not None:
            _reject(error, stage, stats, out_dir, files)
        result = stats.to_dict()
        scenarios = list(d.scenarios) or sorted(s for s, v in result["by_scenario"].items() if v["rows"])
        TaskMap(scenarios).save(stage / TASK_MAP_FILE)
        write_json_atomic(stage / "stats.json", result)
        storage.publish_files(stage, out_dir, OUTPUT_FILES)
        storage.delete(rejected_dir)  # a stale failure's rows no longer describe out_dir
    if tracker is not None:
        tracker.log_dict(result, "ingest/stats.json")
        tracker.log_metrics(stats.metrics())
    return IngestReport(
        rows_in=result["rows_in"], rows_accepted=result["rows_accepted"], rows_quarantined=result["rows_quarantined"],
        by_reason=result["by_reason"], by_scenario=result["by_scenario"], out_dir=out_dir,
        splits=result["splits"], scenarios=scenarios, stats=result,
    )


def read_validated(
    cfg: Config, source: str | Path, scenarios: list[str] | None = None, dedupe: bool = False,
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """Stream (accepted canonical batch, quarantined batch) with ingest's mapping and checks (scoring).

    ``scenarios`` (default ``data.scenarios``): rows of other scenarios are quarantined as
    unknown_scenario. The label is optional: without a label column, or where a label is null or
    unusable, ``label`` is null (``label_invalid`` marks present-but-unusable values; such rows are
    accepted, as at scoring time). Every input row comes out exactly once,
    in one of the two. ``dedupe=True`` also applies the cross-file duplicate checks (two passes; accepted
    rows then come grouped by query-hash bucket rather than in input order).
    """
    stream = _Stream(cfg, source, scenarios, require_label=False)
    if not dedupe:
        for accepted, quarantined, _ in stream:
            yield accepted, quarantined
        return
    with tempfile.TemporaryDirectory(prefix="read-validated-") as tmp:
        spill = Spill(Path(tmp), bucket_count(stream.source.num_rows), stream.accepted_schema)
        try:
            for accepted, quarantined, _ in stream:
                if quarantined.num_rows:
                    yield empty_batch(stream.accepted_schema), quarantined
                qhash = stable_hash(accepted.column("query"))
                spill.write(accepted, qhash, qhash)
        finally:
            spill.close()
        for table in spill.buckets():
            codes = find_duplicates(table)
            keep = codes == 0
            table = table.drop_columns(["_khash"])
            rejected = _to_quarantine(table.filter(pa.array(~keep)), codes[~keep], stream.quarantine_schema)
            yield _one_batch(table.filter(pa.array(keep))), _one_batch(rejected)


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    table = table.combine_chunks()
    return table.to_batches()[0] if table.num_rows else empty_batch(table.schema)


def run(cfg: Config, source: str | Path, out: str | Path, *, tracker=None) -> Outcome:
    """The ingest stage: ``run_ingest`` of ``source`` ("synthetic": the demo data, generated first) into ``out``,
    logged to ``tracker`` (default: a new run "ingest" of the config's tracking, ended here)."""
    if str(source) == "synthetic":
        source = generate(Path(cfg.work_dir) / "raw" / "synthetic.parquet", cfg.data.synthetic)

    def start():
        own = open_tracker(cfg)
        own.start(run_name="ingest")
        return own

    with stage_tracker(tracker, start) as tracker:
        report = run_ingest(cfg, source, out, tracker=tracker)
    return Outcome({"rows_in": report.rows_in, "accepted": report.rows_accepted,
                    "quarantined": report.rows_quarantined, "splits": report.splits, "by_reason": report.by_reason},
                   [report.out_dir])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ingest", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_config_args(parser)
    add_logging_args(parser)
    parser.add_argument("--input", help="Parquet file, directory or hive dataset; 'synthetic' (default: data.source)")
    parser.add_argument("--out", help="output folder (default: <work_dir>/data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_from_args(args, "ingest")

    def work() -> int:
        cfg = load_config(args.config, args.overrides)
        out = args.out or storage.join(cfg.work_dir, "data")
        i = run(cfg, args.input or cfg.data.source, out).info
        log.info(f"{i['rows_in']} rows in: {i['accepted']} accepted {i['splits']}, "
                 f"{i['quarantined']} quarantined {i['by_reason']} -> {out}")
        return exit_codes.OK

    return run_cli(work)  # errors -> one line on stderr and kernel.exit_codes' code


if __name__ == "__main__":
    sys.exit(main())
