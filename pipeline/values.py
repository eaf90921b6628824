"""Arrow values as the column checks see them: a column's kind, text as valid UTF-8, numbers parsed from text,
blank and null masks. Vectorised pyarrow/numpy over one record batch; no per-row Python except on the
rare rows with invalid UTF-8.

    value_kind(pa.large_string())  -> "text"  # text, bool, int, float or other
    utf8_text(arr)           -> (string array with invalid bytes escaped, invalid-row mask or None)
    numbers(arr)             -> (float64 values, NaN for null/unparsable; mask of unparsable text)
    blank(arr), bool_mask(pc.is_null(arr)), typed_nulls(batch), as_string(arr)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NUMBER = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"


def value_kind(t: pa.DataType) -> str:
    """The kind of values an Arrow type holds: text, bool, int, float or other."""
    if pa.types.is_dictionary(t):
        return value_kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "text"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    return "other"


def bool_mask(arr: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, nulls False."""
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False)


def invalid_utf8_rows(arr: pa.Array) -> np.ndarray | None:
    """Rows of a string-typed array whose bytes are not UTF-8 (None: all valid). Bisects with the
    vectorised validator, so clean data costs one pass and each bad row O(log n) passes on halves."""
    try:
        arr.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    bad = np.zeros(len(arr), dtype=bool)
    stack = [(0, len(arr))]
    while stack:
        lo, hi = stack.pop()
        if hi - lo <= 32:  # small enough to look at the bytes
            for i, v in enumerate(arr.slice(lo, hi - lo).view(pa.binary()).to_pylist()):
                if v is not None:
                    try:
                        v.decode("utf-8")
                    except UnicodeDecodeError:
                        bad[lo + i] = True
            continue
        mid = (lo + hi) // 2
        for a, b in ((lo, mid), (mid, hi)):
            try:
                arr.slice(a, b - a).validate(full=True)
            except pa.ArrowInvalid:
                stack.append((a, b))
    return bad


def utf8_text(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Any text-kind column -> (valid-UTF-8 string array, invalid-UTF-8 row mask or None).
    Invalid values are replaced by their backslash-escaped form so the quarantine keeps them readably."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string_view(arr.type) or pa.types.is_binary_view(arr.type):
        arr = pc.cast(arr, pa.large_binary() if pa.types.is_binary_view(arr.type) else pa.large_string())
    if pa.types.is_binary(arr.type):
        arr = arr.view(pa.string())
    elif pa.types.is_large_binary(arr.type):
        arr = arr.view(pa.large_string())
    bad = invalid_utf8_rows(arr)
    if bad is not None and bad.any():
        raw = arr.view(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
        fixed = [raw[int(i)].as_py().decode("utf-8", "backslashreplace") for i in np.flatnonzero(bad)]
        arr = pc.replace_with_mask(arr, pa.array(bad), pa.array(fixed, arr.type))
    if pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr, bad


def numbers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Numeric values as float64 (NaN for null or unparsable) and the mask of unparsable text."""
    if value_kind(arr.type) == "text":
        s = pc.utf8_trim_whitespace(utf8_text(arr)[0])
        ok = pc.match_substring_regex(s, NUMBER)
        values = pc.cast(pc.if_else(ok, s, pa.scalar(None, pa.string())), pa.float64())
        bad_type = bool_mask(pc.and_(pc.invert(ok), pc.is_valid(arr)))
    else:
        values, bad_type = pc.cast(arr, pa.float64()), np.zeros(len(arr), dtype=bool)
    return pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False), bad_type


def blank(arr: pa.Array) -> np.ndarray:
    return bool_mask(pc.or_(pc.equal(pc.binary_length(arr), 0), pc.utf8_is_space(arr)))


def typed_nulls(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Columns of Arrow type null (all None) -> string nulls, so every check treats them as null values."""
    for i, f in enumerate(batch.schema):
        if pa.types.is_null(f.type):
            batch = batch.set_column(i, f.name, pa.nulls(batch.num_rows, pa.string()))
    return batch


def as_string(arr: pa.Array) -> pa.Array:
    """Raw values as text for the quarantine (binary via the escaping UTF-8 path)."""
    if value_kind(arr.type) == "text":
        return utf8_text(arr)[0]
    return pc.cast(arr, pa.string())
