"""The trained-model folder: everything needed to rebuild the model, without pickle.

    <model_dir>/
        config.yaml            the resolved Config the model was trained with
        task_map.json          scenario -> task id
        trainable.safetensors  adapter parameters (A, B, lam, w per layer) and the head, by name
        metrics.json           validation metrics of the selected checkpoint
        start.json             a warm-started model only: what it started from (training.warm_start)

An export carries a byte copy of this folder as ``<export>/trained/`` (TRAINED_DIR), so that a registered
model can be warm-started from (``train.init_from``).

    save_trained(model, cfg, task_map, metrics, model_dir, start=record)
    cfg, task_map, model = load_trained(model_dir)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kernel.atomic import honour_umask
from kernel.config import Config, dump_config, load_config
from kernel.errors import DataError
from kernel.task_map import TASK_MAP_FILE, TaskMap
from modeling.model import RelevanceModel, build_model

TRAINABLE_FILE = "trainable.safetensors"
START_FILE = "start.json"
TRAINED_DIR = "trained"  # the trained-model folder's copy inside an export


def trainable_state(model: RelevanceModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trained(
    model: RelevanceModel, cfg: Config, task_map: TaskMap, metrics: dict, model_dir: str | Path,
    state: dict[str, torch.Tensor] | None = None, start: dict | None = None,
) -> Path:
    """Write the folder atomically enough for readers: files are complete before metrics.json lands.
    ``start``: what a warm-started model started from (start.json)."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state if state is not None else trainable_state(model), str(out / TRAINABLE_FILE))
    dump_config(cfg, out / "config.yaml")
    task_map.save(out / TASK_MAP_FILE)
    if start is not None:
        (out / START_FILE).write_text(json.dumps(start, indent=2, sort_keys=True))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    honour_umask(out / TRAINABLE_FILE)  # safetensors writes 0600
    return out


def load_trained(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Config, TaskMap, RelevanceModel]:
    d = Path(model_dir)
    for name in ("config.yaml", TASK_MAP_FILE, TRAINABLE_FILE):
        if not (d / name).is_file():
            raise DataError(f"{d} is not a trained-model folder: {name} is missing")
    cfg = load_config(d / "config.yaml")
    task_map = TaskMap.load(d / TASK_MAP_FILE)
    model = build_model(cfg, len(task_map), dtype=dtype, trained_weights_follow=True)
    state = load_file(str(d / TRAINABLE_FILE))
    missing = set(model.trainable_parameters()) - set(state)
    if missing:
        raise DataError(f"{d / TRAINABLE_FILE}: missing parameters {sorted(missing)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    model.eval()
    return cfg, task_map, model
