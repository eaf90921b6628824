"""The DeepSpeed config, derived from the project config by a pure function (never written by hand).

    ds = deepspeed_config(cfg, world_size=2, on_gpu=False)

What it covers: ZeRO stage 0-3 (optional optimizer offload), bf16/fp16/fp32, micro-batch and gradient
accumulation (train batch = micro × accumulation × world size), gradient clipping, and the warmup +
linear-decay learning-rate schedule. The optimizer is a client torch AdamW (``build_optimizer``): fused
on GPU, plain on CPU, where DeepSpeed's own Adam kernels would need a long JIT compile first.

Optimizer groups, in this order (``group_lrs``): shared adapter weights (A, B) at ``train.lr``; MTL-LoRA's
per-scenario Λ_t and w_t at ``train.task_lr`` (only for ``adapter.method: mtl_lora``); the head at
``train.head_lr``. The scheduler scales each group's peak lr by the same warmup/decay factor.
"""
from __future__ import annotations

from typing import Any

import torch

from kernel.config import Config
from kernel.errors import ConfigError
from modeling.model import RelevanceModel, is_adapter_param, is_task_param


def group_lrs(cfg: Config) -> dict[str, float]:
    """Peak learning rate per optimizer group, in group order; a 0 lr means "same as train.lr"."""
    t = cfg.train
    lrs = {"adapters": t.lr}
    if cfg.adapter.method == "mtl_lora":
        lrs["task"] = t.task_lr or t.lr
    lrs["head"] = t.head_lr or t.lr
    return lrs


def deepspeed_config(cfg: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    t = cfg.train
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if t.precision == "fp16" and not on_gpu:
        raise ConfigError("train.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
    if t.offload_optimizer and t.zero_stage < 1:
        raise ConfigError("train.offload_optimizer needs train.zero_stage >= 1")
    train_batch = t.micro_batch_size * t.grad_accum * world_size
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    if t.zero_stage == 3:
        # Small adapters: keep them gathered rather than re-fetching on every forward.
        zero.update(stage3_param_persistence_threshold=1e5, stage3_prefetch_bucket_size=5e7)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    lrs = list(group_lrs(cfg).values())  # one per optimizer group
    ds: dict[str, Any] = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 12},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": [0.0] * len(lrs),
                "warmup_max_lr": lrs,
                "warmup_num_steps": max(1, min(t.warmup_steps, t.max_steps)),  # DeepSpeed needs >= 1
                "warmup_type": "linear",
                "total_num_steps": t.max_steps,
            },
        },
        # Offloading keeps our torch AdamW instead of forcing DeepSpeed's compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    check_batch_arithmetic(ds, world_size)
    return ds


def check_batch_arithmetic(ds: dict[str, Any], world_size: int) -> None:
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if ds["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(
            f"train batch {ds['train_batch_size']} != micro {micro} × accumulation {accum} × world {world_size}"
        )


def build_optimizer(model: RelevanceModel, cfg: Config, on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, grouped as ``group_lrs`` (the scheduler's lrs) says."""
    lrs = group_lrs(cfg)
    params: dict[str, list[torch.nn.Parameter]] = {g: [] for g in lrs}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = "head" if not is_adapter_param(name) else "task" if is_task_param(name) else "adapters"
        params[group].append(p)
    empty = [g for g, ps in params.items() if not ps]
    if empty:
        raise ConfigError(f"no trainable parameters in optimizer group(s) {empty}: check adapter.targets")
    wd = cfg.train.weight_decay
    groups = [
        # No decay on Λ_t and w_t: it would pull Λ_t towards 0 (not its identity init) and w_t towards
        # uniform mixing, which is a prior on the routing rather than a neutral regulariser.
        {"params": ps, "lr": lrs[g], "weight_decay": 0.0 if g == "task" else wd, "name": g}
        for g, ps in params.items()
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=on_gpu or None)
