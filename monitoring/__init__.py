"""Monitoring: per-scenario quality, calibration and drift; MLflow model-registry promotion."""
