"""The registered model as an MLflow pyfunc: an export folder behind ``mlflow.pyfunc.load_model``.

    model = mlflow.pyfunc.load_model("models:/ads-relevance@champion")
    model.predict(pd.DataFrame({"query": [...], "title": [...], "scenario": [...]}))
    # -> score, score_raw, score_calibrated, decision, scored_as, fallback, model_version (one row per input row)

Logged "from code" (MLflow's models-from-code): this file is stored with the model and run on load, so no
Python object is pickled; the weights are the export's safetensors, carried as the artifact ``export``, and
the project code it imports travels with the model (``code_paths``). The scores are those of
``python -m serving.score`` with the export's own config (the same ``BatchScorer``): ``mlflow models serve`` and
``mlflow.pyfunc.spark_udf`` score exactly as the batch job does.

Input columns: query, title (strings), scenario (string), description and url (optional strings, "" when
absent). Rows of a scenario the model does not know get null scores unless the export's config routes them
to a fallback scenario.

Loaded once per process: MLflow builds a new pyfunc object, and calls ``load_context``, wherever it loads the
model (``mlflow.pyfunc.spark_udf`` does so for every task in local mode), but the weights are read only the
first time in a process (serving.scoring.table.scorer_for keeps them), so a Spark executor's Python worker
holds one copy for all its tasks and batches. ``ADS_RELEVANCE_LOAD_LOG`` records both (table.log_event).
"""
from __future__ import annotations

import mlflow
import pandas as pd
import pyarrow as pa
from mlflow.pyfunc import PythonModel

INPUT_COLUMNS = ("query", "title", "description", "url", "scenario")
OUTPUT_COLUMNS = ("score", "score_raw", "score_calibrated", "decision", "scored_as", "fallback", "model_version")


class RelevancePyfunc(PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        from kernel.config import load_config
        from serving.registry.cache import resolve_model
        from serving.scoring.table import log_event, scorer_for

        export_dir, version = resolve_model(Path(context.artifacts["export"]))
        meta = export_dir.parents[1] / "registered_model_meta"  # <model>/artifacts/<export>: MLflow's record
        if meta.is_file():  # loaded as a registered version: rows carry the registry's name/version
            import yaml

            m = yaml.safe_load(meta.read_text()) or {}
            if m.get("model_name") and m.get("model_version"):
                version = f"{m['model_name']}/{m['model_version']}"
        cfg = load_config(export_dir / "config.yaml")
        log_event("pyfunc_loaded", export=str(export_dir), version=version)
        self.scorer = scorer_for(export_dir, cfg.serving, version)  # the weights: once per process
        self.chunk = cfg.serving.chunk_rows

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        missing = {"query", "title", "scenario"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input columns {sorted(missing)} are missing (have {list(model_input.columns)})")
        n = len(model_input)
        cols = {c: model_input[c].fillna("").astype(str).tolist() if c in model_input.columns else [""] * n
                for c in INPUT_COLUMNS}
        from serving.scoring.table import log_event, score_chunks

        log_event("predict", rows=n)
        table = pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})
        return score_chunks(self.scorer, table, self.chunk).select(list(OUTPUT_COLUMNS)).to_pandas()


mlflow.models.set_model(RelevancePyfunc())
