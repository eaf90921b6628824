"""The training loop: a DeepSpeed engine over a frozen base with MTL-LoRA, evaluated per scenario.

    result = train(cfg, data_dir=Path("runs/demo/data"), out_dir=Path("runs/demo/train"), resume=False)

Layout written under ``out_dir``:
    checkpoints/<tag>/   DeepSpeed checkpoints (model, optimizer, scheduler) + client state (sampler, RNG,
                         best-so-far), every ``train.checkpoint_every`` steps; ``latest`` names the newest
    model/               the best checkpoint by validation macro AUC, as a trained-model folder
    ds_config.json, config.yaml
A NaN/inf loss raises TrainingDiverged before the optimizer step; checkpoints already written stay good.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from features.sampler import MixedScenarioSampler
from features.task_map import TaskMap
from features.tokenize import FeatureSet, build_features
from pipeline.config import Config, dump_config, flat_params
from pipeline.errors import DataError, TrainingDiverged
from training.artifact import save_trained
from training.ds_config import build_optimizer, deepspeed_config
from training.evaluate import evaluate, flat_metrics
from training.inject import adapter_param_count
from training.model import build_model, enable_activation_checkpointing, resolve_model_path
from training.tracking import NullTracker, fingerprint_files, git_commit

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    model_dir: Path
    best_metrics: dict
    steps: int
    run_id: str | None
    history: list[dict] = field(default_factory=list)


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    src = cfg.model.tokenizer or cfg.model.path
    tok = AutoTokenizer.from_pretrained(resolve_model_path(src), gguf_file=None if cfg.model.tokenizer else (cfg.model.gguf_file or None))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def task_map_for(cfg: Config, train_path: Path) -> TaskMap:
    if cfg.data.scenarios:
        return TaskMap(cfg.data.scenarios)
    import pyarrow.compute as pc

    scenarios = pc.unique(pq.read_table(train_path, columns=["scenario"])["scenario"]).to_pylist()
    return TaskMap(sorted(scenarios))


def load_split_features(cfg: Config, data_dir: Path, split: str, tokenizer, task_map: TaskMap) -> FeatureSet:
    path = data_dir / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path} is missing: run ingestion first (python -m pipeline.ingest)")
    return build_features(
        pq.read_table(path), tokenizer, task_map, cfg.features.max_length,
        cache_dir=Path(cfg.work_dir) / "features_cache", batch_size=cfg.features.tokenize_batch_size,
    )


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _gathered_trainable_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full values of every trainable parameter (gathered from ZeRO-3 partitions when needed)."""
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    return {n: p.detach().float().cpu().clone() for n, p in params.items()}


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss).all())])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def train(cfg: Config, data_dir: Path, out_dir: Path, resume: bool = False, tracker=None) -> TrainResult:
    import deepspeed

    rank, local_rank, world = _dist_env()
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one in-process rank: any free local port will do
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if not on_gpu:
        # Processes sharing a host split its cores: oversubscribed OpenMP threads spin against each other.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if on_gpu:
        torch.cuda.set_device(device)
    tracker = tracker or NullTracker()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"

    _seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg)
    task_map = task_map_for(cfg, data_dir / "train.parquet")
    train_set = load_split_features(cfg, data_dir, "train", tokenizer, task_map)
    valid_set = load_split_features(cfg, data_dir, "valid", tokenizer, task_map)

    model = build_model(cfg, len(task_map), dtype=torch.float32)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model.backbone, model.router.checkpoint_context)
    n_adapter, n_expected = adapter_param_count(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    ds_cfg = deepspeed_config(cfg, world, on_gpu)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg, on_gpu), config=ds_cfg
    )
    sampler = MixedScenarioSampler(
        train_set.task_ids, train_set.lengths, cfg.train.micro_batch_size, strategy=cfg.features.sampler,
        alpha=cfg.features.sampler_alpha, seed=cfg.train.seed, rank=rank, world_size=world,
        length_bucketing=cfg.features.length_bucketing,
    )

    best = {"auc_macro": -1.0, "step": 0, "metrics": None, "bad_evals": 0}
    history: list[dict] = []
    if resume and (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        sampler.load_state_dict(client["sampler"])
        best, history = client["best"], client["history"]
        _set_rng_state(client["rng"][rank] if isinstance(client["rng"], list) else client["rng"])
        if rank == 0:
            print(f"resumed from {ckpt_dir / open(ckpt_dir / 'latest').read().strip()} at step {engine.global_steps}")
    elif rank == 0:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        (out_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2))
        dump_config(cfg, out_dir / "config.yaml")
        tracker.log_params(flat_params(cfg))
        tracker.set_tags({
            "git_commit": git_commit(),
            "data_fingerprint": fingerprint_files([data_dir / "train.parquet", data_dir / "valid.parquet"]),
            "world_size": world,
        })
        tracker.log_metrics({"params/trainable": n_trainable, "params/adapter": n_adapter,
                             "params/adapter_expected": n_expected, "params/total": n_total})
        tracker.log_artifact(out_dir / "config.yaml", "config")
        tracker.log_artifact(out_dir / "ds_config.json", "config")

    step_batches = iter(sampler)
    pad_id = tokenizer.pad_token_id
    model_dir = out_dir / "model"
    dtype = _DTYPES[cfg.train.precision]
    t0, seen, last_loss = time.time(), 0, float("nan")
    engine.train()
    while engine.global_steps < cfg.train.max_steps:
        step = engine.global_steps
        for _ in range(cfg.train.grad_accum):
            batch = train_set.collate(next(step_batches), pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = engine(batch["input_ids"], batch["attention_mask"], batch["task_ids"],
                                batch.get("token_type_ids"))
            loss = (F.binary_cross_entropy_with_logits(logits.float(), batch["labels"], reduction="none")
                    * batch["weights"]).sum() / batch["weights"].sum().clamp(min=1e-6)
            if not _all_finite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {step}; last good checkpoint: "
                    f"{(ckpt_dir / 'latest').read_text().strip() if (ckpt_dir / 'latest').is_file() else 'none'} in {ckpt_dir}"
                )
            engine.backward(loss)
            engine.step()
            seen += len(batch["labels"]) * world
            last_loss = loss.item()
        step = engine.global_steps
        if rank == 0 and (step % 10 == 0 or step == 1):
            rate = seen / max(time.time() - t0, 1e-9)
            tracker.log_metrics({"train/loss": last_loss, "train/lr": scheduler.get_last_lr()[0],
                                 "train/samples_per_s": rate}, step=step)
            print(f"step {step}/{cfg.train.max_steps} loss {last_loss:.4f} {rate:.1f} samples/s", flush=True)
        last = step >= cfg.train.max_steps
        stop_early = False
        if step % cfg.train.eval_every == 0 or last:
            metrics = evaluate(engine.module, valid_set, task_map, cfg.train.micro_batch_size * 2, pad_id, device,
                               rank, world, cfg.train.eval_max_rows)
            history.append({"step": step, "auc_macro": metrics["auc_macro"]})
            state = _gathered_trainable_state(engine, cfg.train.zero_stage)
            improved = (metrics["auc_macro"] or 0.0) > best["auc_macro"]
            if improved:
                best.update(auc_macro=metrics["auc_macro"] or 0.0, step=step, metrics=metrics, bad_evals=0)
            else:
                best["bad_evals"] += 1
            if rank == 0:
                tracker.log_metrics(flat_metrics(metrics), step=step)
                print(f"step {step} val auc_macro {metrics['auc_macro']:.4f} "
                      + " ".join(f"{k}={v['auc'] and round(v['auc'], 4)}" for k, v in metrics["scenarios"].items()),
                      flush=True)
                if improved:
                    save_trained(engine.module, cfg, task_map, {"step": step, **metrics}, model_dir, state=state)
            patience = cfg.train.early_stopping_patience
            stop_early = bool(patience) and best["bad_evals"] >= patience
        if step % cfg.train.checkpoint_every == 0 or last or stop_early:
            _save_checkpoint(engine, ckpt_dir, step, sampler, best, history, world, cfg.train.keep_checkpoints)
        if stop_early:
            if rank == 0:
                print(f"early stopping at step {step}: no macro-AUC gain in {patience} evaluations")
            break

    if rank == 0:
        tracker.log_metrics({"best/auc_macro": best["auc_macro"], "best/step": best["step"]})
        tracker.log_artifacts(model_dir, "model")
    return TrainResult(model_dir, best["metrics"], engine.global_steps, tracker.run_id, history)


def _save_checkpoint(engine, ckpt_dir: Path, step: int, sampler, best: dict, history: list, world: int,
                     keep: int) -> None:
    rng = _rng_state()
    if world > 1:
        states: list = [None] * world
        torch.distributed.all_gather_object(states, rng)
        rng = states
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}",
                           client_state={"sampler": sampler.state_dict(), "best": best, "history": history, "rng": rng})
    if int(os.environ.get("RANK", 0)) == 0 and keep > 0:
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
