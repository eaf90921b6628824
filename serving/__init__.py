"""Serving: export merged per-scenario models and batch-score Parquet."""
