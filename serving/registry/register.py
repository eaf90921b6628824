"""An export folder as a first-class MLflow model: a pyfunc, registered, linked to the run that trained it.

    registered = register_export(export_dir, uri, experiment="ads-relevance", name="ads-relevance",
                                 training_run="3fa0...", parent_run="91bc...")
    mlflow.pyfunc.load_model("models:/ads-relevance/3").predict(frame)      # anywhere, in a fresh process

What is registered: the pyfunc of ``serving/scoring/pyfunc_model.py`` (logged from code: no pickle), with the export
folder as its artifact ``export``, the project code it needs (``code_paths``), a signature and an input
example. It is logged into the training run when there is one, so the registered version links to the run
that trained it (the UI's "Source run"); the export's own run (a child of the job's run) is tagged on the
version (``export_run_id``). ``registered.json`` is written into the export folder afterwards, and into the
registered model's own copy of it, so that scores made from either carry the registry's ``name/version``
(serving.registry.cache.folder_version): MLflow does not tell a loaded model which registered version it is
(3.18 dropped its ``registered_model_meta`` file).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pandas as pd

from kernel.atomic import write_json_atomic
from kernel.config import load_config
from kernel.metric_names import VAL, metric_name
from kernel.mlflow_client import artifact_location, fluent_uri, mlflow_client, source_tags
from serving.layout import REGISTERED_FILE, read_manifest

# The pyfunc is scoring code (it imports the scorer); it is referred to by path, never imported from here.
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "scoring" / "pyfunc_model.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
# What the pyfunc imports when it loads (serving.scoring.scorer and everything below it).
CODE_PACKAGES = ("kernel", "modeling", "evaluation", "features", "pipeline", "serving")
REQUIREMENTS = ("torch", "transformers", "pyarrow", "safetensors", "scikit-learn", "pandas", "pyyaml", "mlflow",
                "numpy", "onnx", "onnxruntime")


def input_columns(columns) -> dict[str, str]:
    """Canonical field -> the user's column the pyfunc reads it from (``data.columns``: the columns
    ``serving.score`` reads); description and url only when mapped, the scenario from its column or, for hive
    data, from a column named after the partition key (none for a constant scenario)."""
    fields = {"query": columns.query, "title": columns.title, "description": columns.description,
              "url": columns.url, "scenario": columns.scenario or columns.scenario_from_partition}
    return {f: c for f, c in fields.items() if c}


def signature(columns):
    """The pyfunc's input (the user's columns of ``columns``, a ColumnsConfig) and output schemas."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    optional = ("description", "url")
    inputs = Schema([ColSpec("string", col, required=field not in optional)
                     for field, col in input_columns(columns).items()])
    outputs = Schema([ColSpec("float", "score", required=False), ColSpec("float", "score_raw", required=False),
                      ColSpec("float", "score_calibrated", required=False),
                      ColSpec("boolean", "decision", required=False), ColSpec("string", "scored_as", required=False),
                      ColSpec("boolean", "fallback", required=False), ColSpec("string", "status"),
                      ColSpec("string", "reason", required=False), ColSpec("string", "model_version")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(export_dir: Path, columns, rows: pd.DataFrame | None) -> pd.DataFrame:
    """A few rows in the user's columns (``columns``): from the canonical validation split when given, else
    one row per scenario."""
    if rows is None or not len(rows):
        scenarios = list(read_manifest(export_dir)["scenarios"])
        rows = pd.DataFrame({"query": ["running shoes"] * len(scenarios),
                             "title": ["Acme trail runner"] * len(scenarios), "description": [""] * len(scenarios),
                             "url": [""] * len(scenarios), "scenario": scenarios})
    mapped = input_columns(columns)
    return rows[list(mapped)].head(3).rename(columns=mapped).reset_index(drop=True)


def _requirements() -> list[str]:
    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(dist)
    return out


def gate_metrics(manifest: dict) -> dict[str, float]:
    """The precision gate's figures as MLflow metrics, measured on the validation split:
    ``val/gate_<candidate>_max_abs_dp/<scenario>``, ``..._auc_change`` and ``..._passed`` (0/1) per scenario and
    candidate (kernel.metric_names)."""
    out = {}
    gate = (manifest.get("onnx") or {}).get("gate") or {}
    for scenario, res in (gate.get("scenarios") or {}).items():
        for cand, r in res["candidates"].items():
            for k in ("max_abs_dp", "auc_change"):
                if r.get(k) is not None:
                    out[metric_name(VAL, f"gate_{cand}_{k}", scenario)] = float(r[k])
            out[metric_name(VAL, f"gate_{cand}_passed", scenario)] = float(r["passed"])
    return out


def register_export(out: Path, tracking_uri: str, experiment: str, name: str, alias: str | None = None,
                    training_run: str | None = None, parent_run: str | None = None,
                    example: pd.DataFrame | None = None, description: str | None = None,
                    timeout_s: float = 10.0, artifact_root: str = "") -> dict:
    """Log the export as a pyfunc (into the training run when given), register a new version of ``name``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri, timeout_s)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifact_location(tracking_uri, experiment, artifact_root))
    tags = {**source_tags("serving.export"), "stage": "export", "source_run": training_run or ""}
    if parent_run:
        tags["mlflow.parentRunId"] = parent_run
    export_run = client.create_run(exp_id, run_name="export", tags=tags).info.run_id
    manifest = read_manifest(out)
    columns = load_config(out / "config.yaml").data.columns  # the mapping the pyfunc reads its input with
    client.log_param(export_run, "model_version", manifest["model_version"])
    for key, value in gate_metrics(manifest).items():
        client.log_metric(export_run, key, value)
    # The registry looks the logged model up through MLflow's global tracking URI: register inside the block.
    with fluent_uri(tracking_uri):
        with mlflow.start_run(run_id=training_run or export_run):
            info = mlflow.pyfunc.log_model(
                name="relevance_model", python_model=str(PYFUNC_CODE), artifacts={"export": str(out)},
                code_paths=[str(REPO_ROOT / p) for p in CODE_PACKAGES], signature=signature(columns),
                input_example=input_example(out, columns, example), pip_requirements=_requirements())
        client.set_terminated(export_run)
        try:
            client.create_registered_model(name, description="Query-ad relevance, one model for many scenarios "
                                                              "(MTL-LoRA). Each version's description has its evidence.")
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        mv = client.create_model_version(
            name, source=info.model_uri, run_id=training_run or export_run, description=description,
            tags={"export_run_id": export_run, "training_run_id": training_run or "", "job_run_id": parent_run or "",
                  "model_version": manifest["model_version"],
                  "data_fingerprint": manifest.get("data_fingerprint") or ""},
            model_id=info.model_id)
    registered = {"name": name, "version": str(mv.version), "alias": alias, "run_id": training_run or export_run,
                  "export_run_id": export_run, "registry": tracking_uri, "model_version": manifest["model_version"],
                  "uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{mv.version}"}
    write_json_atomic(out / REGISTERED_FILE, registered)
    # Into the registered model's copy too, before the alias: whoever loads it through the alias finds it there.
    client.log_model_artifact(info.model_id, str(out / REGISTERED_FILE),
                              info.flavors["python_function"]["artifacts"]["export"]["path"])
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return registered
