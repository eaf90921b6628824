"""Where a warm-started run starts: ``train.init_from`` resolved to a trained-model folder, copied into the run.

    start = prepare_start(cfg, out_dir, resume=False)    # None for a run from scratch
    start.dir, start.task_map, start.config, start.record

``train.init_from`` names the starting model as any of:

    models:/<name>@<alias>, models:/<name>/<version>   a registered version: the trained-model folder its
                                                       export carries (``trained/``), downloaded alone
    an export folder                                   its ``trained/`` folder
    a training output folder                           its ``model/`` folder
    a trained-model folder                             itself (config.yaml, task_map.json, trainable.safetensors)

The folder is copied to ``<out_dir>/start/`` (with ``start.json``: what it is) before training begins, so a
resumed run continues from the very model it began with, whatever the alias or the folder holds by then. An
export records the digest of its trained state; a copy that does not match it is refused.

``start.record`` says what the run started from: the reference as configured, the registry's name and
version (for a registered model), the export's model version, the digest of the trained state. The trainer
logs it as MLflow tags (``init_from``, ``init_version``, ...) and writes it into the trained-model folder, whose
export copies it into its manifest (``started_from``).
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kernel.atomic import publish_dir, staging_dir, write_json_atomic
from kernel.config import Config, load_config
from kernel.errors import ConfigError, DataError
from kernel.hashing import file_digest
from kernel.mlflow_client import mlflow_client
from kernel.task_map import TASK_MAP_FILE, TaskMap
from modeling.artifact import START_FILE, TRAINABLE_FILE, TRAINED_DIR
from modeling.warm_start import architecture_mismatches

START_DIR = "start"  # under the training output folder
MANIFEST = "manifest.json"  # an export's (serving.layout.MANIFEST_FILE; training does not import serving)

log = logging.getLogger(__name__)


@dataclass
class StartPoint:
    dir: Path  # the local copy of the starting model's trained-model folder
    config: Config  # the config it was trained with
    task_map: TaskMap  # its scenarios, in id order
    record: dict  # what it is (see the module docstring)


def is_registry_ref(ref: str) -> bool:
    return ref.startswith("models:/")


def parse_registry_ref(ref: str) -> tuple[str, str, bool]:
    """``models:/name@alias`` -> (name, alias, True); ``models:/name/3`` -> (name, "3", False)."""
    body = ref[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, True
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise ConfigError(f"train.init_from {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, version, False


def registry_version(ref: str, tracking_uri: str, timeout_s: float = 10.0) -> dict:
    """The registered version ``ref`` names now: {name, version, run_id, source, model_version}. An alias is
    resolved here, once: the job pins the version it finds (its fingerprint) and trains from that version."""
    from mlflow.exceptions import MlflowException

    name, key, is_alias = parse_registry_ref(ref)
    client = mlflow_client(tracking_uri, timeout_s)
    try:
        mv = client.get_model_version_by_alias(name, key) if is_alias else client.get_model_version(name, key)
    except MlflowException as e:
        raise ConfigError(f"train.init_from {ref!r}: not in the registry at {tracking_uri} ({e.message})") from e
    return {"name": name, "version": str(mv.version), "run_id": mv.run_id or "",
            "source": client.get_model_version_download_uri(name, str(mv.version)),
            "model_version": (mv.tags or {}).get("model_version", "")}


def trained_folder(folder: Path) -> Path:
    """The trained-model folder inside a local folder: itself, ``model/`` (training output) or ``trained/`` (export)."""
    for candidate in (folder, folder / "model", folder / TRAINED_DIR):
        if (candidate / TRAINABLE_FILE).is_file():
            return candidate
    raise ConfigError(f"train.init_from {folder}: not a trained-model folder ({TRAINABLE_FILE}), a training output "
                      f"folder (model/) or an export folder ({TRAINED_DIR}/)")


def _export_manifest(folder: Path) -> dict | None:
    """The manifest of the export holding the trained-model folder ``folder`` (None: not inside an export)."""
    manifest = folder.parent / MANIFEST
    if folder.name != TRAINED_DIR or not manifest.is_file():
        return None
    return json.loads(manifest.read_text())


def _expected_digest(manifest: dict | None) -> tuple[str | None, str]:
    """(digest of the trained state an export recorded, its model version)."""
    if manifest is None:
        return None, ""
    return (manifest.get("trained") or {}).get("digest"), str(manifest.get("model_version", ""))


def served_precisions(manifest: dict | None) -> dict | None:
    """What the starting export serves each scenario in, and the digest of each scenario's fp32 graph: an
    export of the warm-started model serves a scenario whose graph is unchanged the same way
    (serving.export.precision_gate). None when the export has no gate's choice."""
    onnx = (manifest or {}).get("onnx") or {}
    digests, serve, gate = onnx.get("fp32_digest"), onnx.get("serve"), onnx.get("gate")
    if not (digests and serve and gate):
        return None
    return {"model_version": str(manifest.get("model_version", "")),
            "gate": {k: gate[k] for k in ("max_abs_dp", "max_auc_change")},
            "scenarios": {s: {"fp32_digest": digests[s], "serve": serve[s]} for s in serve if s in digests}}


def _download_registered(ref: str, tracking_uri: str, into: Path) -> tuple[Path, dict]:
    """The trained-model folder of a registered version, downloaded alone (not the export's checkpoints)."""
    import mlflow

    info = registry_version(ref, tracking_uri)
    source = info["source"].rstrip("/")
    found = [a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=f"{source}/artifacts",
                                                               tracking_uri=tracking_uri) if a.is_dir]
    for sub in found:
        names = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(
            artifact_uri=f"{source}/artifacts/{Path(sub).name}", tracking_uri=tracking_uri)}
        if TRAINED_DIR in names and MANIFEST in names:
            base = f"{source}/artifacts/{Path(sub).name}"
            export = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{MANIFEST}",
                                                              tracking_uri=tracking_uri, dst_path=str(into)))
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{TRAINED_DIR}",
                                                             tracking_uri=tracking_uri, dst_path=str(into)))
            if export.parent != local.parent:
                raise DataError(f"{ref}: downloaded its manifest and trained state into different folders")
            return local, info
    raise DataError(f"train.init_from {ref!r} (version {info['version']}): its export carries no trained state "
                    f"({TRAINED_DIR}/); re-export it with this version of serving.export")


def resolve_start(ref: str, tracking_uri: str | None, into: Path) -> tuple[Path, dict]:
    """(a trained-model folder, its record) for ``ref``; a registered model is downloaded under ``into``."""
    record: dict = {"init_from": ref}
    if is_registry_ref(ref):
        if not tracking_uri:
            raise ConfigError(f"train.init_from {ref!r}: a registered model needs tracking (tracking.enabled)")
        folder, info = _download_registered(ref, tracking_uri, into)
        record.update(registry=tracking_uri, name=info["name"], version=info["version"], run_id=info["run_id"])
    else:
        path = Path(ref)
        if not path.is_dir():
            raise ConfigError(f"train.init_from {ref!r}: no such folder (and not a models:/ reference)")
        folder = trained_folder(path)
        record["path"] = str(folder.resolve())
    manifest = _export_manifest(folder)
    expected, model_version = _expected_digest(manifest)
    digest = file_digest(folder / TRAINABLE_FILE, 12)
    if expected is not None and digest != expected:
        raise DataError(f"train.init_from {ref!r}: {folder / TRAINABLE_FILE} has digest {digest}, its export "
                        f"recorded {expected} (a damaged or altered export)")
    record.update(model_version=model_version, trained_digest=digest,
                  scenarios=TaskMap.load(folder / TASK_MAP_FILE).names)  # its task map: the new one extends it
    served = served_precisions(manifest)
    if served is not None:
        record["served"] = served
    return folder, record


def prepare_start(cfg: Config, out_dir: Path, resume: bool = False, check: bool = True) -> StartPoint | None:
    """The starting model of this run (None without ``train.init_from``), copied into ``<out_dir>/start/``.

    On resume the copy made when the run began is used as it is. With ``check``, ConfigError lists every
    architecture key on which the starting model and this run's config differ."""
    ref = cfg.train.init_from
    if not ref:
        return None
    local = Path(out_dir) / START_DIR
    if not (resume and (local / START_FILE).is_file()):
        with tempfile.TemporaryDirectory(prefix=".start-", dir=_mkdir(out_dir)) as scratch:
            folder, record = resolve_start(ref, cfg.tracking_uri if cfg.tracking.enabled else None, Path(scratch))
            with staging_dir(local) as stage:
                shutil.copytree(folder, stage / START_DIR)
                write_json_atomic(stage / START_DIR / START_FILE, record)
                publish_dir(stage / START_DIR, local)
    start_cfg = load_config(local / "config.yaml")
    mismatches = architecture_mismatches(cfg, start_cfg) if check else []
    if mismatches:
        raise ConfigError(f"train.init_from {ref!r}: the starting model was trained with another architecture; "
                          "a warm start continues the same one (" + "; ".join(mismatches) + ")")
    record = json.loads((local / START_FILE).read_text())
    return StartPoint(local, start_cfg, TaskMap.load(local / TASK_MAP_FILE), record)


def _mkdir(path: Path) -> Path:
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def run_schedule(cfg: Config, warm: bool) -> Config:
    """The config whose train section the run follows: ``cfg`` for a run from scratch; for a warm start, a copy
    with ``train.warm``'s steps (or its fraction of train.max_steps), lr and warm-up (and, for task_only, no
    weight decay: decay would move the known scenarios' rows, whose gradient is held at zero)."""
    if not warm:
        return cfg
    run = copy.deepcopy(cfg)
    t, w = run.train, run.train.warm
    t.max_steps = w.steps or max(1, round(w.fraction * t.max_steps))
    t.lr = w.lr or t.lr
    t.warmup_steps = min(w.warmup_steps, t.max_steps)
    if t.adapt == "task_only":
        t.weight_decay = 0.0
    return run


def warn_if_known_absent(adapt: str, known: list[str], in_data: list[str]) -> str | None:
    """adapt=all on data that holds none of the starting model's scenarios: the shared adapters and the head
    then learn from the new scenarios' rows alone, and the known scenarios drift. The warning (also returned)
    names them and the two ways out."""
    if adapt != "all" or set(known) & set(in_data):
        return None
    message = (f"train.adapt=all, and the data holds none of the starting model's {len(known)} scenarios "
               f"({', '.join(known)}): the shared weights train on {', '.join(in_data)} alone, and the known "
               "scenarios' scores will move (docs/new_market.md: up to 0.036 AUC after 100 steps on 100 new rows). "
               "train.adapt=task_only keeps them bit for bit; the promotion gate compares them given "
               "monitoring.gate_eval")
    log.warning(message)
    return message
