"""What a large scoring job's output must satisfy, checked without turning rows into Python objects.

    check_outputs(out_dir, input_dir)   # -> {"rows", "quarantined", "digest", "files"}; raises on a bad output

One output row per input row: every (source_file, source_row) of every input file appears exactly once,
either scored (``<out>/...``) or quarantined (``<out>/_quarantine/...``), and no other row appears. The
content digest is keyed on (source_file, source_row): per input file, its scored rows (then its
quarantined rows) sorted by source_row, every column's values and nulls hashed in a fixed column order;
the job's digest hashes the per-file digests in file order. It does not depend on how the rows were split
into parts, on the order of parts or of rows inside them, or on the file layout of the output, so two runs
of the same job (one killed and resumed) must give the same digest.

Memory: one input file's output rows at a time (Arrow columns and NumPy arrays, no per-row Python objects).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def _parts(folder: Path) -> list[Path]:
    """Parquet files under ``folder``, skipping names that start with "_" or "." (markers, quarantine,
    temporaries), as a pyarrow dataset would."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.parquet")
                  if not any(x.startswith(("_", ".")) for x in p.relative_to(folder).parts))


def _by_source_file(parts: list[Path]) -> dict[str, list[Path]]:
    """source_file -> the parts holding its rows (read from the parts' source_file column alone)."""
    found: dict[str, list[Path]] = {}
    for p in parts:
        names = pc.unique(pq.read_table(p, columns=["source_file"]).column("source_file").combine_chunks())
        for name in names.to_pylist():  # distinct file names: one or a few per part
            found.setdefault(name, []).append(p)
    return found


def column_bytes(arr: pa.Array) -> list[bytes]:
    """A column's values and nulls as bytes that depend on the values alone (not on buffer layout)."""
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = pc.fill_null(arr, "")
        width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset: arr.offset + len(arr) + 1]
        data = arr.buffers()[2]
        text = b"" if data is None else data.to_pybytes()[int(offsets[0]): int(offsets[-1])]
        return [nulls.tobytes(), np.diff(offsets).astype(np.int64).tobytes(), text]
    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    values = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
    return [nulls.tobytes(), np.ascontiguousarray(values).tobytes()]


def table_digest(table: pa.Table) -> str:
    """sha256 of ``table``'s columns (sorted by name), each column's values and nulls (column_bytes)."""
    h = hashlib.sha256()
    for name in sorted(table.column_names):
        h.update(f"{name}:{table.schema.field(name).type}:{table.num_rows}".encode())
        for chunk in column_bytes(table.column(name).combine_chunks()):
            h.update(len(chunk).to_bytes(8, "little"))
            h.update(chunk)
    return h.hexdigest()


def _file_rows(parts: list[Path], source_file: str) -> pa.Table:
    """The rows of ``source_file`` in ``parts``, sorted by source_row."""
    tables = [pq.read_table(p) for p in parts]
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    t = t.filter(pc.equal(t.column("source_file"), source_file))
    return t.take(pc.sort_indices(t, [("source_row", "ascending")]))


def check_outputs(out: Path, inputs: Path) -> dict:
    """Check ``out`` (a serving.score output folder) against the Parquet files of ``inputs``; returns
    {"rows": input rows, "quarantined": rows quarantined, "digest": the job's content digest, "files": n}.
    Raises AssertionError naming the input file when a row is missing, repeated or foreign."""
    expected = {str(p.resolve()): pq.read_metadata(p).num_rows for p in sorted(Path(inputs).rglob("*.parquet"))}
    scored = _by_source_file(_parts(Path(out)))
    quarantined = _by_source_file(_parts(Path(out) / "_quarantine"))
    foreign = (set(scored) | set(quarantined)) - set(expected)
    assert not foreign, f"{out}: rows of files that are not inputs: {sorted(foreign)[:3]}"
    job = hashlib.sha256()
    n_quarantined = 0
    for source_file, n in expected.items():
        rows = []
        job.update(source_file.encode())
        for where, found in (("scored", scored), ("quarantined", quarantined)):
            if source_file not in found:
                job.update(f"{where}:none".encode())
                continue
            t = _file_rows(found[source_file], source_file)
            rows.append(t.column("source_row").to_numpy())
            n_quarantined += t.num_rows if where == "quarantined" else 0
            job.update(f"{where}:{table_digest(t)}".encode())
        got = np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
        if not np.array_equal(got, np.arange(n)):
            repeated = int(np.sum(got[1:] == got[:-1])) if len(got) else 0
            missing = n - len(np.unique(got[(got >= 0) & (got < n)]))
            raise AssertionError(f"{source_file}: {n} input rows, {len(got)} output rows ({repeated} repeated, "
                                 f"{missing} missing)")
    return {"rows": sum(expected.values()), "quarantined": n_quarantined, "digest": job.hexdigest(),
            "files": len(expected)}
