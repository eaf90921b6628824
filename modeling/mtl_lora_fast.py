"""The MTL-LoRA update of ``modeling.mtl_lora`` laid out for speed: the same numbers as its reference maths.

``MTLLoRALinear.reference_update`` is the formula in plain tensor ops (each row's U_tᵀ gathered, one batched
GEMM with K = r). The layer runs it for scoring (no autograd, factors cached) and under torch.compile, which
fuses it. Everywhere else it picks one of these layouts (``choose_layout``):

    routed   eager training: ``RoutedUpdate``, one autograd node per layer with the backward written out,
             reading parameter views that persist across steps (``views``). Eagerly the host launches every
             operation one by one, so fewer, larger operations are what makes a step fast.
    shared   shared LoRA (one factor for every row) outside eager training: s·h B₀ᵀ, one 2-D GEMM over all tokens
    slots    short rows (fewer than r tokens, or ``update_path = "fused"``): h placed in its task's r-slot,
             one GEMM with K = T·r (FLOPs T× a LoRA's up-projection, but no per-row factor copies)

How a mixed-task batch is computed (no per-row copies of A; U_t = B̃_t Λ_t built once per forward):
    h     = dropout(x) @ Aᵀ                         (b, L, r)    one shared down-projection
    U     = B̃_t Λ_t for every task                  (T, out, r)  tiny: one mm (mixing) and one bmm (Λ)
    y     = (W x + b).baddbmm_(h, U[ids]ᵀ, alpha=s) each row's (r, out) factor, one batched GEMM, K = r
``per_task_lora`` gathers each row's own A_t (b, r, in) and B_t, so it costs a LoRA's FLOPs, not T× them.
Every layout adds into the base output in place (no extra (M, out) pass). Tests hold the layouts to the
reference's numbers and gradients (gradcheck for the written-out backward), and count the operations
(tests/test_adapter_ops.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modeling.routed_update import RoutedUpdate, Spec, flat, same

# ``layer`` below is always a ``modeling.mtl_lora.MTLLoRALinear`` (typed nn.Module: that module imports this one).
UPDATE_PATHS = ("auto", "fused", "gather")


def choose_layout(layer: nn.Module, x: torch.Tensor) -> str:
    """"reference", "routed", "shared" or "slots" for this input (see the module docstring)."""
    if layer.update_path not in UPDATE_PATHS:
        raise ValueError(f"update_path must be 'auto', 'fused' or 'gather', got {layer.update_path!r}")
    if layer.method == "lora":
        rows = "shared"
    elif layer.update_path == "auto":  # gather when every row holds at least r tokens
        rows = "gather" if x.dim() >= 3 and math.prod(x.shape[1:-1]) >= layer.r else "fused"
    else:
        rows = layer.update_path
    if rows == "fused":
        return "slots"
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return "routed"
    return "shared" if rows == "shared" else "reference"


def update(layer: nn.Module, layout: str, out: torch.Tensor, xd: torch.Tensor,
           ids: torch.Tensor | None) -> torch.Tensor:
    """out += s · (each row's update of xd), in place, in ``layout``. out (b, ..., out), xd (b, ..., in), ids (b,)."""
    if layout == "routed":
        lam, w = (layer.lam, layer.w) if layer.method == "mtl_lora" else (None, None)
        return RoutedUpdate.apply(out, xd, ids, spec(layer), views(layer), layer.A, layer.B, lam, w)
    dtype = out.dtype
    if layout == "shared":  # lora: out (M, out) += s · (xd Aᵀ) B₀ᵀ
        h = F.linear(flat(xd), layer.A)  # (M, r); under autocast already in the base output's dtype
        flat(out).addmm_(same(h, dtype), layer._factors(dtype)[0], alpha=layer.scaling)
        return out
    if layout == "slots":
        return _slot_update(layer, out, xd, ids)
    raise ValueError(f"unknown layout {layout!r}")


def _slot_update(layer: nn.Module, out: torch.Tensor, xd: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """out += s · hm @ Uᵀ: one GEMM with K = T·r over h placed in its row's task slot (zeros elsewhere)."""
    dtype, out_f = out.dtype, out.shape[-1]
    h = F.linear(xd, layer.A).to(dtype)  # (..., a_groups·r)
    up_t = layer._factors(dtype)  # (routes, r, out)
    # (b, 1, ..., 1, T, 1): 1 in each row's task slot, 0 elsewhere
    mask = (ids.unsqueeze(-1) == torch.arange(layer.num_tasks, device=xd.device)).to(h.dtype)
    mask = mask.view(ids.shape[0], *([1] * (xd.dim() - 2)), layer.num_tasks, 1)
    if layer.method == "mtl_lora":  # (b, ..., 1, r) * (b, ..., T, 1) -> (b, ..., T·r)
        h = (h.unsqueeze(-2) * mask).flatten(-2)
    else:  # per_task_lora: h holds every task's r columns; keep only the row's own task
        h = (h.unflatten(-1, (layer.num_tasks, layer.r)) * mask).flatten(-2)
    out.view(-1, out_f).addmm_(h.reshape(-1, h.shape[-1]), up_t.reshape(-1, out_f), alpha=layer.scaling)
    return out


def up_t_elementwise(layer: nn.Module) -> torch.Tensor:
    """``MTLLoRALinear._up_t`` for mtl_lora, its two contractions written as broadcast products and sums.

    The form inductor fuses into its own kernels: the same numbers, and no faster compiled (on CPU,
    whole-model compiled scoring took 1.16× the merged model's time this way against 1.08× with the mm/bmm
    of ``_up_t``, and a compiled training step was no faster either), so the layer does not use it.
    """
    b, lam = layer.B, layer.lam  # (n, out, r), (T, r, r) | (T, r)
    p = layer.mixing_weights().to(b.dtype)  # (T, n)
    b_mix_t = (p[:, :, None, None] * b.transpose(1, 2)[None]).sum(1)  # B̃_tᵀ, (T, r, out)
    if layer.lambda_type == "full":  # Λ_tᵀ B̃_tᵀ: sum over Λ's row index c
        return (lam[:, :, :, None] * b_mix_t[:, :, None, :]).sum(1)
    return lam[:, :, None] * b_mix_t


def spec(layer: nn.Module) -> Spec:
    return Spec(layer.method, layer.r, layer.num_tasks, layer.scaling, layer.tau, layer.lambda_type == "diagonal")


class Views(NamedTuple):
    """Persistent views of one layer's parameters (``views``); None where a method has none."""

    sources: tuple  # detached aliases of the parameters the views were made from (A, B[, Λ]), to check them
    a: torch.Tensor  # A, (a_groups·r, in)
    a_t: torch.Tensor  # Aᵀ, (in, a_groups·r)
    a_rows: torch.Tensor | None  # per_task_lora: A as (T, r, in)
    b_flat: torch.Tensor  # B as (n | routes, out·r)
    b_flat_t: torch.Tensor  # its transpose
    b0: torch.Tensor | None  # lora: B₀, (out, r), the one up-projection
    b0_t: torch.Tensor | None  # lora: B₀ᵀ
    lam_t: torch.Tensor | None  # full Λ: Λ_tᵀ, (T, r, r)
    lam_u: torch.Tensor | None  # diagonal Λ: (T, 1, r), broadcast over out
    zeros_u: torch.Tensor | None  # (T, out, r) zeros, read-only
    zeros_a: torch.Tensor | None  # per_task_lora: (T, r, in) zeros, read-only
    by_rows: dict  # rows -> (Aᵀ, A) broadcast over that many rows: (b, in, r), (b, r, in)
    constants: dict  # τ -> τ as a 1-element fp32 tensor on the parameters' device

    def tau_fp32(self, tau: float, w: torch.Tensor) -> torch.Tensor | None:
        if w.dtype in (torch.float32, torch.float64):
            return None
        t = self.constants.get(tau)
        if t is None:
            t = self.constants[tau] = torch.full((1,), tau, dtype=torch.float32, device=w.device)
        return t

    def broadcast(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A shared by every row of a batch, as stride-0 views for batched GEMMs (made once per batch size)."""
        made = self.by_rows.get(rows)
        if made is None:
            made = self.by_rows[rows] = (self.a_t.expand(rows, -1, -1), self.a.expand(rows, -1, -1))
        return made


def views(layer: nn.Module) -> Views:
    """Views of the parameters in the layouts ``RoutedUpdate``'s GEMMs read, kept across steps.

    A view aliases its parameter's storage, so in-place writes (optimizer steps, ``.data.copy_``,
    ``load_state_dict``) show through it and it never goes stale; a parameter that gets a new storage
    (``.data = ...``, ``.to()``, a ZeRO-3 re-gather to another address) gets new views. Reusing them
    saves a handful of view and transpose operations per layer and step; nothing here copies data.
    """
    params = (layer.A, layer.B, layer.lam) if layer.method == "mtl_lora" else (layer.A, layer.B)
    cached = layer.__dict__.get("_views_cache")
    if cached is not None and all(
        v.data_ptr() == p.data_ptr() and v.shape == p.shape and v.dtype == p.dtype and v.device == p.device
        for v, p in zip(cached.sources, params)
    ):
        return cached
    with torch.no_grad():  # plain aliases: no autograd history
        cached = _make_views(layer, tuple(p.detach() for p in params))  # share storage and version counter
    layer.__dict__["_views_cache"] = cached  # a plain attribute: not state, not a buffer
    return cached


def _make_views(layer: nn.Module, sources: tuple) -> Views:
    A, B = sources[:2]
    lam = sources[2] if len(sources) > 2 else None
    lora, per_task = layer.method == "lora", layer.method == "per_task_lora"
    b_flat = B.view(B.shape[0], -1)
    routes = 1 if lora else layer.num_tasks
    return Views(
        sources=sources,
        a=A,  # (a_groups·r, in)
        a_t=A.t(),  # (in, a_groups·r)
        a_rows=A.view(layer.num_tasks, layer.r, -1) if per_task else None,
        b_flat=b_flat,  # (n | routes, out·r)
        b_flat_t=b_flat.t(),
        b0=B[0] if lora else None,  # lora's B₀, (out, r)
        b0_t=B[0].t() if lora else None,
        lam_t=lam.transpose(1, 2) if lam is not None and lam.dim() == 3 else None,  # Λ_tᵀ
        lam_u=lam.unsqueeze(1) if lam is not None and lam.dim() == 2 else None,  # diagonal: (T, 1, r)
        # Never written: the out-of-place index_add of per-route gradient sums starts from them.
        zeros_u=B.new_zeros(routes, *B.shape[1:]) if routes > 1 else None,  # (T, out, r)
        zeros_a=A.new_zeros(routes, layer.r, A.shape[1]) if per_task else None,
        by_rows={},
        constants={},
    )
