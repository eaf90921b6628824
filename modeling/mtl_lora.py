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

How a mixed-task batch is computed (no per-row copies of A; U_t = B̃_t Λ_t built once per forward):
    h     = dropout(x) @ Aᵀ                         (b, L, r)    one shared down-projection
    U     = B̃_t Λ_t for every task                  (T, out, r)  tiny: one mm (mixing) and one bmm (Λ)
  gather (rows of >= r tokens, the usual case):
    y     = (W x + b).baddbmm_(h, U[ids]ᵀ, alpha=s) each row's (r, out) factor, one batched GEMM, K = r
  fused (short rows):
    y     = (W x + b).addmm_(h in its task's r-slot (M, T·r), Uᵀ (T·r, out), alpha=s)   one GEMM, K = T·r
The baselines take the same paths: ``lora`` (one factor for every row) adds s·h B₀ᵀ with one 2-D GEMM;
``per_task_lora`` gathers each row's own A_t (b, r, in) and B_t, so it costs a LoRA's FLOPs, not T× them.
All paths add into the base output in place (no extra (M, out) pass) and give the same numbers.

Two ways to run the same maths (``MTLLoRALinear.forward``):
    plain     ``_update``: ordinary tensor ops, autograd derives the backward. The reference; it runs
              without autograd (scoring, with the factors cached) and under torch.compile (which fuses it).
    eager     ``_RoutedUpdate``: one autograd node per layer with the backward written out, reading
              parameter views that persist across steps (``_Aliases``). Eagerly the host launches every
              operation one by one, so fewer, larger operations are what makes a step fast.
Tests hold the two to the same numbers and gradients, and count the operations (tests/test_adapter_ops.py).
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal, NamedTuple

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
        w_init_scale: float = 1.0,
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
        self.w_init_scale = w_init_scale  # the mixing logits start in U(±w_init_scale/√n); 1: the paper's
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
                self.w.mul_(self.w_init_scale)  # smaller: softmax(w/τ) starts closer to uniform mixing

    # --- the per-task update as LoRA pairs ------------------------------------------------------------

    def mixing_weights(self) -> torch.Tensor:
        """p, (T, n): softmax(w / τ), computed in fp32 (or fp64 for fp64 parameters)."""
        return _softmax_fp32(self.w, self.tau)

    def _up_t(self, dtype: torch.dtype | None = None, elementwise: bool = False) -> torch.Tensor:
        """Uᵀ without the scaling s: (B̃_t Λ_t)ᵀ for every route, shape (routes, r, out).

        The two tiny contractions (mixing over n, Λ over r) are one mm and one bmm. ``elementwise`` writes
        them as broadcast products and sums instead (a form inductor fuses into its own kernels); the same
        numbers, and no faster compiled: on CPU, whole-model compiled scoring took 1.16× the merged model's
        time that way against 1.08× with mm/bmm, and a compiled training step was no faster either.
        """
        b = self.B if dtype in (None, self.B.dtype) else self.B.to(dtype)  # (routes | n, out, r)
        if self.method != "mtl_lora":
            return b.transpose(1, 2)  # (routes, r, out), a view
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

    # How rows get their task's update (mtl_lora and per_task_lora; shared LoRA has one factor for all rows):
    #   fused   one GEMM with K = T·r over h placed in its task's slot (FLOPs T× a LoRA's up-projection)
    #   gather  each row's U_tᵀ (r, out) gathered, one batched GEMM with K = r (FLOPs equal to a LoRA's;
    #           the gathered copy, b·r·out, is small against the (b·L, out) output when L >= r)
    #   auto    gather when every row holds at least r tokens, else fused
    update_path: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The frozen layer through its own module call: ZeRO-3 gathers W around exactly that call.
        out = self.base_layer(x)  # (..., out): W x + b
        xd = self.dropout(x)
        path = self._path(x)
        ids = None if path == "shared" else self._row_ids(x)
        if path != "fused" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            lam, w = (self.lam, self.w) if self.method == "mtl_lora" else (None, None)
            return _RoutedUpdate.apply(out, xd, ids, self._spec(), self._aliases(), self.A, self.B, lam, w)
        return self._update(out, xd, ids, path)

    def _update(self, out: torch.Tensor, xd: torch.Tensor, ids: torch.Tensor | None, path: str) -> torch.Tensor:
        """out += s · (each row's update of xd), in place, in plain tensor ops: the reference maths.

        Autograd derives its backward; it is what runs without autograd (the factors then come from the
        cache), under torch.compile, and for the fused path. ``_RoutedUpdate`` computes the same numbers.
        """
        dtype, out_f = out.dtype, out.shape[-1]
        if path == "shared":  # lora: out (M, out) += s · (xd Aᵀ) B₀ᵀ
            h = F.linear(_flat(xd), self.A)  # (M, r); under autocast already in the base output's dtype
            _flat(out).addmm_(_same(h, dtype), self._factors(dtype)[0], alpha=self.scaling)
            return out
        if path == "gather":
            u_rows = self._factors(dtype).index_select(0, ids)  # each row's U_tᵀ, (b, r, out)
            if self.method == "per_task_lora":  # each row's own A_t: (b, L, in) @ (b, in, r)
                a_rows = self.A.view(self.num_tasks, self.r, -1).index_select(0, ids)  # (b, r, in)
                h3 = torch.bmm(_rows3(xd), a_rows.transpose(1, 2))
            else:  # one shared A
                h3 = _rows3(F.linear(xd, self.A))  # (b, L, r)
            _rows3(out).baddbmm_(_same(h3, dtype), u_rows, alpha=self.scaling)
            return out
        h = F.linear(xd, self.A).to(dtype)  # (..., a_groups·r)
        up_t = self._factors(dtype)  # (routes, r, out)
        if self.method == "mtl_lora":
            # Place h in its task's r-slot: (b, ..., 1, r) * (b, ..., T, 1) -> (b, ..., T·r).
            h = (h.unsqueeze(-2) * self._row_mask(xd, h.dtype)).flatten(-2)
        else:  # per_task_lora: h holds every task's r columns; keep only the row's own task
            h = (h.unflatten(-1, (self.num_tasks, self.r)) * self._row_mask(xd, h.dtype)).flatten(-2)
        # One GEMM with K = routes·r, accumulated in place: out += s · hm @ Uᵀ.
        out.view(-1, out_f).addmm_(h.reshape(-1, h.shape[-1]), up_t.reshape(-1, out_f), alpha=self.scaling)
        return out

    def _path(self, x: torch.Tensor) -> str:
        if self.update_path not in ("auto", "fused", "gather"):
            raise ValueError(f"update_path must be 'auto', 'fused' or 'gather', got {self.update_path!r}")
        if self.method == "lora":
            return "shared"
        if self.update_path == "auto":
            return "gather" if x.dim() >= 3 and math.prod(x.shape[1:-1]) >= self.r else "fused"
        return self.update_path

    def _spec(self) -> _Spec:
        return _Spec(self.method, self.r, self.num_tasks, self.scaling, self.tau, self.lambda_type == "diagonal")

    def _aliases(self) -> _Aliases:
        """Views of the parameters in the layouts the eager fast path's GEMMs read, kept across steps.

        A view aliases its parameter's storage, so in-place writes (optimizer steps, ``.data.copy_``,
        ``load_state_dict``) show through it and it never goes stale; a parameter that gets a new storage
        (``.data = ...``, ``.to()``, a ZeRO-3 re-gather to another address) gets new views. Reusing them
        saves a handful of view and transpose operations per layer and step; nothing here copies data.
        """
        params = (self.A, self.B, self.lam) if self.method == "mtl_lora" else (self.A, self.B)
        cached = self.__dict__.get("_alias_cache")
        if cached is not None and all(
            v.data_ptr() == p.data_ptr() and v.shape == p.shape and v.dtype == p.dtype and v.device == p.device
            for v, p in zip(cached.sources, params)
        ):
            return cached
        with torch.no_grad():  # plain aliases: no autograd history
            sources = tuple(p.detach() for p in params)  # share storage and version counter with the parameters
            A, B = sources[:2]
            lam = sources[2] if len(sources) > 2 else None
            b_flat = B.view(B.shape[0], -1)
            routes = self.num_tasks if self.method != "lora" else 1
            cached = _Aliases(
                sources=sources,
                a=A,  # (a_groups·r, in)
                a_t=A.t(),  # (in, a_groups·r)
                a_rows=A.view(self.num_tasks, self.r, -1) if self.method == "per_task_lora" else None,
                b_flat=b_flat,  # (n | routes, out·r)
                b_flat_t=b_flat.t(),
                b0=B[0] if self.method == "lora" else None,  # lora's B₀, (out, r)
                b0_t=B[0].t() if self.method == "lora" else None,
                lam_t=lam.transpose(1, 2) if lam is not None and lam.dim() == 3 else None,  # Λ_tᵀ
                lam_u=lam.unsqueeze(1) if lam is not None and lam.dim() == 2 else None,  # diagonal: (T, 1, r)
                # Never written: the out-of-place index_add of per-route gradient sums starts from them.
                zeros_u=B.new_zeros(routes, *B.shape[1:]) if routes > 1 else None,  # (T, out, r)
                zeros_a=A.new_zeros(routes, self.r, A.shape[1]) if self.method == "per_task_lora" else None,
                by_rows={},
                constants={},
            )
        self.__dict__["_alias_cache"] = cached  # a plain attribute: not state, not a buffer
        return cached

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


def _softmax_fp32(w: torch.Tensor, tau: float, tau_fp32: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(w / τ) over the last dim, with the division and the softmax in at least fp32.

    ``tau_fp32``, τ as a 1-element fp32 tensor, lets type promotion do a bf16/fp16 w's cast inside the
    division (one operation instead of two; the same fp32 numbers)."""
    if w.dtype in (torch.float32, torch.float64):  # a Python check: torch.promote_types is an operation
        return torch.softmax(w / tau, dim=-1)
    return torch.softmax(w.float() / tau if tau_fp32 is None else torch.div(w, tau_fp32), dim=-1)


class _Spec(NamedTuple):
    """What ``_RoutedUpdate`` needs besides tensors."""

    method: str
    r: int
    num_tasks: int
    scaling: float
    tau: float
    diagonal: bool


class _Aliases(NamedTuple):
    """Persistent views of one layer's parameters (``MTLLoRALinear._aliases``); None where a method has none."""

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
        views = self.by_rows.get(rows)
        if views is None:
            views = self.by_rows[rows] = (self.a_t.expand(rows, -1, -1), self.a.expand(rows, -1, -1))
        return views


def _rows_to_routes(rows: torch.Tensor, ids: torch.Tensor, zeros: torch.Tensor | None, routes: int,
                    alpha: float = 1.0) -> torch.Tensor:
    """Σ over the rows of each route: (b, ...) -> (routes, ...), the adjoint of ``index_select(0, ids)``.
    One out-of-place index_add onto a persistent zero tensor when one of the right dtype is at hand."""
    if zeros is not None and zeros.dtype == rows.dtype:
        return torch.index_add(zeros, 0, ids, rows, alpha=alpha)
    return rows.new_zeros((routes, *rows.shape[1:])).index_add_(0, ids, rows, alpha=alpha)


# Small helpers that skip the operation when there is nothing to do: every view is a dispatched operation.
def _same(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (M, d), the tokens as rows."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _rows3(t: torch.Tensor) -> torch.Tensor:
    """(b, ..., d) -> (b, L, d), each row's tokens in one batch entry."""
    return t if t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])


def _shaped(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t if t.shape == shape else t.view(shape)


class _RoutedUpdate(torch.autograd.Function):
    """The eager training path: ``out += s · update(xd)`` in place, as one autograd node per layer.

    Same numbers as ``MTLLoRALinear._update`` (the plain maths). The backward is written out so that each
    gradient is one or two GEMMs on views already at hand, instead of the generic graph's chains of views,
    transposes and small products; the host launches about half the operations. Everything is computed in
    the base output's dtype (the autocast dtype under autocast); the softmax stays in fp32. Autograd casts
    each gradient to its input's dtype.

    Shapes: out (b, L, out) [lora: (..., out)], xd (b, L, in), ids (b,). For mtl_lora
        h = xd Aᵀ (b, L, r);  p = softmax(w/τ) (T, n);  B̃ = p B (T, out, r);  U = B̃ Λ (T, out, r)
        out_b += s · h_b U_{t_b}ᵀ
    """

    @staticmethod
    def forward(ctx, out, xd, ids, spec: _Spec, views: _Aliases, A, B, lam, w):
        dt, s, r = out.dtype, spec.scaling, spec.r
        out_f, in_f, rows = out.shape[-1], xd.shape[-1], out.shape[0]
        ctx.spec, ctx.xd_shape, ctx.b_shape, ctx.a_shape = spec, xd.shape, B.shape, A.shape
        ctx.zeros_u, ctx.zeros_a = views.zeros_u, views.zeros_a  # constants: not saved tensors
        cast = dt != A.dtype  # autocast with fp32 parameters: cast copies instead of the persistent views
        if spec.method == "lora":  # one factor for every row: 2-D GEMMs over all tokens
            x2 = _same(_flat(xd), dt)  # (M, in)
            a = A.to(dt) if cast else views.a
            b0 = B.to(dt)[0] if cast else views.b0  # (out, r)
            h2 = torch.mm(x2, a.t() if cast else views.a_t)  # (M, r)
            _flat(out).addmm_(h2, b0.t() if cast else views.b0_t, alpha=s)
            ctx.save_for_backward(x2, h2, a, b0)
            ctx.mark_dirty(out)
            return out
        out3 = _rows3(out)  # (b, L, out)
        if spec.method == "per_task_lora":  # each row's own A_t and B_t, gathered: a LoRA's FLOPs per row
            x3 = _same(_rows3(xd), dt)  # (b, L, in)
            a_rows = (A.to(dt).view(spec.num_tasks, r, in_f) if cast else views.a_rows).index_select(0, ids)
            h3 = torch.bmm(x3, a_rows.transpose(1, 2))  # (b, L, r)
            u_rows = _same(B, dt).index_select(0, ids)  # (b, out, r)
            ctx.save_for_backward(x3, h3, a_rows, u_rows, ids)
        else:  # mtl_lora
            # h_b = x_b Aᵀ as a batched GEMM against A broadcast over the rows (stride 0, no copy): no
            # flattening view in, none out, and the input gradient comes back in xd's shape.
            x3 = _same(_rows3(xd), dt)  # (b, L, in)
            if cast:
                a = A.to(dt)
                a_rows_t, a_rows = a.t().expand(rows, -1, -1), a.expand(rows, -1, -1)
            else:
                a_rows_t, a_rows = views.broadcast(rows)  # (b, in, r), (b, r, in)
            h3 = torch.bmm(x3, a_rows_t)  # (b, L, r)
            p = _softmax_fp32(w, spec.tau, views.tau_fp32(spec.tau, w))  # (T, n), fp32
            p_dt = _same(p, dt)
            b_flat = B.to(dt).view(B.shape[0], -1) if cast else views.b_flat  # (n, out·r)
            mix = torch.mm(p_dt, b_flat).view(-1, out_f, r)  # B̃_t, (T, out, r)
            if spec.diagonal:
                lam_op = lam.to(dt).unsqueeze(1) if cast else views.lam_u  # (T, 1, r)
                u = mix * lam_op  # B̃_t diag(λ_t)
            else:
                lam_dt = _same(lam, dt)
                lam_op = lam_dt.transpose(1, 2) if cast else views.lam_t  # Λ_tᵀ, for the backward
                u = torch.bmm(mix, lam_dt)  # B̃_t Λ_t
            u_rows = u.index_select(0, ids)  # (b, out, r)
            b_flat_t = b_flat.t() if cast else views.b_flat_t
            ctx.save_for_backward(x3, h3, a_rows, u_rows, ids, p, p_dt, b_flat_t, mix, lam_op)
        out3.baddbmm_(h3, u_rows.transpose(1, 2), alpha=s)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, g):  # g: the gradient of out, its shape
        spec = ctx.spec
        s = spec.scaling
        _, need_x, _, _, _, need_a, need_b, need_lam, need_w = ctx.needs_input_grad
        grads = [g, None, None, None, None, None, None, None, None]  # out's own gradient passes through
        if spec.method == "lora":
            x2, h2, a, b0 = ctx.saved_tensors
            g2 = _flat(g)  # (M, out)
            if need_x or need_a:
                gh = torch.addmm(h2, g2, b0, beta=0, alpha=s)  # s · g B₀, (M, r)
                if need_a:
                    grads[5] = torch.mm(gh.t(), x2)  # (r, in)
                if need_x:
                    grads[1] = _shaped(torch.mm(gh, a), ctx.xd_shape)
            if need_b:
                grads[6] = torch.addmm(b0, g2.t(), h2, beta=0, alpha=s).view(ctx.b_shape)  # s · gᵀ h, (1, out, r)
            return tuple(grads)
        g3 = _rows3(g)  # (b, L, out)
        if spec.method == "per_task_lora":
            x3, h3, a_rows, u_rows, ids = ctx.saved_tensors
            if need_x or need_a:
                gh = torch.baddbmm(h3, g3, u_rows, beta=0, alpha=s)  # s · g_b B_t, (b, L, r)
                if need_x:
                    grads[1] = _shaped(torch.bmm(gh, a_rows), ctx.xd_shape)
                if need_a:
                    grad_rows = torch.bmm(gh.transpose(1, 2), x3)  # (b, r, in)
                    grads[5] = _rows_to_routes(grad_rows, ids, ctx.zeros_a, spec.num_tasks).view(ctx.a_shape)
            if need_b:
                grads[6] = _rows_to_routes(torch.bmm(g3.transpose(1, 2), h3), ids, ctx.zeros_u, spec.num_tasks,
                                           alpha=s)
            return tuple(grads)
        x3, h3, a_rows, u_rows, ids, p, p_dt, b_flat_t, mix, lam_op = ctx.saved_tensors
        if need_x or need_a:
            gh = torch.baddbmm(h3, g3, u_rows, beta=0, alpha=s)  # s · g_b U_t, (b, L, r)
            if need_a:  # Σ over every token: one 2-D GEMM
                grads[5] = torch.mm(_flat(gh).t(), _flat(x3))  # (r, in)
            if need_x:
                grads[1] = _shaped(torch.bmm(gh, a_rows), ctx.xd_shape)  # (b, L, in)
        if need_b or need_lam or need_w:
            # ∂U_t = s · Σ_{rows of t} g_bᵀ h_b, (T, out, r)
            gu = _rows_to_routes(torch.bmm(g3.transpose(1, 2), h3), ids, ctx.zeros_u, spec.num_tasks, alpha=s)
            if spec.diagonal:
                if need_lam:
                    grads[7] = (gu * mix).sum(1)  # (T, r)
                g_mix = gu * lam_op  # ∂B̃_t = ∂U_t diag(λ_t)
            else:
                if need_lam:
                    grads[7] = torch.bmm(mix.transpose(1, 2), gu)  # B̃_tᵀ ∂U_t, (T, r, r)
                g_mix = torch.bmm(gu, lam_op)  # ∂U_t Λ_tᵀ, (T, out, r)
            g_mix = g_mix.view(g_mix.shape[0], -1)  # (T, out·r)
            if need_b:
                grads[6] = torch.mm(p_dt.t(), g_mix).view(ctx.b_shape)  # Σ_t p_ti ∂B̃_t
            if need_w:
                g_p = torch.addmm(p_dt, g_mix, b_flat_t, beta=0, alpha=1 / spec.tau)  # ∂p / τ, (T, n)
                grads[8] = torch._softmax_backward_data(_same(g_p, p.dtype), p, -1, p.dtype)
        return tuple(grads)


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
