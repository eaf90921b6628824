"""Ingestion: Parquet in, validated and scenario-tagged query–ad pairs out (plus quarantine)."""
