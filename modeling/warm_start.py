"""A model that starts from a trained one: its adapter and head loaded into a model built for an extended task
map, and, for ``train.adapt: task_only``, every known scenario held still.

    start_state = load_file(start_dir / TRAINABLE_FILE)
    load_start(model, start_state, known_tasks=3)   # every trainable tensor from the start; new tasks' rows fresh
    held = hold_known_tasks(model, known_tasks=3)   # task_only: only the new tasks' rows train
    state = saved_state(trained, start_state, held) # what the trained-model folder stores: known rows bit-exact

Task-indexed parameters (dim 0 counts tasks; ``rows`` of them per task):

    mtl_lora       lam (T, r, r) | (T, r)   1 row a task      w (T, n)       1 row a task
    per_task_lora  A (T·r, in)              r rows a task     B (T, out, r)  1 row a task
    lora           none: one A and B serve every task

A new task's rows keep what ``build_model`` drew for them from ``train.seed``: the spec's init (Λ_t = I, w_t
Kaiming-uniform U(±1/√n); per-task LoRA A_t Kaiming-uniform, B_t = 0), so a new scenario starts exactly as it
would in a model trained from scratch.

Holding known tasks still: every parameter that is not task-indexed is frozen (``requires_grad`` off: the
shared A, B_i and the head); a task-indexed one keeps training, with the gradient of its known rows zeroed
by a tensor hook before any optimizer sees it. With zero gradient (and no weight decay, which the trainer
turns off for task_only) AdamW leaves those rows exactly as they were. The trainer's engine may still hold
the frozen tensors in a lower precision (bf16), so the folder is written from the start's own fp32 values
for every known row (``saved_state``): the known scenarios' weights, and so their scores, are bit-identical.
"""
from __future__ import annotations

import torch
from torch import nn

from kernel.config import Config, to_dict
from kernel.errors import ConfigError, DataError
from modeling.inject import adapter_layers

# What a starting model and the run that continues it must agree on: the base, the pooling, the adapters'
# shapes and maths. (Dropout, learning rates, data and schedule may differ.)
ARCHITECTURE_KEYS = ("model.path", "model.init", "model.random_config", "model.gguf_file", "model.pooling",
                     "adapter.method", "adapter.r", "adapter.alpha", "adapter.n_up", "adapter.tau",
                     "adapter.lambda_type", "adapter.targets")


def architecture_mismatches(cfg: Config, start: Config) -> list[str]:
    """``key: start value -> this run's value`` for every architecture key on which the two configs differ."""
    here, there = to_dict(cfg), to_dict(start)
    out = []
    for key in ARCHITECTURE_KEYS:
        section, name = key.split(".")
        if here[section][name] != there[section][name]:
            out.append(f"{key}: {there[section][name]!r} -> {here[section][name]!r}")
    return out


def task_rows(model: nn.Module) -> dict[str, int]:
    """{parameter name: rows per task} for every task-indexed parameter of ``model`` (see the module doc)."""
    out = {}
    for layer_name, layer in adapter_layers(model).items():
        prefix = f"{layer_name}." if layer_name else ""
        if layer.method == "mtl_lora":
            out[prefix + "lam"] = out[prefix + "w"] = 1
        elif layer.method == "per_task_lora":
            out[prefix + "A"], out[prefix + "B"] = layer.r, 1
    return out


def load_start(model: nn.Module, start_state: dict[str, torch.Tensor], known_tasks: int,
               source: str = "the starting model") -> None:
    """Copy every trainable tensor of ``model`` from ``start_state`` (a trained-model folder's state), in place.

    A task-indexed tensor may be longer than the start's (new tasks appended): its first ``known_tasks`` tasks'
    rows are copied and the rest keep their fresh init. Every mismatch (missing or extra tensors, shapes that
    do not fit) is reported at once, as DataError naming ``source``."""
    rows = task_rows(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    problems = [f"{n}: not in {source}" for n in params if n not in start_state]
    problems += [f"{n}: in {source}, not in this model" for n in start_state if n not in params]
    copies = []
    for name, p in params.items():
        t = start_state.get(name)
        if t is None:
            continue
        if t.shape == p.shape:
            copies.append((p, t, t.shape[0]))
        elif name in rows and t.shape[1:] == p.shape[1:] and t.shape[0] == known_tasks * rows[name] <= p.shape[0]:
            copies.append((p, t, t.shape[0]))
        else:
            problems.append(f"{name}: shape {tuple(t.shape)} in {source}, {tuple(p.shape)} here")
    if problems:
        raise DataError(f"cannot start from {source}: " + "; ".join(problems[:8])
                        + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    with torch.no_grad():
        for p, t, n in copies:
            p[:n].copy_(t.to(p.dtype))


def _zero_known_rows(known: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:known] = 0
        return grad

    return hook


def hold_known_tasks(model: nn.Module, known_tasks: int) -> dict[str, int]:
    """train.adapt task_only: freeze every shared parameter and the head, and zero the gradient of the known
    tasks' rows of every task-indexed one. Returns {name: known rows} of the parameters that still train.
    ConfigError when nothing would train (no task-indexed parameters, or no new task)."""
    rows = task_rows(model)
    if not rows:
        raise ConfigError("train.adapt task_only: this adapter method has no per-scenario parameters "
                          "(shared LoRA); use train.adapt=all")
    num_tasks = next(iter(adapter_layers(model).values())).num_tasks
    if num_tasks <= known_tasks:
        raise ConfigError(f"train.adapt task_only: the data holds no scenario the starting model does not know "
                          f"(all {num_tasks} are known), so nothing would train; use train.adapt=all to continue "
                          "training every scenario")
    held = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in rows:
            held[name] = known_tasks * rows[name]
            p.register_hook(_zero_known_rows(held[name]))
        else:
            p.requires_grad_(False)
    return held


def saved_state(trained: dict[str, torch.Tensor], start_state: dict[str, torch.Tensor],
                held: dict[str, int]) -> dict[str, torch.Tensor]:
    """The state a task_only run stores: every frozen tensor as the start had it (fp32, bit for bit), and each
    held tensor's known rows from the start followed by its trained new rows."""
    out = {n: t.detach().float().cpu().clone() for n, t in start_state.items() if n not in held}
    for name, known in held.items():
        new_rows = trained[name].detach().float().cpu()[known:]
        out[name] = torch.cat([start_state[name].float().cpu()[:known], new_rows]).contiguous()
    return out
