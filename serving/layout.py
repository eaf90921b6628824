"""The export folder: file names, the manifest, and atomic writes shared by export and scoring.

    <export>/
        manifest.json              per scenario its directories, pooling, metrics, source run, data
                                   fingerprint, calibration/thresholds when present, model version
        task_map.json              scenario -> task id: a copy of the file ingestion wrote
        config.yaml                the resolved Config: as trained, deployment sections as exported
        base/                      compact artifact, part 1: the frozen base weights once (plus the shared
                                   trained head), a plain transformers checkpoint + tokenizer
        factors.safetensors        compact artifact, part 2: per scenario and adapted layer the LoRA pair
                                   "<task>.<layer>.A" (r, in) and "<task>.<layer>.U" (out, r), fp32
        adapters/<scenario>/       the same pair as a standard PEFT LoRA adapter (scaling 1) over base/
        scenarios/<scenario>/      a plain checkpoint with that scenario's ΔW merged into the weights
        calibration.json           per-scenario calibration (optional, fitted on --valid)
        reference.json             score/length reference profile for drift monitoring (optional)
        registered.json            the registry's name and version, once registered (serving.registry.register)
        trained/                   the trained-model folder (modeling.artifact): what a warm start continues
                                   (train.init_from); the manifest's ``trained.digest`` is its weights' digest,
                                   ``started_from`` what a warm-started model itself started from

Pooling "cls"/"last": base/ and scenarios/<s>/ load with ``AutoModelForSequenceClassification`` and the
score is ``sigmoid(logits[:, 0])``. Pooling "mean": no built-in transformers class pools by a masked mean over
token states, so each folder carries its model code (``modeling_ads_relevance.py``, named in config.json's
``auto_map``) and loads with ``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)``;
without ``trust_remote_code`` transformers refuses to load it (never a silently random head). The manifest's
``head`` entry spells the formula out.
"""
from __future__ import annotations

import re
from pathlib import Path

from kernel.errors import DataError
from kernel.hashing import file_digest
from kernel.storage import read_json
from kernel.task_map import TASK_MAP_FILE, TaskMap

MANIFEST_FILE = "manifest.json"
BASE_DIR = "base"
FACTORS_FILE = "factors.safetensors"
ADAPTERS_DIR = "adapters"
SCENARIOS_DIR = "scenarios"
REGISTERED_FILE = "registered.json"  # written after registration: name, version, registry, runs
REFERENCE_FILE = "reference.json"  # drift reference of raw scores (serving.calibrate off)
CALIBRATED_REFERENCE_FILE = "reference_calibrated.json"  # ... of calibrated scores (serving.calibrate on)
FORMAT_VERSION = 2  # 2: mean-pooling checkpoints are whole models (no head.safetensors)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")


def scenario_dirname(name: str, task_id: int) -> str:
    """A file-system-safe directory name for a scenario: the name itself when safe, else ``task<id>``."""
    return name if _SAFE_NAME.match(name) else f"task{task_id}"


def factors_digest(export_dir: str | Path) -> str:
    """The digest an export names its model version after (``export-<digest>``): sha256 of its
    factors.safetensors, 12 hex digits. The export computes it; every local copy is checked against it."""
    return file_digest(Path(export_dir) / FACTORS_FILE, 12)


def factor_key(task_id: int, layer: str, which: str) -> str:
    """Key of one factor in factors.safetensors, e.g. ``0.encoder.layer.0.attention.self.query.A``."""
    return f"{task_id}.{layer}.{which}"


def read_manifest(export_dir: str | Path) -> dict:
    """Load and check manifest.json; DataError names the folder and the missing key."""
    d = Path(export_dir)
    path = d / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{d} is not an exported model folder: {MANIFEST_FILE} is missing")
    manifest = read_json(path, "export manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key in ("scenarios", "pooling", "adapted_layers", "model_version", "max_length"):
        if key not in manifest:
            raise DataError(f"{path}: key {key!r} is missing")
    for name, entry in manifest["scenarios"].items():
        for key in ("merged", "adapter"):
            if key not in entry:
                raise DataError(f"{path}: scenarios.{name}.{key} is missing")
    task_map = read_task_map(d)
    if sorted(task_map.names) != sorted(manifest["scenarios"]):
        raise DataError(f"{d / TASK_MAP_FILE} lists {task_map.names}, the manifest {sorted(manifest['scenarios'])}")
    return manifest


def read_task_map(export_dir: str | Path) -> TaskMap:
    """The export's copy of the task map ingestion wrote: scenario -> task id."""
    path = Path(export_dir) / TASK_MAP_FILE
    if not path.is_file():
        raise DataError(f"{export_dir} is not an exported model folder: {TASK_MAP_FILE} is missing")
    return TaskMap.load(path)
