"""Shared builders for the export and scoring tests: tiny trained-model folders and real WDC rows.

Not a test module: ``tests/test_export*.py`` and ``tests/test_score*.py`` import it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.tokenize import build_features
from kernel.config import Config, config_from_dict
from kernel.task_map import TaskMap
from modeling.artifact import save_trained
from modeling.model import build_model
from tests.shared import BERT, LLAMA, WDC

SCENARIOS = ["cameras", "computers", "shoes"]  # what the tiny models are "trained" on; watches is unseen

# How the WDC files map onto the canonical fields (what a user would put in data.columns).
WDC_COLUMNS = {"query": "left", "title": "right", "description": None, "url": None, "label": "label",
               "scenario": "category"}


def tiny_config(work_dir: Path, pooling: str = "cls", arch: str = "bert", serving: dict | None = None,
                tokenizer: str = "minilm", vocab_size: int = 30522) -> Config:
    llama = arch == "llama"
    return config_from_dict({
        "work_dir": str(work_dir),
        "model": {"init": "random", "pooling": pooling, "tokenizer": tokenizer,
                  "random_config": {**(LLAMA if llama else BERT), "vocab_size": vocab_size}},
        "adapter": {"r": 4, "n_up": 2, "dropout": 0.0,
                    "targets": ["llama_attention"] if llama else ["query", "key", "value", "attention.output.dense"]},
        "data": {"columns": WDC_COLUMNS, "scenarios": SCENARIOS},
        "features": {"max_length": 40},
        # ONNX graphs only where a test asks for them (serving.onnx.export=true): the export stays fast.
        "serving": {"batch_size": 8, "chunk_rows": 64, "onnx": {"export": False}, **(serving or {})},
        "tracking": {"experiment": "serving-tests"},
    })


def trained_folder(root: Path, pooling: str = "cls", arch: str = "bert", serving: dict | None = None,
                   tokenizer: str = "minilm", vocab_size: int = 30522) -> Path:
    """A trained-model folder (modeling.artifact) of a tiny random model whose B factors and head are
    random non-zero, so every scenario's ΔW differs. Returns <root>/model."""
    cfg = tiny_config(root, pooling, arch, serving, tokenizer, vocab_size)
    task_map = TaskMap(SCENARIOS)
    model = build_model(cfg, len(task_map))
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(".B"):
                torch.nn.init.normal_(p, std=0.2)
            elif not name.endswith((".A", ".lam", ".w")):  # heads: pooler/classifier/score/head
                torch.nn.init.normal_(p, std=0.3)
    return save_trained(model, cfg, task_map, {"auc_macro": 0.5}, root / "model")


def export(model_dir: Path, out, overrides: list[str] | None = None, **options) -> dict:
    """Export a trained-model folder as ``python -m serving.export --run <model_dir>`` does: the trained config
    with ``overrides`` in its deployment sections, ``options`` as serving.export.cli.run takes them. The manifest."""
    from serving.export.cli import run
    from serving.export.source import export_config

    return run(export_config(model_dir, overrides=overrides or []), model_dir, out, **options).info


def registered_champion(root: Path, overrides: list[str]) -> str:
    """A tiny mean-pooling model trained under ``root``, exported with --valid (30 WDC validation rows a
    category: calibration, thresholds, the precision gate) and ``overrides``, and registered as
    relevance@champion in ``root``/mlflow.db. The tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    valid = root / "valid.parquet"
    pq.write_table(canonical(wdc_raw("valid", per_category=30)), valid)
    export(trained_folder(root, "mean"), root / "export", valid=valid, tracking_uri=uri, name="relevance",
           alias="champion", overrides=overrides)
    return uri


def wdc_raw(split: str = "test", per_category: int = 12, categories: list[str] | None = None,
            offset: int = 0) -> pa.Table:
    """Real rows in their own column names (left, right, label, category)."""
    parts = []
    for cat in categories or SCENARIOS:
        t = pq.read_table(WDC / cat / f"{split}.parquet")
        parts.append(t.slice(offset, per_category))
    return pa.concat_tables(parts)


def canonical(raw: pa.Table) -> pa.Table:
    """The canonical columns ingestion would produce from WDC rows (no description/url)."""
    n = raw.num_rows
    return pa.table({
        "query": raw["left"], "title": raw["right"], "description": pa.array([""] * n), "url": pa.array([""] * n),
        "label": raw["label"], "scenario": raw["category"], "weight": pa.array(np.ones(n, np.float32)),
    })


def training_logits(model_dir: Path, table: pa.Table, batch_size: int = 5) -> np.ndarray:
    """Logits of the training-time model (adapters unmerged, every scenario mixed in each batch),
    tokenised and padded by training's own code, in input order."""
    from modeling.artifact import load_trained
    from modeling.base import load_tokenizer

    cfg, task_map, model = load_trained(model_dir)
    tok = load_tokenizer(cfg)
    feats = build_features(table, tok, task_map, cfg.features.max_length)
    out = np.empty(len(feats), np.float32)
    with torch.no_grad():
        for s in range(0, len(feats), batch_size):
            idx = np.arange(s, min(s + batch_size, len(feats)))
            b = feats.collate(idx, tok.pad_token_id)
            out[idx] = model(b["input_ids"], b["attention_mask"], b["task_ids"], b.get("token_type_ids")).numpy()
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
