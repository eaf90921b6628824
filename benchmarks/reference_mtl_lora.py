"""The reference code's way of computing MTL-LoRA, rebuilt for the speed comparison (not product code).

The authors' layer works per row of the batch: it gathers a copy of A for every row, gathers each row's
Λ_t, pre-mixes B̃_t for all T tasks once per forward and gathers it per row, then runs three batched
matmuls and adds the result into the base output::

    A_rows   = A[zeros(b)]                   (b, r, in)   one copy of A per row
    Λ_rows   = Λ[ids]                        (b, r, r)
    B̃        = softmax(w / τ) @ B            (T, out, r)  all tasks, once per forward
    B̃_rows   = B̃[ids]                        (b, out, r)
    y       += s · bmm(bmm(bmm(dropout(x), A_rowsᵀ), Λ_rowsᵀ), B̃_rowsᵀ)

Same parameters, shapes and initialisation as ``modeling.mtl_lora.MTLLoRALinear`` (full Λ), so a model
built either way computes the same function; only the arithmetic layout differs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modeling.mtl_lora import TaskRouter


class GatherMTLLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, num_tasks: int, router: TaskRouter, r: int = 8,
                 alpha: float = 16.0, n_up: int = 3, tau: float = 0.1, dropout: float = 0.05) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.router = router
        self.r, self.scaling, self.tau = r, alpha / r, tau
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_f, out_f = base_layer.in_features, base_layer.out_features
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.A = nn.Parameter(torch.empty(1, r, in_f, **kw))
        self.lam = nn.Parameter(torch.eye(r, **kw).repeat(num_tasks, 1, 1))
        self.B = nn.Parameter(torch.zeros(n_up, out_f, r, **kw))
        self.w = nn.Parameter(torch.empty(num_tasks, n_up, **kw))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A[0], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.w, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, L, in)
        ids = self.router.task_ids
        a_rows = self.A.index_select(0, torch.zeros_like(ids))  # (b, r, in)
        lam_rows = self.lam.index_select(0, ids)  # (b, r, r)
        p = F.softmax(self.w / self.tau, dim=-1, dtype=torch.float32).to(self.B.dtype)  # (T, n)
        n, out_f, r = self.B.shape
        b_mix = (p @ self.B.view(n, -1)).view(-1, out_f, r)  # (T, out, r)
        b_rows = b_mix.index_select(0, ids)  # (b, out, r)
        result = self.base_layer(x)
        h = torch.bmm(self.dropout(x), a_rows.transpose(1, 2))  # (b, L, r)
        h = torch.bmm(h, lam_rows.transpose(1, 2))
        result += torch.bmm(h, b_rows.transpose(1, 2)) * self.scaling
        return result


def inject_gather_adapters(model: nn.Module, targets: list[str], num_tasks: int, r: int, alpha: float,
                           n_up: int, tau: float, dropout: float) -> TaskRouter:
    """Replace every ``nn.Linear`` whose name ends with one of ``targets``; returns the router."""
    router = TaskRouter(num_tasks)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no linear layer of {type(model).__name__} matches {targets}")
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, GatherMTLLoRALinear(getattr(holder, child), num_tasks, router, r, alpha, n_up,
                                                    tau, dropout))
    return router
