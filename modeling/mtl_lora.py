"""The MTL-LoRA linear layer (Yang et al., AAAI 2025) and its two baselines behind one interface.

For a row of task ``t`` a frozen linear layer ``W`` (out × in, optional bias) becomes::

    y = W x + b + s · B̃_t · Λ_t · A · dropout(x)
    B̃_t = Σ_i p_{t,i} · B_i,    p_t = softmax(w_t / τ)  (in fp32),    s = alpha / r

Parameters, all owned by this module (DeepSpeed ZeRO-3 gathers a module's own parameters around its
forward, so nothing is shared across layers):

    A       (r, in)             Kaiming-uniform(a=√5)   shared by all tasks
    lam     (T, r, r) | (T, r)  identity | ones         Λ_t, "full" or "diagonal"
    B       (n, out, r)         zeros                   shared up-projections B_i
    w       (T, n)              Kaiming-uniform(a=√5)   mixing logits; random on purpose: with uniform w
                                                        and B = 0 every B_i gets the same gradient forever
The base layer keeps its own bias (or its lack of one); nothing here adds or re-initialises a bias.

Baselines share the forward (``method``):
    lora           one A (r, in) and one B (1, out, r) for every row; task ids are ignored
    per_task_lora  A (T·r, in) and B (T, out, r): an independent adapter per task

How a mixed-task batch is computed (no per-row copies of A; U_t = s·B̃_t·Λ_t built once per forward):
    h     = dropout(x) @ Aᵀ                         (b, L, r)    one shared down-projection
    Uᵀ    = (B̃_t Λ_t)ᵀ for every task               (T, r, out)  tiny
  gather (rows of >= r tokens, the usual case):
    y     = (W x + b).baddbmm_(h, Uᵀ[ids], alpha=s) each row's (r, out) factor, one batched GEMM, K = r
  fused (short rows, and the baselines):
    y     = (W x + b).addmm_(h in its task's r-slot (M, T·r), Uᵀ (T·r, out), alpha=s)   one GEMM, K = T·r
Both add into the base output in place (no extra (M, out) pass) and give the same numbers. Eagerly the
gather path is one autograd node with a hand-written backward (``_GatheredUpdate``): about half the
small kernels of the generic graph. Under torch.compile plain ops are used and the compiler fuses them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kernel.errors import UnknownScenario

Method = Literal["mtl_lora", "lora", "per_task_lora"]
METHODS = ("mtl_lora", "lora", "per_task_lora")


class TaskRouter:
    """Carries the current batch's per-row task ids to every adapted layer, without forward hooks.

    One router per model; the model sets ``router.task_ids`` (integer tensor, shape (batch,)) before
    each forward. Ids on the CPU are checked against ``num_tasks`` here (on an accelerator the check
    would stall the device; ids are built by ``TaskMap``, which rejects unknown scenarios).
    Under non-reentrant activation checkpointing the ids of the forward pass are restored for the
    recomputation (``checkpoint_context``), so an interleaved forward cannot leak into a backward.

    ``weights_version`` counts announced writes to the adapters' parameters (``weights_changed``). The
    layers key their no-grad factor cache on it: DeepSpeed ZeRO writes updated weights with
    ``param.data.copy_()``, which changes neither a tensor's ``_version`` nor its ``data_ptr()``, so
    whoever writes parameters that way (the trainer, after every optimizer step) must announce it.
    """

    def __init__(self, num_tasks: int | None = None) -> None:
        self.num_tasks = num_tasks
        self._task_ids: torch.Tensor | None = None
        self.weights_version = 0

    def weights_changed(self) -> None:
        """Invalidate every layer's cached factors: call after writing adapter parameters in place."""
        self.weights_version += 1

    @property
    def task_ids(self) -> torch.Tensor | None:
        return self._task_ids

    @task_ids.setter
    def task_ids(self, ids: torch.Tensor | None) -> None:
        if ids is not None and not torch.compiler.is_compiling():
            self._validate(ids)
        self._task_ids = ids

    def _validate(self, ids: torch.Tensor) -> None:
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"task ids must be a 1-D integer tensor (one id per row), got {ids.dtype} {tuple(ids.shape)}"
            )
        if self.num_tasks is None or ids.device.type != "cpu" or ids.numel() == 0:
            return
        bad = ((ids < 0) | (ids >= self.num_tasks)).nonzero()
        if bad.numel():
            row = int(bad[0, 0])
            raise UnknownScenario(
                f"task id {int(ids[row])} at row {row} is outside [0, {self.num_tasks}) "
                f"({bad.numel()} rows out of range)"
            )

    def checkpoint_context(self):
        """``context_fn`` for ``torch.utils.checkpoint``: replays this forward's task ids on recompute."""
        captured = self._task_ids

        @contextlib.contextmanager
        def replay():
            saved = self._task_ids
            self._task_ids = captured  # already validated when it was set
            try:
                yield
            finally:
                self._task_ids = saved

        return contextlib.nullcontext(), replay()


class MTLLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus an MTL-LoRA (or baseline) update, routed per row by task id.

    Args:
        base_layer: the linear layer to adapt; it is frozen and keeps its own bias (none is added).
        num_tasks: T, the number of tasks (scenarios).
        router: shared ``TaskRouter`` holding the per-row task ids.
        method: "mtl_lora", "lora" or "per_task_lora".
        r, alpha, n_up, tau, dropout, lambda_type: as in the paper; s = alpha / r.

    Input ``x`` is (batch, ..., in); row ``b`` (all of its tokens) uses task ``router.task_ids[b]``.
    Raises ValueError when task ids are missing (for a multi-task method) or do not match the batch.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_tasks: int,
        router: TaskRouter,
        method: Method = "mtl_lora",
        r: int = 8,
        alpha: float = 16.0,
        n_up: int = 3,
        tau: float = 0.1,
        dropout: float = 0.05,
        lambda_type: Literal["full", "diagonal"] = "full",
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown adapter method {method!r}; expected one of {METHODS}")
        if lambda_type not in ("full", "diagonal"):
            raise ValueError(f"unknown lambda_type {lambda_type!r}; expected 'full' or 'diagonal'")
        if num_tasks < 1 or r < 1 or n_up < 1 or tau <= 0:
            raise ValueError(f"need num_tasks, r, n_up >= 1 and tau > 0; got {num_tasks}, {r}, {n_up}, {tau}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.router = router
        self.method = method
        self.num_tasks = num_tasks
        self.r = r
        self.scaling = alpha / r
        self.tau = tau
        self.lambda_type = lambda_type
        self.n_up = n_up if method == "mtl_lora" else 1
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_f, out_f = base_layer.in_features, base_layer.out_features
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        a_groups = num_tasks if method == "per_task_lora" else 1
        self.A = nn.Parameter(torch.empty(a_groups * r, in_f, **kw))
        if method == "mtl_lora":
            self.B = nn.Parameter(torch.zeros(self.n_up, out_f, r, **kw))
            shape = (num_tasks, r, r) if lambda_type == "full" else (num_tasks, r)
            self.lam = nn.Parameter(torch.empty(shape, **kw))
            self.w = nn.Parameter(torch.empty(num_tasks, self.n_up, **kw))
        else:
            self.B = nn.Parameter(torch.zeros(self.num_routes, out_f, r, **kw))
        self.reset_adapter_parameters()

    @property
    def num_routes(self) -> int:
        """How many distinct updates the layer holds (1 for shared LoRA)."""
        return 1 if self.method == "lora" else self.num_tasks

    def reset_adapter_parameters(self) -> None:
        with torch.no_grad():
            # Each task's A block gets the Kaiming-uniform init of an (r, in) matrix: U(±1/√in).
            for block in self.A.view(-1, self.r, self.A.shape[-1]):
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            self.B.zero_()
            if self.method == "mtl_lora":
                if self.lambda_type == "full":
                    self.lam.copy_(torch.eye(self.r).expand_as(self.lam))
                else:
                    self.lam.fill_(1.0)
                nn.init.kaiming_uniform_(self.w, a=math.sqrt(5))  # fan_in = n: U(±1/√n)

    # --- the per-task update as LoRA pairs ------------------------------------------------------------

    def mixing_weights(self) -> torch.Tensor:
        """p, (T, n): softmax(w / τ), computed in fp32 (or fp64 for fp64 parameters)."""
        return _softmax_fp32(self.w, self.tau)

    def _up_t(self, dtype: torch.dtype | None = None, elementwise: bool | None = None) -> torch.Tensor:
        """Uᵀ without the scaling s: (B̃_t Λ_t)ᵀ for every route, shape (routes, r, out).

        ``elementwise`` writes the two tiny contractions (mixing over n, Λ over r) as broadcast
        products and sums, which torch.compile fuses into one kernel; eagerly, one mm and one bmm
        launch fewer kernels. Both compute the same numbers. Default: elementwise when compiling.
        """
        b = self.B if dtype in (None, self.B.dtype) else self.B.to(dtype)  # (routes | n, out, r)
        if self.method != "mtl_lora":
            return b.transpose(1, 2)  # (routes, r, out), a view
        if elementwise is None:
            elementwise = torch.compiler.is_compiling()
        p = self.mixing_weights()  # (T, n) fp32
        p = p.to(b.dtype)
        lam = self.lam if self.lam.dtype == b.dtype else self.lam.to(b.dtype)
        if elementwise:
            b_mix_t = (p[:, :, None, None] * b.transpose(1, 2)[None]).sum(1)  # B̃_tᵀ, (T, r, out)
            if self.lambda_type == "full":  # Λ_tᵀ B̃_tᵀ: sum over Λ's row index c
                return (lam[:, :, :, None] * b_mix_t[:, :, None, :]).sum(1)
            return lam[:, :, None] * b_mix_t
        b_mix = torch.mm(p, b.view(self.n_up, -1)).view(-1, b.shape[1], self.r)  # B̃_t, (T, out, r)
        if self.lambda_type == "full":
            return torch.bmm(lam.transpose(1, 2), b_mix.transpose(1, 2))  # Λ_tᵀ B̃_tᵀ, (T, r, out)
        return lam[:, :, None] * b_mix.transpose(1, 2)  # diag(λ_t) B̃_tᵀ

    def _factors(self, dtype: torch.dtype) -> torch.Tensor:
        """Uᵀ in ``dtype`` for the forward. Without autograd (evaluation, scoring) it is cached, keyed on
        everything that can change it: the router's ``weights_version`` (writes through ``.data``, as
        DeepSpeed's optimizer steps do), each tensor's ``_version`` (ordinary in-place updates such as
        ``load_state_dict`` or a torch optimizer), its storage (ZeRO-3 re-gathers) and its device."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._up_t().to(dtype)
        params = [p for p in (self.B, getattr(self, "lam", None), getattr(self, "w", None)) if p is not None]
        key = (dtype, self.router.weights_version, *((p._version, p.data_ptr(), p.device) for p in params))
        cached = self.__dict__.get("_factor_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._up_t().to(dtype))
            self.__dict__["_factor_cache"] = cached  # a plain attribute: not state, not a buffer
        return cached[1]

    def up_factors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """U_t = s · B̃_t · Λ_t for every route, (routes, out, r), in ``dtype`` (default: the parameters')."""
        return (self._up_t(dtype) * self.scaling).transpose(1, 2)

    def down_factors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A for every route, (routes, r, in): a shared A is broadcast, never copied."""
        a = self.A.view(-1, self.r, self.A.shape[-1]).to(dtype or self.A.dtype)
        return a.expand(self.num_routes, -1, -1)

    def delta_weight(self, task: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW_t = U_t A_t, (out, in), for one task; for shared LoRA ``task`` may be None."""
        route = self._route(task)
        return self.up_factors(dtype)[route] @ self.down_factors(dtype)[route]

    def lora_pair(
        self, task: int | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t (r, in), U_t (out, r)): an ordinary LoRA pair with scaling 1 for one task (detached copies)."""
        route = self._route(task)
        with torch.no_grad():
            return self.down_factors(dtype)[route].clone(), self.up_factors(dtype)[route].contiguous()

    def _route(self, task: int | None) -> int:
        if self.method == "lora" and task is None:
            return 0
        if task is None or not 0 <= task < self.num_tasks:
            raise UnknownScenario(f"task must be in [0, {self.num_tasks}), got {task}")
        return 0 if self.method == "lora" else task

    # --- forward --------------------------------------------------------------------------------------

    # How rows get their task's update (mtl_lora only; the baselines always use "fused"):
    #   fused   one GEMM with K = T·r over h placed in its task's slot (FLOPs T× a LoRA's up-projection)
    #   gather  each row's U_tᵀ (r, out) gathered, one batched GEMM with K = r (FLOPs equal to a LoRA's;
    #           the gathered copy, b·r·out, is small against the (b·L, out) output when L >= r)
    #   auto    gather when every row holds at least r tokens, else fused
    update_path: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out): W x + b, exactly the frozen layer
        h = F.linear(self.dropout(x), self.A)  # (..., a_groups·r)
        if h.dtype != out.dtype:  # autocast: the base output is in the autocast dtype
            h = h.to(out.dtype)
        if self.method == "mtl_lora" and self._gathers(x):
            rows = x.shape[0]
            out3 = out if out.dim() == 3 else out.view(rows, -1, out.shape[-1])  # (b, L, out)
            h3 = h if h.dim() == 3 else h.view(rows, -1, self.r)  # (b, L, r)
            ids = self._row_ids(x)
            if torch.compiler.is_compiling() or not torch.is_grad_enabled():
                # Plain ops: compiled, the compiler derives and fuses the backward; without grad, the
                # factors come from the cache.
                u_rows = self._factors(out.dtype).index_select(0, ids)  # (b, r, out)
                out3.baddbmm_(h3, u_rows, alpha=self.scaling)
            else:  # one autograd node with a hand-written backward: far fewer small kernels
                b, lam = self.B, self.lam
                if b.dtype != out.dtype:
                    b, lam = b.to(out.dtype), lam.to(out.dtype)
                diagonal = self.lambda_type == "diagonal"
                _GatheredUpdate.apply(out3, h3, b, lam, self.w, ids, self.scaling, self.tau, diagonal)
            return out
        up_t = self._factors(out.dtype)  # (routes, r, out)
        if self.method == "mtl_lora":
            # Place h in its task's r-slot: (b, ..., 1, r) * (b, ..., T, 1) -> (b, ..., T·r).
            h = (h.unsqueeze(-2) * self._row_mask(x, h.dtype)).flatten(-2)
        elif self.method == "per_task_lora":
            # h already holds every task's r columns; keep only the row's own task.
            h = (h.unflatten(-1, (self.num_tasks, self.r)) * self._row_mask(x, h.dtype)).flatten(-2)
        # One GEMM with K = routes·r, accumulated in place: out += s · hm @ Uᵀ.
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up_t.reshape(-1, up_t.shape[-1]),
                                           alpha=self.scaling)
        return out

    def _gathers(self, x: torch.Tensor) -> bool:
        if self.update_path == "auto":
            return x.dim() >= 3 and math.prod(x.shape[1:-1]) >= self.r
        if self.update_path not in ("fused", "gather"):
            raise ValueError(f"update_path must be 'auto', 'fused' or 'gather', got {self.update_path!r}")
        return self.update_path == "gather"

    def _row_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The batch's task ids, (batch,), on x's device; checks that they exist and cover the batch."""
        ids = self.router.task_ids
        if ids is None:
            raise ValueError(f"{self.method}: no task ids were set for this batch (set router.task_ids)")
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"{self.method}: task ids cover {ids.shape[0]} rows but the input batch has {x.shape[0]}")
        return ids.to(x.device)

    def _row_mask(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(batch, 1, ..., 1, T, 1) in ``dtype``: 1 in each row's task slot, 0 elsewhere."""
        ids = self._row_ids(x)
        mask = ids.unsqueeze(-1) == torch.arange(self.num_tasks, device=x.device)  # (batch, T) bool
        return mask.to(dtype).view(ids.shape[0], *([1] * (x.dim() - 2)), self.num_tasks, 1)

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, tasks={self.num_tasks}, r={self.r}, n_up={self.n_up}, "
            f"scaling={self.scaling}, tau={self.tau}, lambda={self.lambda_type}"
        )


def _softmax_fp32(w: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(w / τ) over the last dim, with the division and the softmax in at least fp32."""
    return torch.softmax(w.to(torch.promote_types(w.dtype, torch.float32)) / tau, dim=-1)


class _GatheredUpdate(torch.autograd.Function):
    """out (b, L, out) += s · h (b, L, r) @ U_{t(b)}ᵀ in place, with Uᵀ_t = Λ_tᵀ B̃_tᵀ, B̃ = softmax(w/τ) B.

    The same numbers as the plain ops in ``MTLLoRALinear._up_t`` + ``baddbmm_``, as one autograd node
    whose backward is written out: about half the kernels of the generic graph, which matters when the
    host, not the device, sets the pace of eager training. Inputs share one dtype (w may differ).
    """

    @staticmethod
    def forward(ctx, out, h, B, lam, w, ids, scaling: float, tau: float, diagonal: bool):
        n, out_f, r = B.shape
        p = _softmax_fp32(w, tau)  # (T, n), fp32
        b_mix = torch.mm(p.to(B.dtype), B.view(n, -1)).view(-1, out_f, r)  # B̃, (T, out, r)
        if diagonal:
            up_t = lam.unsqueeze(-1) * b_mix.transpose(1, 2)  # (T, r, out)
        else:
            up_t = torch.bmm(lam.transpose(1, 2), b_mix.transpose(1, 2))  # (T, r, out)
        u_rows = up_t.index_select(0, ids)  # (b, r, out)
        out.baddbmm_(h, u_rows, alpha=scaling)
        ctx.mark_dirty(out)
        ctx.save_for_backward(h, B, lam, ids, p, b_mix, u_rows)
        ctx.scaling, ctx.tau, ctx.diagonal = scaling, tau, diagonal
        return out

    @staticmethod
    def backward(ctx, g):  # g: (b, L, out)
        h, B, lam, ids, p, b_mix, u_rows = ctx.saved_tensors
        s, n, T = ctx.scaling, B.shape[0], lam.shape[0]
        grad_h = grad_b = grad_lam = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_h = torch.baddbmm(h, g, u_rows.transpose(1, 2), beta=0, alpha=s)  # s · g U_t, (b, L, r)
        if any(ctx.needs_input_grad[2:5]):
            grad_rows = torch.bmm(h.transpose(1, 2), g)  # (b, r, out)
            grad_up = grad_rows.new_zeros(T, *grad_rows.shape[1:]).index_add_(0, ids, grad_rows, alpha=s)
            b_mix_t = b_mix.transpose(1, 2)  # (T, r, out)
            if ctx.diagonal:
                grad_lam = (grad_up * b_mix_t).sum(-1)  # (T, r)
                grad_mix = grad_up.transpose(1, 2) * lam.unsqueeze(1)  # (T, out, r)
            else:
                grad_lam = torch.bmm(b_mix_t, grad_up.transpose(1, 2))  # B̃_tᵀ Gᵀ, (T, r, r)
                grad_mix = torch.bmm(grad_up.transpose(1, 2), lam.transpose(1, 2))  # Gᵀ Λ_tᵀ, (T, out, r)
            flat = grad_mix.reshape(T, -1)
            grad_b = torch.mm(p.t().to(flat.dtype), flat).view_as(B)  # Σ_t p_ti ∂B̃_t
            grad_p = torch.mm(flat, B.view(n, -1).t()).to(p.dtype)  # (T, n)
            grad_w = torch._softmax_backward_data(grad_p, p, -1, p.dtype).div_(ctx.tau)
        return g, grad_h, grad_b, grad_lam, grad_w, None, None, None, None


def expected_trainable_params(
    in_f: int, out_f: int, r: int, num_tasks: int, n_up: int, method: Method, lambda_type: str = "full"
) -> int:
    """The spec's count for one adapted layer: r·in + T·r·r (T·r diagonal) + n·out·r + T·n.

    Baselines: lora r·in + out·r; per_task_lora T·(r·in + out·r).
    """
    if method == "lora":
        return r * in_f + out_f * r
    if method == "per_task_lora":
        return num_tasks * (r * in_f + out_f * r)
    lam = num_tasks * r * r if lambda_type == "full" else num_tasks * r
    return r * in_f + lam + n_up * out_f * r + num_tasks * n_up
