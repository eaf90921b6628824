"""The MTL-LoRA linear layer (Yang et al., AAAI 2025) and its two baselines behind one interface.

For a row of task ``t`` a frozen linear layer ``W`` (out × in) becomes::

    y = W x + s · B̃_t · Λ_t · A · dropout(x)
    B̃_t = Σ_i p_{t,i} · B_i,    p_t = softmax(w_t / τ)  (fp32),    s = alpha / r

Parameters, all owned by this module (DeepSpeed ZeRO-3 gathers a module's own parameters around its
forward, so nothing is shared across layers):

    A       (r, in)          Kaiming-uniform(a=√5)   shared by all tasks
    lam     (T, r, r) | (T, r)  identity | ones      Λ_t, full or diagonal
    B       (n, out, r)      zeros                   shared up-projections
    w       (T, n)           Kaiming-uniform(a=√5)   mixing logits; random on purpose: with uniform w and
                                                     B = 0 every B_i gets the same gradient forever

Baselines share the forward (``method``):
    lora           one A (r, in) and one B (out, r) for every row; task ids are ignored
    per_task_lora  A (T·r, in) and B (T, out, r): an independent adapter per task

How the mixed-task forward stays as cheap as one LoRA (no per-row copies of A or of B̃):
    h   = dropout(x) @ A.T                                 (M, r)       one shared down-projection
    U   = stack_t s·(B̃_t Λ_t).T                            (T·r, out)   tiny, once per forward
    hm  = h placed in the r-slot of its row's task, zeros elsewhere     (M, T·r)
    y   = addmm(W x + b, hm, U)                            one GEMM whose K is T·r, fused with the add
A GEMM this thin is bound by writing its (M, out) output, so K = T·r costs about what PEFT's K = r does.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Method = Literal["mtl_lora", "lora", "per_task_lora"]


class TaskRouter:
    """Carries the current batch's per-row task ids to every adapted layer, without forward hooks.

    One router per model; the model sets ``task_ids`` (LongTensor, shape (batch,)) before each forward.
    Under non-reentrant activation checkpointing the ids of the forward pass are restored for the
    recomputation (``checkpoint_context``), so a later forward cannot leak into an earlier backward.
    """

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None

    def checkpoint_context(self):
        """``context_fn`` for ``torch.utils.checkpoint``: replays this forward's task ids on recompute."""
        import contextlib

        captured = self.task_ids

        @contextlib.contextmanager
        def replay():
            saved = self.task_ids
            self.task_ids = captured
            try:
                yield
            finally:
                self.task_ids = saved

        return contextlib.nullcontext(), replay()


class MTLLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus an MTL-LoRA (or baseline) update, routed per row by task id.

    Args:
        base_layer: the linear layer to adapt; it is frozen and keeps its own bias (none is added).
        num_tasks: T, the number of tasks (scenarios).
        router: shared ``TaskRouter`` holding the per-row task ids.
        method: "mtl_lora", "lora" or "per_task_lora".
        r, alpha, n_up, tau, dropout, lambda_type: as in the paper; s = alpha / r.

    Input ``x`` is (batch, ..., in); row ``b`` uses task ``router.task_ids[b]``.
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
        if method not in ("mtl_lora", "lora", "per_task_lora"):
            raise ValueError(f"unknown adapter method {method!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
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
        dev, dt = base_layer.weight.device, base_layer.weight.dtype
        a_groups = num_tasks if method == "per_task_lora" else 1
        self.A = nn.Parameter(torch.empty(a_groups * r, in_f, device=dev, dtype=dt))
        if method == "mtl_lora":
            self.B = nn.Parameter(torch.zeros(self.n_up, out_f, r, device=dev, dtype=dt))
            shape = (num_tasks, r, r) if lambda_type == "full" else (num_tasks, r)
            self.lam = nn.Parameter(torch.empty(shape, device=dev, dtype=dt))
            self.w = nn.Parameter(torch.empty(num_tasks, self.n_up, device=dev, dtype=dt))
        else:
            groups = num_tasks if method == "per_task_lora" else 1
            self.B = nn.Parameter(torch.zeros(groups, out_f, r, device=dev, dtype=dt))
        self.reset_adapter_parameters()

    @property
    def num_routes(self) -> int:
        """How many distinct updates the layer holds (1 for shared LoRA)."""
        return 1 if self.method == "lora" else self.num_tasks

    def reset_adapter_parameters(self) -> None:
        with torch.no_grad():
            # Each task's A block gets the Kaiming-uniform init of an (r, in) matrix.
            for block in self.A.view(-1, self.r, self.A.shape[-1]):
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            self.B.zero_()
            if self.method == "mtl_lora":
                if self.lambda_type == "full":
                    self.lam.copy_(torch.eye(self.r).expand_as(self.lam))
                else:
                    self.lam.fill_(1.0)
                nn.init.kaiming_uniform_(self.w, a=math.sqrt(5))

    # --- the per-task update as LoRA pairs ------------------------------------------------------------

    def mixing_weights(self) -> torch.Tensor:
        """p, (T, n): softmax(w / τ) computed in fp32."""
        return torch.softmax(self.w.float() / self.tau, dim=-1)

    def up_factors(self) -> torch.Tensor:
        """U_t = s · B̃_t · Λ_t for every route, (routes, out, r), in the parameters' dtype."""
        if self.method != "mtl_lora":
            return self.B * self.scaling
        b_mix = torch.einsum("tn,nor->tor", self.mixing_weights().to(self.B.dtype), self.B)  # (T, out, r)
        if self.lambda_type == "full":
            return torch.matmul(b_mix, self.lam) * self.scaling  # (T, out, r) @ (T, r, r)
        return b_mix * self.lam[:, None, :] * self.scaling

    def down_factors(self) -> torch.Tensor:
        """A for every route, (routes, r, in): shared A is broadcast, never copied."""
        a = self.A.view(-1, self.r, self.A.shape[-1])
        return a.expand(self.num_routes, -1, -1)

    def delta_weight(self, task: int | None = None) -> torch.Tensor:
        """ΔW_t = U_t A (out × in) for one task; for shared LoRA ``task`` may be None."""
        route = 0 if self.method == "lora" else self._check_task(task)
        return self.up_factors()[route] @ self.down_factors()[route]

    def lora_pair(self, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t (r, in), U_t (out, r)): an ordinary LoRA pair with scaling 1 for one task."""
        route = 0 if self.method == "lora" else self._check_task(task)
        return self.down_factors()[route].detach().clone(), self.up_factors()[route].detach().clone()

    def _check_task(self, task: int | None) -> int:
        if task is None or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")
        return task

    # --- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        h = F.linear(self.dropout(x), self.A)  # (..., a_groups·r)
        up = self.up_factors()  # (routes, out, r)
        if self.method == "lora":
            hm = h
        else:
            onehot = self._row_onehot(x)  # (batch, T), dtype of h
            if self.method == "mtl_lora":
                # Place h in its task's slot: (b, ..., T, r) -> (b, ..., T·r).
                hm = h.unsqueeze(-2) * onehot.view(onehot.shape[0], *([1] * (h.dim() - 2)), -1, 1)
            else:  # per_task_lora: h already holds every task's r columns; zero the other tasks'.
                hm = h.unflatten(-1, (self.num_tasks, self.r)) * onehot.view(
                    onehot.shape[0], *([1] * (h.dim() - 2)), -1, 1
                )
            hm = hm.flatten(-2)
        u = up.transpose(1, 2).reshape(-1, up.shape[1])  # (routes·r, out)
        out = torch.addmm(base.reshape(-1, base.shape[-1]), hm.reshape(-1, hm.shape[-1]).to(u.dtype), u)
        return out.view_as(base)

    def _row_onehot(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.router.task_ids
        if ids is None:
            raise ValueError(f"{self.method}: no task ids were set for this batch (set router.task_ids)")
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"task ids cover {ids.shape[0]} rows but the input batch has {x.shape[0]}")
        return F.one_hot(ids.to(x.device), self.num_tasks).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, tasks={self.num_tasks}, r={self.r}, n_up={self.n_up}, "
            f"scaling={self.scaling}, tau={self.tau}, lambda={self.lambda_type}"
        )


def expected_trainable_params(
    in_f: int, out_f: int, r: int, num_tasks: int, n_up: int, method: Method, lambda_type: str = "full"
) -> int:
    """The spec's count for one adapted layer (and the baselines' analogues)."""
    if method == "lora":
        return r * in_f + out_f * r
    if method == "per_task_lora":
        return num_tasks * (r * in_f + out_f * r)
    lam = num_tasks * r * r if lambda_type == "full" else num_tasks * r
    return r * in_f + lam + n_up * out_f * r + num_tasks * n_up
