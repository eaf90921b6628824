"""Numbers that say how MTL-LoRA's routing behaves: mixing entropy, sharing of the B_i, drift of Λ_t, and
gradient norms per optimizer group. Read-only: nothing here changes a parameter or a gradient.

    from training.diagnostics import adapter_diagnostics, grad_norms, mixing_entropy
    h, h_max = mixing_entropy(layer)        # (T,) nats of softmax(w_t / τ), and log n
    metrics = adapter_diagnostics(model, task_names=["us", "uk", "de", "jp"])   # {"diag/...": float}
    engine.backward(loss); norms = grad_norms(engine); engine.step()             # between backward and step

Per MTL-LoRA layer (T tasks, n up-projections, p_t = softmax(w_t / τ), computed in fp32 as the layer does):

    mixing_entropy  H(p_t) = -Σ_i p_t,i log p_t,i per task, in nats; its maximum is log n (uniform mixing).
                    With τ = 0.1 and w ~ U(±1/√n) the logits / τ span up to ±5.8 (n = 3), so p_t may start
                    close to one-hot: H near 0 means task t reads essentially one B_i.
    sharing         load_i = Σ_t p_t,i (sums to T over i: how many tasks' worth of mixing B_i receives) and
                    tasks_eff_i = (Σ_t p_t,i)² / Σ_t p_t,i², the effective number of tasks that use B_i
                    (the inverse Simpson index of the column p_·,i: 1 = one task, T = all tasks equally).
                    Every task one-hot on its own B_i gives tasks_eff = 1 (per-scenario LoRA); uniform
                    mixing gives tasks_eff = T for every i (one shared B̃, like LoRA).
    lambda_drift    ||Λ_t - I||_F / ||I||_F per task (diagonal Λ: the vector against ones): how far the
                    per-task transform has moved from its identity init.

``adapter_diagnostics`` aggregates these over all adapted layers into flat ``diag/...`` metrics (see its
doc). ``grad_norms`` gives the L2 norm of the full gradient per optimizer group (adapters: A and B;
task: Λ_t and w_t; head), from ``deepspeed.utils.safe_get_full_grad``: under ZeRO 1-3 the gradient is
partitioned and assembled collectively, so **every rank must call it**, between ``backward`` and
``step`` (the gradient is gone after the step). ``adapter_diagnostics`` gathers ZeRO-3 partitions, also
collectively. Both work on a plain ``nn.Module`` (``param.grad``) as well.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from modeling.inject import adapter_layers
from modeling.model import is_adapter_param, is_task_param
from modeling.mtl_lora import MTLLoRALinear

GROUPS = ("adapters", "task", "head")


# --- per layer ------------------------------------------------------------------------------------------

def _gathered(params: list[torch.Tensor]):
    """ZeRO-3: the full values of ``params`` inside the context (collective); otherwise a no-op."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dim, with 0 · log 0 = 0; computed in fp64."""
    p = p.double()
    return -torch.special.xlogy(p, p).sum(-1)


@torch.no_grad()
def mixing_entropy(layer: MTLLoRALinear) -> tuple[torch.Tensor, float]:
    """(H(p_t) per task (T,) in nats, log n): the entropy of softmax(w_t / τ) and its maximum."""
    _require_mtl(layer)
    with _gathered([layer.w]):
        p = layer.mixing_weights()  # (T, n), fp32 (the layer's own softmax)
    return _entropy(p).float(), math.log(layer.n_up)


@torch.no_grad()
def sharing(layer: MTLLoRALinear) -> dict[str, torch.Tensor]:
    """How much each B_i is shared across tasks: ``load`` (n,) = Σ_t p_t,i and ``tasks_eff`` (n,) =
    (Σ_t p_t,i)² / Σ_t p_t,i² (1 = one task uses B_i, T = every task equally)."""
    _require_mtl(layer)
    with _gathered([layer.w]):
        p = layer.mixing_weights()  # (T, n)
    return {k: v.float() for k, v in _sharing_of(p).items()}


def _sharing_of(p: torch.Tensor) -> dict[str, torch.Tensor]:
    p = p.double()  # (T, n)
    load = p.sum(0)  # (n,)
    return {"load": load, "tasks_eff": load.square() / p.square().sum(0).clamp_min(1e-300)}


@torch.no_grad()
def lambda_drift(layer: MTLLoRALinear) -> torch.Tensor:
    """||Λ_t - I||_F / ||I||_F per task, (T,); diagonal Λ is compared with the vector of ones."""
    _require_mtl(layer)
    with _gathered([layer.lam]):
        return _drift_of(layer.lam).float()


def _drift_of(lam: torch.Tensor) -> torch.Tensor:
    lam = lam.detach().double()  # (T, r, r) full | (T, r) diagonal
    eye = torch.ones_like(lam[0]) if lam.dim() == 2 else torch.eye(lam.shape[-1], dtype=lam.dtype)
    return (lam - eye).flatten(1).norm(dim=1) / eye.norm()  # (T,)


def _require_mtl(layer: MTLLoRALinear) -> None:
    if layer.method != "mtl_lora":
        raise ValueError(f"{layer.method}: only mtl_lora layers have mixing logits w and Λ_t")


# --- aggregated over a model --------------------------------------------------------------------------------

@torch.no_grad()
def adapter_diagnostics(model: nn.Module, task_names: list[str] | None = None) -> dict[str, float]:
    """Flat metrics over every adapted layer of ``model`` (an engine's ``.module`` or any module).

    For every method: ``diag/layers`` and ``diag/b_norm_mean`` (mean ||B_i||_F over layers and routes).
    For mtl_lora also (means over layers and tasks unless named otherwise):
        diag/entropy_mean, _min, _max     H(p_t) in nats; diag/entropy_max_possible = log n
        diag/entropy_frac                 entropy_mean / log n (0: one-hot routing, 1: uniform; n = 1: 1)
        diag/top_p_mean                   mean max_i p_t,i
        diag/shared_top_layers            layers where every task's largest p_t,i is on the same B_i
        diag/tasks_eff_mean, _min         effective number of tasks per B_i (over layers and i), of T
        diag/load_max_mean                mean over layers of max_i Σ_t p_t,i (T: one B_i takes all)
        diag/lambda_drift_mean, _max      ||Λ_t - I|| / ||I||
        diag/entropy/<task>, diag/lambda_drift/<task>   per task, mean over layers (with ``task_names``)
    """
    layers = list(adapter_layers(model).values())
    out: dict[str, float] = {"diag/layers": float(len(layers))}
    if not layers:
        return out
    b_norms, ent, top, tasks_eff, load_max, drift, shared_top = [], [], [], [], [], [], 0
    for layer in layers:  # the same order on every rank: ZeRO-3 gathers are collective
        mtl = layer.method == "mtl_lora"
        params = [layer.B, *((layer.w, layer.lam) if mtl else ())]
        with _gathered(params):  # one gather per layer; the helpers below read plain tensors
            b_norms.append(layer.B.detach().double().flatten(1).norm(dim=1))  # (routes,)
            if not mtl:
                continue
            p = layer.mixing_weights().double()  # (T, n)
            ent.append(_entropy(p))
            top.append(p.max(dim=1).values)
            shared_top += int(p.argmax(dim=1).unique().numel() == 1)
            share = _sharing_of(p)
            tasks_eff.append(share["tasks_eff"])
            load_max.append(share["load"].max())
            drift.append(_drift_of(layer.lam))
    out["diag/b_norm_mean"] = torch.cat(b_norms).mean().item()
    if not ent:
        return out
    n_up = layers[0].n_up
    e, d = torch.stack(ent), torch.stack(drift)  # (layers, T)
    h_max = math.log(n_up)
    out.update({
        "diag/entropy_mean": e.mean().item(), "diag/entropy_min": e.min().item(), "diag/entropy_max": e.max().item(),
        "diag/entropy_max_possible": h_max,
        "diag/entropy_frac": e.mean().item() / h_max if h_max > 0 else 1.0,
        "diag/top_p_mean": torch.cat(top).mean().item(),
        "diag/shared_top_layers": float(shared_top),
        "diag/tasks_eff_mean": torch.cat(tasks_eff).mean().item(),
        "diag/tasks_eff_min": torch.cat(tasks_eff).min().item(),
        "diag/load_max_mean": torch.stack(load_max).mean().item(),
        "diag/lambda_drift_mean": d.mean().item(), "diag/lambda_drift_max": d.max().item(),
    })
    for t, name in enumerate(task_names or []):
        out[f"diag/entropy/{name}"] = e[:, t].mean().item()
        out[f"diag/lambda_drift/{name}"] = d[:, t].mean().item()
    return out


# --- gradients -------------------------------------------------------------------------------------------------

def param_group(name: str) -> str:
    """The optimizer group of a trainable parameter, as ``training.ds_config.build_optimizer`` assigns it."""
    return "head" if not is_adapter_param(name) else "task" if is_task_param(name) else "adapters"


@torch.no_grad()
def grad_norms(engine_or_model) -> dict[str, float]:
    """``{"diag/grad_norm/<group>": L2 norm}`` of the full gradient per optimizer group, plus ``.../total``.

    Call between ``backward`` and ``step`` on every rank (ZeRO 1-3 assemble partitioned gradients with
    collectives). The norm is the gradient the optimizer will see before clipping (DeepSpeed has already
    averaged it over data-parallel ranks). A group whose parameters have no gradient yet is left out.
    """
    from deepspeed.utils import safe_get_full_grad

    model = getattr(engine_or_model, "module", engine_or_model)
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():  # the same order on every rank
        if not p.requires_grad:
            continue
        g = safe_get_full_grad(p)  # full fp32 (or accumulation-dtype) gradient, or None
        if g is None:
            continue
        group = param_group(name)
        squares[group] = squares.get(group, 0.0) + g.detach().double().square().sum().item()
    out = {f"diag/grad_norm/{g}": math.sqrt(squares[g]) for g in GROUPS if g in squares}
    if squares:
        out["diag/grad_norm/total"] = math.sqrt(sum(squares.values()))
    return out
