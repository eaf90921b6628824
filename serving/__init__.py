"""Serving: export trained models, batch-score Parquet with them, keep them in the model registry.

    serving/export/     python -m serving.export: a trained-model folder -> an export folder
    serving/scoring/    python -m serving.score (serving/score.py): Parquet rows -> scores, through an export
    serving/registry/   the MLflow model registry: registering an export, checked local copies of registered
                        versions, aliases and decision tags
    serving/layout.py   the export folder's files, which all three read

Imports point down this list (pyproject.toml's contracts): export -> scoring (its calibration fit scores the
validation split) -> registry -> layout.
"""
