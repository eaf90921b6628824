"""Serving: export trained models, batch-score Parquet with them, keep them in the model registry.

    serving/export/     python -m serving.export: a trained-model folder -> an export folder
    serving/scoring/    python -m serving.score (serving/score.py): Parquet rows -> scores, through an export
    serving/registry/   the MLflow model registry: registering an export, checked local copies of registered
                        versions, aliases and decision tags
    serving/layout.py   the export folder's files, which all three read

Imports point down this list (pyproject.toml's contracts): export -> scoring (its calibration fit scores the
validation split) -> registry -> layout.
"""
import kernel  # first: it checks that each top-level name of the project resolves to this project

ADS_RELEVANCE = True  # the marker kernel.check_packages looks for
if not getattr(kernel, "ADS_RELEVANCE", False):
    raise ImportError(f"'kernel' resolves to {kernel.__file__}, which is not ads-relevance's: another installed "
                      "package shadows it; install ads-relevance into a virtual environment of its own")
