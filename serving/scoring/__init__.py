"""The scoring wing: ``python -m serving.score`` turns Parquet rows into scores through an export folder."""
