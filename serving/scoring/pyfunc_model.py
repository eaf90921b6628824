"""The registered model as an MLflow pyfunc: an export folder behind ``mlflow.pyfunc.load_model``.

    model = mlflow.pyfunc.load_model("models:/ads-relevance@champion")
    model.predict(frame)     # the columns serving.score reads (the export's data.columns): e.g. query, title, scenario
    # -> score, score_raw, score_calibrated, decision, scored_as, fallback, status, reason, model_version
    #    (one row per input row, in order)

Logged "from code" (MLflow's models-from-code): this file is stored with the model and run on load, so no
Python object is pickled; the weights are the export's safetensors, carried as the artifact ``export``, and
the project code it imports travels with the model (``code_paths``). The scores are those of
``python -m serving.score`` with the export's own config (the same ``BatchScorer``): ``mlflow models serve`` and
``mlflow.pyfunc.spark_udf`` score exactly as the batch job does.

Input: the same columns as ``python -m serving.score`` reads, through the export's ``data.columns`` (the model
carries its mapping, and its signature names them: serving.registry.register.input_columns): the query and
title columns, the scenario column (a hive partition key, ``scenario_from_partition``, comes as a column of
that name), and description and url when mapped. Every row comes back, in order, with the batch scorer's
behaviour: an unknown scenario is scored as ``serving.fallback_scenario`` when the export's config routes it
there (status "fallback"), else it gets no score, status "quarantined" and reason "unknown_scenario"; a row
that fails ingestion's checks (e.g. an empty query) gets status "quarantined" and that check's reason.
``score`` and ``decision`` mean what they mean in the batch output (serving.scoring.scorer).

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

OUTPUT_COLUMNS = ("score", "score_raw", "score_calibrated", "decision", "scored_as", "fallback", "status", "reason",
                  "model_version")


class RelevancePyfunc(PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        from kernel.config import load_config
        from serving.registry.cache import resolve_model
        from serving.scoring.table import log_event, scorer_for

        # A registered version's copy of the export holds its registration record (registered.json, written by
        # serving.registry.register): rows carry the registry's name/version, else the export's own digest.
        export_dir, version = resolve_model(Path(context.artifacts["export"]))
        meta = export_dir.parents[1] / "registered_model_meta"  # <model>/artifacts/<export>: MLflow's record
        if meta.is_file():  # MLflow < 3.18 also says which version it was loaded as (e.g. a copied version)
            import yaml

            m = yaml.safe_load(meta.read_text()) or {}
            if m.get("model_name") and m.get("model_version"):
                version = f"{m['model_name']}/{m['model_version']}"
        cfg = load_config(export_dir / "config.yaml")
        log_event("pyfunc_loaded", export=str(export_dir), version=version)
        self.scorer = scorer_for(export_dir, cfg.serving, version)  # the weights: once per process
        self.data = cfg.data
        self.chunk = cfg.serving.chunk_rows

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from serving.scoring.table import log_event, score_user_rows

        log_event("predict", rows=len(model_input))
        table = pa.Table.from_pandas(model_input.reset_index(drop=True), preserve_index=False)
        scored = score_user_rows(self.scorer, self.data, table, self.chunk)
        return scored.select(list(OUTPUT_COLUMNS)).to_pandas()


mlflow.models.set_model(RelevancePyfunc())
