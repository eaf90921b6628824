"""The DeepSpeed config, derived from the project config by a pure function (never written by hand).

    ds = deepspeed_config(cfg, world_size=2, on_gpu=False)

What it covers: ZeRO stage 0-3 (optional optimizer offload), bf16/fp16/fp32, micro-batch and gradient
accumulation (train batch = micro × accumulation × world size), gradient clipping, and the warmup +
linear-decay learning-rate schedule. The optimizer is a client torch AdamW (``build_optimizer``), multi-tensor
on every device (torch's fused kernels, on CPU too; DeepSpeed's own Adam kernels would need a long JIT compile
first), stepping all groups that share their hyperparameters in one call (``GroupedAdamW``).

Optimizer groups, in this order (``group_lrs``): shared adapter weights (A, B) at ``train.lr``; MTL-LoRA's
per-scenario Λ_t and w_t at ``train.task_lr`` (only for ``adapter.method: mtl_lora``); the head at
``train.head_lr``. The scheduler scales each group's peak lr by the same warmup/decay factor.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kernel.config import Config
from kernel.errors import ConfigError
from modeling.hardware import training_precision
from modeling.model import RelevanceModel, is_adapter_param, is_task_param


def group_lrs(cfg: Config) -> dict[str, float]:
    """Peak learning rate per optimizer group, in group order; a 0 lr means "same as train.lr". A task_only
    warm start trains one group: MTL-LoRA's task group (at train.task_lr, else train.warm.task_lr_scale ×
    train.lr), or per-task LoRA's adapters (its A_t, B_t, at train.lr)."""
    t = cfg.train
    if t.init_from and t.adapt == "task_only":
        if cfg.adapter.method == "mtl_lora":
            return {"task": t.task_lr or t.warm.task_lr_scale * t.lr}
        return {"adapters": t.lr}
    lrs = {"adapters": t.lr}
    if cfg.adapter.method == "mtl_lora":
        lrs["task"] = t.task_lr or t.lr
    lrs["head"] = t.head_lr or t.lr
    return lrs


def deepspeed_config(cfg: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    t = cfg.train
    precision = training_precision(t.precision)
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if precision == "fp16" and not on_gpu:
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
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 12},
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
        # ZeRO accepts only the exact classes it lists; GroupedAdamW is torch's AdamW with a merged step.
        "zero_allow_untested_optimizer": True,
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


def optimizer_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], lrs: dict[str, float],
                     weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW groups, in ``lrs``' order (adapters, task, head); empty groups left out."""
    params: dict[str, list[torch.nn.Parameter]] = {g: [] for g in lrs}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        group = "head" if not is_adapter_param(name) else "task" if is_task_param(name) else "adapters"
        params[group].append(p)
    return [
        # No decay on Λ_t and w_t: it would pull Λ_t towards 0 (not its identity init) and w_t towards
        # uniform mixing, which is a prior on the routing rather than a neutral regulariser.
        {"params": ps, "lr": lrs[g], "weight_decay": 0.0 if g == "task" else weight_decay, "name": g}
        for g, ps in params.items() if ps
    ]


def build_optimizer(model: RelevanceModel, cfg: Config, on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, grouped as ``group_lrs`` (the scheduler's lrs) says."""
    lrs = group_lrs(cfg)
    groups = optimizer_groups(model.named_parameters(), lrs, cfg.train.weight_decay)
    empty = [g for g in lrs if g not in {group["name"] for group in groups}]
    if empty:
        raise ConfigError(f"no trainable parameters in optimizer group(s) {empty}: check adapter.targets")
    return make_optimizer(groups, on_gpu)


def make_optimizer(groups: list[dict[str, Any]], on_gpu: bool) -> torch.optim.Optimizer:
    """``GroupedAdamW`` over ``groups`` with torch's multi-tensor kernels: fused (CUDA; CPU since torch 2.4),
    else foreach. Either costs a few operations per call, however many tensors the groups hold."""
    cpu_fused = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    kind = {"fused": True} if on_gpu or cpu_fused else {"foreach": True}
    return GroupedAdamW(groups, lr=groups[0]["lr"], **kind)


class GroupedAdamW(torch.optim.AdamW):
    """torch's AdamW whose ``step`` updates every group that shares its hyperparameters in one call.

    Groups stay as built (their names, their own lr for the scheduler, their place in checkpoints); only
    the step merges them: the groups whose settings (lr, betas, eps, weight decay, flags: everything but
    the parameters and the name) are equal at this step become one group for the duration of the call.
    AdamW is elementwise per tensor, so this changes no number; it saves the per-group launches (with the
    default config, adapters, Λ/w and head share lr and decay: one fused call instead of three).
    """

    def step(self, closure=None):
        groups = self.param_groups
        merged: dict[tuple, dict[str, Any]] = {}
        for group in groups:
            key = tuple((k, _hashable(v)) for k, v in sorted(group.items()) if k not in ("params", "name"))
            if key in merged:
                merged[key]["params"] = merged[key]["params"] + group["params"]
            else:
                merged[key] = dict(group)
        # AdamW's own step, without the profiling/hook wrapper torch puts on a class's step once one of its
        # instances exists: this class's step already carries that wrapper, hooks must run once.
        step = torch.optim.AdamW.step
        while getattr(step, "hooked", False):
            step = step.__wrapped__
        if len(merged) == len(groups):
            return step(self, closure)
        self.param_groups = list(merged.values())  # the state is per parameter, not per group
        try:
            return step(self, closure)
        finally:
            self.param_groups = groups


def _hashable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # a tensor lr (capturable): merge only the very same tensor
        return ("tensor", id(value))
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    return value
