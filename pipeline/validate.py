"""Map a user's columns onto the canonical fields and sort each row into accepted or quarantined.

    mapping = ColumnMapping(cfg.data, scenarios=["us", "uk"], require_label=True)
    mapping.check_parts(parts)                   # every file: columns present and of usable types, or DataError
    accepted, quarantined = mapping.canonicalize(batch, rows, part)

All checks are vectorised pyarrow/numpy over a record batch. Each rejected row gets the first reason
that applies, in the order of ``REASONS`` (the last two are decided later, across files, by dedupe).
Accepted columns: query, title, description, url (str; "" when absent), label (int8 0/1; null at
scoring time without a label column), scenario, weight (float32), the pass-through keys, source_file,
source_row, truncated (bool: a text field was cut to ``data.max_chars``); at scoring time also
label_invalid (see below), and query_len and title_len (int32: characters of the text as read, before any
cut, so that drift monitoring sees extreme inputs). Quarantined rows keep their raw values as strings, plus ``reason`` and
``column`` (the user's column that failed the check; "" for cross-row reasons: duplicate,
conflicting_label, and for a constant scenario).

Labels: ingestion (``require_label=True``) quarantines a null, unparsable (bad_type) or out-of-domain
(bad_label) label. At scoring time the label is optional and never costs a row: such a label becomes null
and ``label_invalid`` is True when a value was present but unusable (null and blank text are absent, not
invalid; a label column of an unusable Arrow type makes every present value invalid).

Columns: a column of Arrow type ``null`` (written entirely of None) is a column of nulls: a required field
quarantines with its usual reason (null_title, null_label, ...); description/url become "", weight 1.0,
keys null. description/url left at their default names ("description", "url") and missing from a file are
absent (empty text) for that file; a column the user named explicitly must exist.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernel.config import DataConfig
from kernel.errors import ConfigError, DataError
from pipeline.reader import FilePart
from pipeline.values import as_string, blank, bool_mask, numbers, typed_nulls, utf8_text, value_kind

REASONS = (
    "bad_type", "invalid_utf8", "null_query", "null_title", "null_label", "null_scenario",
    "empty_query", "empty_title", "empty_scenario", "bad_label", "bad_weight", "unknown_scenario",
    "overlong", "conflicting_label", "duplicate",
)
CODE = {r: i + 1 for i, r in enumerate(REASONS)}  # 0 = accepted
REASON_NAMES = pa.array([""] + list(REASONS), pa.string())
TEXT_FIELDS = ("query", "title", "description", "url")
CANONICAL = TEXT_FIELDS + ("label", "scenario", "weight")
OPTIONAL = ("description", "url", "weight")  # canonical fields a user may declare absent with null
DEFAULT_NAMES = {"description": "description", "url": "url"}  # absent when missing under these names
Flag = Callable[..., None]  # flag(reason, rows it applies to (bool mask or None), user column or "")


# Which physical kinds each canonical field accepts (text labels/weights are parsed row by row).
_ACCEPTS = {"text": {"text"}, "label": {"int", "float", "bool", "text"}, "weight": {"int", "float", "text"},
            "scenario": {"text", "int"}, "key": {"text", "int"}}


SCORING_LENGTHS = ("query_len", "title_len")  # scoring time: characters as read (before the max_chars cut)


def accepted_schema(key_types: dict[str, pa.DataType], label_invalid: bool = False) -> pa.Schema:
    """The accepted rows; ``label_invalid`` (scoring time only) appends that bool column and the true lengths."""
    fields = [(f, pa.string()) for f in TEXT_FIELDS]
    fields += [("label", pa.int8()), ("scenario", pa.string()), ("weight", pa.float32())]
    fields += list(key_types.items())
    fields += [("source_file", pa.string()), ("source_row", pa.int64()), ("truncated", pa.bool_())]
    scoring = [("label_invalid", pa.bool_())] + [(name, pa.int32()) for name in SCORING_LENGTHS]
    return pa.schema(fields + (scoring if label_invalid else []))


def true_lengths(raw: dict[str, pa.Array]) -> list[pa.Array]:
    """Characters of the query and title as read (null: 0), before any cut to max_chars."""
    return [pc.cast(pc.fill_null(pc.utf8_length(raw[f]), 0), pa.int32()) for f in ("query", "title")]


def quarantine_schema(keys: list[str]) -> pa.Schema:
    """Rejected rows, the same for ingestion and scoring: raw values as strings, the reason, the user's
    column that failed the check ("" when no single column did), and where the row came from."""
    fields = [(f, pa.string()) for f in CANONICAL] + [(k, pa.string()) for k in keys]
    return pa.schema(fields + [("reason", pa.string()), ("column", pa.string()), ("source_file", pa.string()),
                               ("source_row", pa.int64())])


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


def _first_reasons(masks: dict[str, list[tuple[str, np.ndarray]]], n: int) -> tuple[np.ndarray, pa.Array]:
    """(int8 reason code per row, the column of that reason per row): the first reason in REASONS order
    wins, and within a reason the first column flagged (the order of the mapped fields)."""
    codes, where, names = np.zeros(n, dtype=np.int8), np.zeros(n, dtype=np.int32), [""]
    for reason in REASONS:
        for column, mask in masks.get(reason, ()):
            hit = (codes == 0) & mask
            if hit.any():
                if column not in names:
                    names.append(column)
                codes[hit], where[hit] = CODE[reason], names.index(column)
    return codes, pa.array(names, pa.string()).take(pa.array(where))


class ColumnMapping:
    """Column mapping + validation rules of ``data`` (``DataConfig``) for one run."""

    def __init__(self, data: DataConfig, scenarios: list[str] | None = None, require_label: bool = True):
        self.data = data
        self.cols = data.columns
        self.scenarios = list(scenarios if scenarios is not None else data.scenarios)
        self.require_label = require_label
        self.keys = list(self.cols.keys)
        clash = sorted(set(self.keys) & set(accepted_schema({}).names))
        if clash:
            raise ConfigError(f"data.columns.keys: {clash} clash with canonical column names")
        self.key_types: dict[str, pa.DataType] = {}
        self.has_label: dict[str, bool] = {}
        self.absent: dict[str, set[str]] = {}  # file -> optional fields it lacks (description/url/weight)
        self.label_unusable: set[str] = set()  # scoring: files whose label column has an unusable type

    @property
    def scenario_column(self) -> str:
        """The user's column (or hive key) the scenario comes from; "" for a constant."""
        return self.cols.scenario or self.cols.scenario_from_partition or ""

    def schema(self) -> pa.Schema:
        """The accepted schema of this mapping (after ``check_parts``): label_invalid at scoring time."""
        return accepted_schema(self.key_types, label_invalid=not self.require_label)

    def _column(self, fld: str, part: FilePart) -> str | None:
        """The user's column of ``fld`` in this file; None when the field is absent (unmapped or missing)."""
        col = getattr(self.cols, fld)
        return None if not col or fld in self.absent.get(part.path, ()) else col

    def _sources(self) -> list[tuple[str, str, str]]:
        """(canonical field, user column, accepted kinds) for every mapped file column."""
        c = self.cols
        out = [("query", c.query, "text"), ("title", c.title, "text")]
        out += [(f, col, "text") for f, col in (("description", c.description), ("url", c.url)) if col]
        out.append(("label", c.label, "label"))
        if c.scenario:
            out.append(("scenario", c.scenario, "scenario"))
        if c.weight:
            out.append(("weight", c.weight, "weight"))
        return out + [(k, k, "key") for k in self.keys]

    def check_parts(self, parts: list[FilePart], problems: list[str] | None = None) -> None:
        """Check every file's columns and types; raise one DataError listing every problem (those already in
        ``problems`` first, e.g. the files that could not be opened)."""
        problems = list(problems or [])
        for part in parts:
            names = part.schema.names
            absent = self.absent.setdefault(part.path, set())
            for fld, col, kind in self._sources():
                if col not in names and col in part.partition:  # a partition key used as a column
                    if kind == "key":
                        self.key_types.setdefault(col, pa.string())
                    continue
                if col not in names:
                    if fld == "label" and not self.require_label:
                        continue
                    if DEFAULT_NAMES.get(fld) == col:  # left at its default name: absent from this file
                        absent.add(fld)
                        continue
                    problems.append(f"{part.path}: column '{col}' (data.columns.{fld if fld in CANONICAL else 'keys'}) "
                                    f"is missing; the file has {names}{_missing_hint(fld)}")
                    continue
                t = part.schema.field(col).type
                if pa.types.is_null(t):  # written entirely of None: a column of nulls
                    if fld == "weight":
                        absent.add(fld)  # no weight given: the default 1.0
                    continue
                if value_kind(t) not in _ACCEPTS[kind]:
                    if fld == "label" and not self.require_label:  # optional at scoring: never a file error
                        self.label_unusable.add(part.path)
                        continue
                    problems.append(f"{part.path}: column '{col}' (mapped to {fld}) has type {t}; "
                                    f"expected one of {sorted(_ACCEPTS[kind])}")
                elif kind == "key":
                    self.key_types.setdefault(col, pa.string() if value_kind(t) == "text" else pa.int64())
            key = self.cols.scenario_from_partition
            if key and key not in part.partition:
                problems.append(f"{part.path}: no hive partition '{key}=...' in the path "
                                f"(data.columns.scenario_from_partition)")
            self.has_label[part.path] = self.cols.label in names or self.cols.label in part.partition
        for k in self.keys:  # a key that is all-null in every file: text
            self.key_types.setdefault(k, pa.string())
        if problems:
            raise DataError(f"{len(problems)} problem{'s' * (len(problems) > 1)} with the input (unreadable files, "
                            "columns that do not match data.columns):\n  - " + "\n  - ".join(problems))

    def read_columns(self) -> list[str]:
        cols = [col for _, col, _ in self._sources()]
        if self.cols.scenario_from_partition:
            cols.append(self.cols.scenario_from_partition)
        return cols

    def canonicalize(self, batch: pa.RecordBatch, rows: np.ndarray, part: FilePart) -> tuple[pa.RecordBatch, pa.RecordBatch]:
        """One batch of a file -> (accepted rows, quarantined rows) in the canonical schemas."""
        n = batch.num_rows
        batch = typed_nulls(batch)
        masks: dict[str, list[tuple[str, np.ndarray]]] = {}  # reason -> [(user column, rows it applies to)]

        def flag(reason: str, mask: np.ndarray | None, column: str = "") -> None:
            if mask is not None and mask.any():
                masks.setdefault(reason, []).append((column, mask))

        raw = self._text_fields(batch, part, flag)
        sc = self._scenario(batch, part, flag)
        lab_raw, label, label_invalid = self._label(batch, part, flag)
        w_raw, weight = self._weight(batch, part, flag)
        text, truncated = self._cut_overlong(raw, part, flag)
        codes, columns = _first_reasons(masks, n)
        keys = [self._key(batch.column(k), part.path, k) for k in self.keys]
        source_file = pa.repeat(pa.scalar(part.path, pa.string()), n)
        ok = codes == 0
        accepted = pa.RecordBatch.from_arrays(
            [text[f] for f in TEXT_FIELDS] + [label, sc, weight] + keys
            + [source_file, pa.array(rows), pa.array(truncated)]
            + ([] if self.require_label else [pa.array(label_invalid, pa.bool_()), *true_lengths(raw)]),
            schema=self.schema(),
        )
        if ok.all():
            return accepted, empty_batch(quarantine_schema(self.keys))
        quarantined = pa.RecordBatch.from_arrays(
            [raw[f] for f in TEXT_FIELDS] + [as_string(lab_raw), sc, as_string(w_raw)]
            + [as_string(batch.column(k)) for k in self.keys]
            + [REASON_NAMES.take(pa.array(codes)), columns, source_file, pa.array(rows)],
            schema=quarantine_schema(self.keys),
        ).filter(pa.array(~ok))
        return accepted.filter(pa.array(ok)), quarantined

    def _text_fields(self, batch: pa.RecordBatch, part: FilePart, flag: Flag) -> dict[str, pa.Array]:
        """Valid-UTF-8 text of each field (absent fields: nulls); flags bad UTF-8, null or blank query/title."""
        raw = {}
        for fld in TEXT_FIELDS:
            col = self._column(fld, part)
            if not col:
                raw[fld] = pa.nulls(batch.num_rows, pa.string())
                continue
            raw[fld], bad = utf8_text(batch.column(col))
            flag("invalid_utf8", bad, col)
            if fld in ("query", "title"):
                nulls = bool_mask(pc.is_null(raw[fld]))
                flag(f"null_{fld}", nulls, col)
                flag(f"empty_{fld}", blank(raw[fld]) & ~nulls, col)
        return raw

    def _scenario(self, batch: pa.RecordBatch, part: FilePart, flag: Flag) -> pa.Array:
        """From a column, a hive partition key, or a constant; flags null, blank and unknown scenarios."""
        c = self.cols
        if c.scenario:
            sc = batch.column(c.scenario)
            if value_kind(sc.type) == "text":
                sc, bad = utf8_text(sc)
                flag("invalid_utf8", bad, c.scenario)
            else:
                sc = pc.cast(sc, pa.string())
        else:
            value = part.partition[c.scenario_from_partition] if c.scenario_from_partition else c.scenario_constant
            sc = pa.repeat(pa.scalar(value, pa.string()), batch.num_rows)
        nulls = bool_mask(pc.is_null(sc))
        where = self.scenario_column
        flag("null_scenario", nulls, where)
        flag("empty_scenario", blank(sc) & ~nulls, where)
        if self.scenarios:
            known = bool_mask(pc.is_in(sc, value_set=pa.array(self.scenarios, pa.string())))
            flag("unknown_scenario", ~known & ~nulls, where)
        return sc

    def _label(self, batch: pa.RecordBatch, part: FilePart, flag: Flag) -> tuple[pa.Array, pa.Array, np.ndarray]:
        """(raw, int8 0/1, label_invalid (n,) bool): binary labels must be 0/1; graded ones are compared with
        the threshold. Ingestion flags bad ones; at scoring time they become null (label_invalid where a
        value was present) and the row stays. Without a label column (scoring only) the label is null."""
        n = batch.num_rows
        if not self.has_label.get(part.path, True):
            nulls = pa.nulls(n, pa.int8())
            return nulls, nulls, np.zeros(n, dtype=bool)
        col = self.cols.label
        raw = batch.column(col)
        if part.path in self.label_unusable:  # scoring only: e.g. a list or timestamp column
            return pa.nulls(n, pa.string()), pa.nulls(n, pa.int8()), bool_mask(pc.is_valid(raw))
        values, bad_type = numbers(raw)
        nulls = bool_mask(pc.is_null(raw))
        threshold = self.cols.label_threshold
        if threshold is None:
            good, label = (values == 0) | (values == 1), values == 1
        else:
            good, label = np.isfinite(values), values >= threshold
        label = label.astype(np.int8)
        if self.require_label:
            flag("bad_type", bad_type, col)
            flag("null_label", nulls, col)
            flag("bad_label", ~good & ~nulls & ~bad_type, col)
            return raw, pa.array(label), np.zeros(n, dtype=bool)
        if value_kind(raw.type) == "text":  # blank text is a missing label, not an invalid one
            nulls |= blank(utf8_text(raw)[0])
        return raw, pa.array(label, mask=~good), ~good & ~nulls

    def _weight(self, batch: pa.RecordBatch, part: FilePart, flag: Flag) -> tuple[pa.Array, pa.Array]:
        """(raw, float32): a weight must be finite and >= 0; 1.0 when no weight column is mapped (or it is
        entirely null)."""
        col = self._column("weight", part)
        if not col:
            return pa.nulls(batch.num_rows, pa.string()), pa.array(np.ones(batch.num_rows, dtype=np.float32))
        raw = batch.column(col)
        values, bad_type = numbers(raw)
        flag("bad_type", bad_type, col)
        flag("bad_weight", ~(np.isfinite(values) & (values >= 0)) & ~bad_type, col)
        return raw, pa.array(values.astype(np.float32))

    def _cut_overlong(self, raw: dict[str, pa.Array], part: FilePart,
                      flag: Flag) -> tuple[dict[str, pa.Array], np.ndarray]:
        """Text longer than max_chars: rejected (overlong), or cut and the row flagged as truncated.
        Absent or null description/url become ""."""
        n = len(raw["query"])
        text, truncated = {}, np.zeros(n, dtype=bool)
        for fld in TEXT_FIELDS:
            col = self._column(fld, part)
            if not col:
                text[fld] = pa.repeat(pa.scalar("", pa.string()), n)
                continue
            text[fld] = raw[fld]
            over = bool_mask(pc.greater(pc.utf8_length(raw[fld]), self.data.max_chars))
            if over.any():
                if self.data.overlong == "reject":
                    flag("overlong", over, col)
                else:
                    text[fld] = pc.utf8_slice_codeunits(raw[fld], 0, self.data.max_chars)
                    truncated |= over
            if fld in ("description", "url"):
                text[fld] = pc.fill_null(text[fld], "")
        return text, truncated

    def _key(self, arr: pa.Array, path: str, name: str) -> pa.Array:
        try:
            return pc.cast(utf8_text(arr)[0] if value_kind(arr.type) == "text" else arr, self.key_types[name])
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: key column '{name}' cannot be cast to {self.key_types[name]} ({e})") from e


def _missing_hint(fld: str) -> str:
    """How to say that a missing column does not exist in the data at all."""
    if fld in OPTIONAL:
        return f"; set data.columns.{fld}: null if your data has none"
    if fld == "scenario":
        return ("; name the scenario column in data.columns.scenario, or use data.columns.scenario_from_partition "
                "or scenario_constant (with scenario: null)")
    if fld not in CANONICAL:
        return "; remove it from data.columns.keys if your data has none"
    return ""


def canonicalize_table(data: DataConfig, table: pa.Table, name: str = "input") -> tuple[pa.Table, pa.Table]:
    """Rows in memory, in the user's own columns -> (accepted canonical rows, quarantined rows), exactly as
    scoring reads a file: ``data.columns``, scoring-time checks (the label optional), every scenario accepted
    (routing unknown ones is the scorer's business). ``source_row`` is the row's index in ``table`` and
    ``source_file`` is ``name``; a hive key (``scenario_from_partition``) is read from a column of that name.
    A missing or mistyped column raises DataError naming it, as for a file."""
    cols = data.columns
    if cols.scenario_from_partition:  # no folders in memory: the partition key comes as a column
        cols = dataclasses.replace(cols, scenario=cols.scenario_from_partition, scenario_from_partition=None)
    mapping = ColumnMapping(dataclasses.replace(data, columns=cols), scenarios=[], require_label=False)
    part = FilePart(name, table.schema, {}, table.num_rows, [], np.zeros(0, dtype=np.int64))
    mapping.check_parts([part])
    accepted, quarantined, start = [], [], 0
    present = [c for c in dict.fromkeys(mapping.read_columns()) if c in table.column_names]
    for batch in table.select(present).to_batches():
        ok, bad = mapping.canonicalize(batch, np.arange(start, start + batch.num_rows, dtype=np.int64), part)
        accepted.append(ok)
        quarantined.append(bad)
        start += batch.num_rows
    return (pa.Table.from_batches(accepted, schema=mapping.schema()),
            pa.Table.from_batches(quarantined, schema=quarantine_schema(mapping.keys)))
