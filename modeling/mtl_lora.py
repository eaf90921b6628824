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

The reference maths (``reference_update``) is the formula in plain tensor ops: U_t = B̃_t Λ_t for every task
once per forward (two tiny contractions, ``_up_t``), then each row's U_t gathered and one batched GEMM.
Scoring (no autograd, the factors cached) and torch.compile run it; eager training, short rows and shared
LoRA take faster layouts of the same numbers (``modeling.mtl_lora_fast``; the training step's autograd node
with its backward written out is ``modeling.routed_update``). Tests hold every layout to the same scores and
gradients.
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kernel.errors import UnknownScenario
from modeling import mtl_lora_fast as fast
from modeling.routed_update import rows3, softmax_fp32

Method = Literal["mtl_lora", "lora", "per_task_lora"]
METHODS = ("mtl_lora", "lora", "per_task_lora")


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

    # --- forward --------------------------------------------------------------------------------------

    # How rows get their task's update (mtl_lora and per_task_lora; shared LoRA has one factor for all rows):
    #   gather  each row's U_tᵀ (r, out) gathered, one batched GEMM with K = r (FLOPs equal to a LoRA's)
    #   fused   one GEMM with K = T·r over h placed in its task's slot (``mtl_lora_fast``'s "slots" layout)
    #   auto    gather when every row holds at least r tokens, else fused
    update_path: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (b, ..., out): W x + b, its own module call, so ZeRO-3 gathers W around it
        xd = self.dropout(x)  # (b, ..., in)
        ids = None if self.method == "lora" else self._row_ids(x)  # (b,): each row's task
        layout = fast.choose_layout(self, x)  # "reference", or a faster layout of the same numbers
        if layout == "reference":
            return self.reference_update(out, xd, ids)
        return fast.update(self, layout, out, xd, ids)

    def reference_update(self, out: torch.Tensor, xd: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """out += s · U_t A_t xd for each row's task t, in place: the formula in plain tensor ops.

        out (b, ..., out), xd (b, ..., in), ids (b,), or None for shared LoRA (its one route for every row).
        Autograd derives the backward. The factors come from ``_factors`` (cached without autograd).
        """
        if ids is None:
            ids = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        u_rows = self._factors(out.dtype).index_select(0, ids)  # (b, r, out): each row's (B̃_t Λ_t)ᵀ
        if self.method == "per_task_lora":  # each row's own A_t
            a_rows = self.A.view(self.num_tasks, self.r, -1).index_select(0, ids)  # (b, r, in)
            h = torch.bmm(rows3(xd), a_rows.transpose(1, 2))  # (b, L, r); L: every token of a row
        else:  # one A for every task
            h = rows3(F.linear(xd, self.A))  # (b, L, r)
        rows3(out).baddbmm_(h.to(out.dtype), u_rows, alpha=self.scaling)  # out_b += s · h_b U_{t_b}ᵀ
        return out

    def _row_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The batch's task ids, (batch,), on x's device; checks that they exist and cover the batch."""
        ids = self.router.task_ids
        if ids is None:
            raise ValueError(f"{self.method}: no task ids were set for this batch (set router.task_ids)")
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"{self.method}: task ids cover {ids.shape[0]} rows but the input batch has {x.shape[0]}")
        return ids.to(x.device)

    # --- the factors U_t = s B̃_t Λ_t; each task's update as a LoRA pair ------------------------------------------

    def mixing_weights(self) -> torch.Tensor:
        """p, (T, n): softmax(w / τ), computed in fp32 (or fp64 for fp64 parameters)."""
        return softmax_fp32(self.w, self.tau)

    def _up_t(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B̃_t Λ_t)ᵀ for every route, without the scaling s: (routes, r, out). For lora and per_task_lora: B_tᵀ.

        Two tiny contractions for all T tasks at once: the mixing over n and Λ_t (one bmm). The mixing is n
        elementwise multiply-adds rather than one (T, n) x (n, out·r) GEMM: a GEMM's rounding may depend on how
        many rows it has, and task t's factors must not depend on how many tasks the model holds (a model
        that gains a scenario scores the others bit for bit as before; tests/test_warm_start.py).
        """
        b = self.B if dtype in (None, self.B.dtype) else self.B.to(dtype)  # (n | routes, out, r)
        if self.method != "mtl_lora":
            return b.transpose(1, 2)  # (routes, r, out), a view
        p = self.mixing_weights().to(b.dtype)[:, :, None, None]  # (T, n, 1, 1): softmax(w_t / τ), computed in fp32
        lam = self.lam.to(b.dtype)  # (T, r, r) or (T, r)
        b_mix = p[:, 0] * b[0]  # B̃_t = Σ_i p_ti B_i, (T, out, r), summed in the order i = 0, 1, ..., n-1
        for i in range(1, self.n_up):
            b_mix = b_mix + p[:, i] * b[i]
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

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, tasks={self.num_tasks}, r={self.r}, n_up={self.n_up}, "
            f"scaling={self.scaling}, tau={self.tau}, lambda={self.lambda_type}"
        )


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
