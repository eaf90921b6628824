"""The export's manifest (manifest.json): what the folder holds and how to score with it.

    manifest = build_manifest(cfg, tokenizer, layers, entries, digest=factors_digest(stage), metrics=...,
                              source={"run_id": ..., "model_dir": ..., "git_commit": ...}, fingerprint=...)

``model_version`` is ``export-<digest>``: the factors' digest names the content (serving.layout). The
calibration, reference and thresholds entries stay None until the validation fit fills them
(serving.export.validation); registration adds ``registered``.
"""
from __future__ import annotations

import time

from kernel.config import Config
from kernel.task_map import TASK_MAP_FILE
from modeling.pairs import resolve_pair_format
from serving.layout import BASE_DIR, FACTORS_FILE, FORMAT_VERSION

HEAD_FORMULA = ("score = sigmoid(head.weight @ mean_pool + head.bias); mean_pool = sum_i(mask_i * h_i) / "
                "max(sum_i mask_i, 1) over the backbone's last_hidden_state h (batch, tokens, hidden)")


def head_entry(pooling: str) -> dict:
    """How a checkpoint of this pooling turns the backbone's output into a score."""
    if pooling == "mean":
        return {"formula": HEAD_FORMULA, "model_class": "AutoModelForSequenceClassification",
                "trust_remote_code": True, "code": "modeling_ads_relevance.py"}
    return {"backbone_class": "AutoModelForSequenceClassification", "formula": "sigmoid(logits[:, 0])"}


def build_manifest(cfg: Config, tokenizer, layers: list[str], entries: dict[str, dict], *, digest: str,
                   metrics: dict, source: dict, fingerprint: str | None) -> dict:
    """The manifest of an export of ``cfg``'s model: ``layers`` adapted, per scenario its folders
    (``entries``), ``digest`` of the factors, the trainer's validation ``metrics``, the ``source`` run and
    model folder, and the fingerprint of the data it was trained (or fitted) on."""
    return {
        "format_version": FORMAT_VERSION,
        "model_version": f"export-{digest}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pooling": cfg.model.pooling,
        "adapter_method": cfg.adapter.method,
        "max_length": cfg.features.max_length,
        "input": {"text_pair": ["query", "ad_text"], "truncation": "longest_first", "padding_side": "right",
                  "ad_text": "title | description | url (empty parts skipped)",
                  "pair_format": resolve_pair_format(tokenizer, cfg.features.pair_format).describe()},
        "score": "sigmoid(logit), then per-scenario calibration when serving.calibrate and calibration.json",
        "head": head_entry(cfg.model.pooling),
        "base": BASE_DIR, "factors": FACTORS_FILE, "adapted_layers": layers,
        "task_map": TASK_MAP_FILE, "scenarios": entries,
        "calibration": None, "reference": None, "thresholds": None,
        "onnx": None,  # serving.export.onnx_graphs (graphs per scenario), serving.export.precision_gate (gate, serve)
        "metrics": metrics,
        "source": source,
        "trained": None, "started_from": None,  # the trained-model folder's copy and its start (serving.export.cli)
        "data_fingerprint": fingerprint,
        "config": "config.yaml",
    }
