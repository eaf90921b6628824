"""What a dataset logged to MLflow carries besides its fingerprint: its schema and a profile.

    schema, profile = describe_parquet("runs/demo/data/train.parquet")     # a file or a folder, local or a URI
    schema   # '{"mlflow_colspec": [{"name": "query", "type": "string", "required": true}, ...]}' (MLflow's form)
    profile  # {"rows": 2400, "rows_per_scenario": {"us": 600, ...}, "label_rate": 0.25,
             #  "label_rate_per_scenario": {"us": 0.26, ...}, "labelled_rows": 2400}

The profile reads two columns, ``scenario`` and ``label`` (canonical data: ingest's splits, batch scoring's
output), whichever of them exist; the schema reads only the footers. Hidden files and folders ("_", ".") are
not data (batch scoring's quarantine and markers).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from kernel import storage

# Arrow types as MLflow's column specs name them; anything else is described as a string.
_MLFLOW_TYPES = [(pa.types.is_boolean, "boolean"), (pa.types.is_int64, "long"), (pa.types.is_integer, "integer"),
                 (pa.types.is_float32, "float"), (pa.types.is_floating, "double"), (pa.types.is_binary, "binary"),
                 (pa.types.is_timestamp, "datetime")]


def _dataset(path: str | Path) -> ds.Dataset:
    fs, inner = storage.resolve(path)
    return ds.dataset(inner, filesystem=fs, format="parquet", partitioning="hive",
                      exclude_invalid_files=False, ignore_prefixes=["_", "."])


def mlflow_schema(schema: pa.Schema) -> str:
    """``schema`` as the JSON MLflow's dataset entity holds (``{"mlflow_colspec": [...]}``)."""
    def kind(t: pa.DataType) -> str:
        return next((name for test, name in _MLFLOW_TYPES if test(t)), "string")

    return json.dumps({"mlflow_colspec": [{"name": f.name, "type": kind(f.type), "required": not f.nullable}
                                          for f in schema]})


def profile_table(table: pa.Table) -> dict:
    """Rows, rows per scenario, and the label rate overall and per scenario (of the rows with a label)."""
    out: dict = {"rows": table.num_rows}
    if "scenario" in table.column_names:
        counts = {str(c["values"]): int(c["counts"]) for c in pc.value_counts(table.column("scenario")).to_pylist()}
        out["rows_per_scenario"] = dict(sorted(counts.items()))
    if "label" in table.column_names:
        label = pc.cast(table.column("label"), pa.float64())
        out["labelled_rows"] = int(table.num_rows - label.null_count)
        out["label_rate"] = pc.mean(label).as_py()
        if "scenario" in table.column_names:
            grouped = pa.table({"scenario": table.column("scenario"), "label": label}).group_by("scenario").aggregate(
                [("label", "mean")])
            out["label_rate_per_scenario"] = dict(sorted(zip(map(str, grouped["scenario"].to_pylist()),
                                                             grouped["label_mean"].to_pylist())))
    return out


def parquet_schema(path: str | Path) -> str:
    """The MLflow schema JSON of the Parquet file or folder ``path`` (footers only)."""
    return mlflow_schema(_dataset(path).schema)


def describe_parquet(path: str | Path, profile_of: str | Path | None = None) -> tuple[str, dict]:
    """(MLflow schema JSON, profile) of the Parquet file or folder ``path``; the profile is read from
    ``profile_of`` when given (e.g. the scored output of an input whose columns are the user's own)."""
    data = _dataset(path)
    source = data if profile_of is None else _dataset(profile_of)
    wanted = [c for c in ("scenario", "label") if c in source.schema.names]
    return mlflow_schema(data.schema), profile_table(source.to_table(columns=wanted))
