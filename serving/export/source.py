"""What an export starts from: the trained-model folder, the run that trained it, and the export's config.

    with trained_model("3fa0...", tracking_uri, near=out) as (model_dir, run_id):   # a run id, or a folder
        cfg = export_config(model_dir, load_config("deploy.yaml"), ["serving.calibrate=true"])

``--run`` takes an MLflow run id (its artifact ``model`` is downloaded), a training output folder (holding
``model/``) or a trained-model folder itself (config.yaml, task_map.json, trainable.safetensors).

The export's config is the trained one with its deployment sections (data mapping, serving, monitoring,
tracking) taken from a deployment config and ``key=value`` overrides; the sections the weights depend on
(MODEL_SECTIONS) always stay as trained, and the export checks that they do.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from kernel import storage
from kernel.config import Config, apply_overrides, config_from_dict, load_config, to_dict
from kernel.errors import ConfigError, DataError
from kernel.mlflow_client import mlflow_client
from modeling.artifact import TRAINABLE_FILE

MODEL_SECTIONS = ("model", "adapter", "features", "train")  # what the trained weights depend on
CONFIG_FILE = "config.yaml"  # of a trained-model folder (modeling.artifact) and of an export


def resolve_source(run: str, tracking_uri: str | None, scratch: Path) -> tuple[Path, str | None]:
    """(trained-model folder, source run id or None) for a run id, a training out dir or a model dir."""
    p = Path(run)
    if p.is_dir():
        for candidate in (p, p / "model"):
            if (candidate / TRAINABLE_FILE).is_file():
                return candidate, None
        raise DataError(f"--run {run}: neither {p} nor {p / 'model'} is a trained-model folder "
                        f"(config.yaml, task_map.json, {TRAINABLE_FILE})")
    import mlflow

    if tracking_uri:
        mlflow_client(tracking_uri)  # bounded waits; an unreachable server is ServiceUnavailable, now
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run}/model", tracking_uri=tracking_uri,
                                                    dst_path=str(scratch))
    except Exception as e:  # MLflow raises its own exception types for unknown runs and artifacts
        raise DataError(f"--run {run}: not a folder, and no MLflow run with artifact 'model' at {tracking_uri} "
                        f"({type(e).__name__}: {e})") from e
    return Path(local), run


@contextmanager
def trained_model(run: str, tracking_uri: str | None, near: str | Path) -> Iterator[tuple[Path, str | None]]:
    """``resolve_source`` with its scratch folder: a download lands beside ``near`` (the export's folder; a
    system temporary folder when that is a URI) and is removed when the block ends."""
    local_parent = None if storage.is_uri(near) else Path(near).parent
    if local_parent is not None:
        local_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=local_parent) as scratch:
        yield resolve_source(run, tracking_uri, Path(scratch))


def run_tags(run_id: str | None, tracking_uri: str | None) -> dict:
    """The tags of the training run (git commit, data fingerprint); {} without a run."""
    if not run_id:
        return {}
    from mlflow.exceptions import MlflowException

    try:
        return dict(mlflow_client(tracking_uri).get_run(run_id).data.tags)
    except MlflowException as e:
        raise DataError(f"source run {run_id}: not found at {tracking_uri} ({e.message})") from e


def trained_metrics(model_dir: str | Path) -> dict:
    """The validation metrics the trainer recorded beside the weights ({} when there are none)."""
    path = Path(model_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def export_config(model_dir: str | Path, deployment: Config | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config an export of ``model_dir`` carries: the trained one, with the deployment sections (data
    mapping, serving, monitoring, tracking) taken from ``deployment`` (default: as trained) and ``overrides``;
    the sections the weights depend on stay as trained (overriding one is an error)."""
    trained = load_config(Path(model_dir) / CONFIG_FILE)
    overrides = list(overrides)
    touched = sorted({o.split("=", 1)[0] for o in overrides if o.split(".", 1)[0] in MODEL_SECTIONS})
    if touched:
        raise ConfigError(f"overrides {touched}: the exported weights were trained with these; retrain to change them")
    if deployment is None and not overrides:
        return trained
    deployed = to_dict(deployment if deployment is not None else trained)
    apply_overrides(deployed, overrides)
    for section in MODEL_SECTIONS:
        deployed[section] = to_dict(trained)[section]
    deployed["work_dir"] = trained.work_dir
    return config_from_dict(deployed)


def check_trained_sections(cfg: Config, trained: Config, model_dir: str | Path) -> None:
    """ConfigError when ``cfg`` differs from the trained config in a section the weights depend on."""
    changed = [s for s in MODEL_SECTIONS if to_dict(cfg)[s] != to_dict(trained)[s]]
    if changed:
        raise ConfigError(f"config sections {changed} differ from those the weights in {model_dir} were trained "
                          "with; an export keeps them as trained (serving.export.source.export_config)")
