"""``RoutedUpdate``: the MTL-LoRA update as one autograd node per layer, with its backward written out.

The eager training layout of ``modeling.mtl_lora_fast``: ``out += s · update(xd)`` in place, where the update
is the layer's (``MTLLoRALinear.reference_update`` computes the same numbers in plain tensor ops and lets
autograd derive the gradients). Each gradient here is one or two GEMMs on views already at hand
(``modeling.mtl_lora_fast.views``), instead of the generic graph's chains of views, transposes and small
products: the host launches about half the operations. Tests hold it to the reference's numbers and check
its backward with gradcheck (tests/test_mtl_lora.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def softmax_fp32(w: torch.Tensor, tau: float, tau_fp32: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(w / τ) over the last dim, with the division and the softmax in at least fp32.

    ``tau_fp32``, τ as a 1-element fp32 tensor, lets type promotion do a bf16/fp16 w's cast inside the
    division (one operation instead of two; the same fp32 numbers)."""
    if w.dtype in (torch.float32, torch.float64):  # a Python check: torch.promote_types is an operation
        return torch.softmax(w / tau, dim=-1)
    return torch.softmax(w.float() / tau if tau_fp32 is None else torch.div(w, tau_fp32), dim=-1)


class Spec(NamedTuple):
    """What ``RoutedUpdate`` needs besides tensors."""

    method: str
    r: int
    num_tasks: int
    scaling: float
    tau: float
    diagonal: bool


def rows_to_routes(rows: torch.Tensor, ids: torch.Tensor, zeros: torch.Tensor | None, routes: int,
                   alpha: float = 1.0) -> torch.Tensor:
    """Σ over the rows of each route: (b, ...) -> (routes, ...), the adjoint of ``index_select(0, ids)``.
    One out-of-place index_add onto a persistent zero tensor when one of the right dtype is at hand."""
    if zeros is not None and zeros.dtype == rows.dtype:
        return torch.index_add(zeros, 0, ids, rows, alpha=alpha)
    return rows.new_zeros((routes, *rows.shape[1:])).index_add_(0, ids, rows, alpha=alpha)


# Small helpers that skip the operation when there is nothing to do: every view is a dispatched operation.
def same(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def flat(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (M, d), the tokens as rows."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def rows3(t: torch.Tensor) -> torch.Tensor:
    """(b, ..., d) -> (b, L, d), each row's tokens in one batch entry."""
    return t if t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])


def shaped(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t if t.shape == shape else t.view(shape)


class RoutedUpdate(torch.autograd.Function):
    """The eager training layout: ``out += s · update(xd)`` in place, as one autograd node per layer.

    Same numbers as ``MTLLoRALinear.reference_update`` (the plain maths). The backward is written out so that each
    gradient is one or two GEMMs on views already at hand, instead of the generic graph's chains of views,
    transposes and small products; the host launches about half the operations. Everything is computed in
    the base output's dtype (the autocast dtype under autocast); the softmax stays in fp32. Autograd casts
    each gradient to its input's dtype.

    Shapes: out (b, L, out) [lora: (..., out)], xd (b, L, in), ids (b,). For mtl_lora
        h = xd Aᵀ (b, L, r);  p = softmax(w/τ) (T, n);  B̃ = p B (T, out, r);  U = B̃ Λ (T, out, r)
        out_b += s · h_b U_{t_b}ᵀ
    """

    @staticmethod
    def forward(ctx, out, xd, ids, spec: Spec, views, A, B, lam, w):  # views: mtl_lora_fast.Views
        dt, s, r = out.dtype, spec.scaling, spec.r
        out_f, in_f, rows = out.shape[-1], xd.shape[-1], out.shape[0]
        ctx.spec, ctx.xd_shape, ctx.b_shape, ctx.a_shape = spec, xd.shape, B.shape, A.shape
        ctx.zeros_u, ctx.zeros_a = views.zeros_u, views.zeros_a  # constants: not saved tensors
        cast = dt != A.dtype  # autocast with fp32 parameters: cast copies instead of the persistent views
        if spec.method == "lora":  # one factor for every row: 2-D GEMMs over all tokens
            x2 = same(flat(xd), dt)  # (M, in)
            a = A.to(dt) if cast else views.a
            b0 = B.to(dt)[0] if cast else views.b0  # (out, r)
            h2 = torch.mm(x2, a.t() if cast else views.a_t)  # (M, r)
            flat(out).addmm_(h2, b0.t() if cast else views.b0_t, alpha=s)
            ctx.save_for_backward(x2, h2, a, b0)
            ctx.mark_dirty(out)
            return out
        out3 = rows3(out)  # (b, L, out)
        if spec.method == "per_task_lora":  # each row's own A_t and B_t, gathered: a LoRA's FLOPs per row
            x3 = same(rows3(xd), dt)  # (b, L, in)
            a_rows = (A.to(dt).view(spec.num_tasks, r, in_f) if cast else views.a_rows).index_select(0, ids)
            h3 = torch.bmm(x3, a_rows.transpose(1, 2))  # (b, L, r)
            u_rows = same(B, dt).index_select(0, ids)  # (b, out, r)
            ctx.save_for_backward(x3, h3, a_rows, u_rows, ids)
        else:  # mtl_lora
            # h_b = x_b Aᵀ as a batched GEMM against A broadcast over the rows (stride 0, no copy): no
            # flattening view in, none out, and the input gradient comes back in xd's shape.
            x3 = same(rows3(xd), dt)  # (b, L, in)
            if cast:
                a = A.to(dt)
                a_rows_t, a_rows = a.t().expand(rows, -1, -1), a.expand(rows, -1, -1)
            else:
                a_rows_t, a_rows = views.broadcast(rows)  # (b, in, r), (b, r, in)
            h3 = torch.bmm(x3, a_rows_t)  # (b, L, r)
            p = softmax_fp32(w, spec.tau, views.tau_fp32(spec.tau, w))  # (T, n), fp32
            p_dt = same(p, dt)
            b_flat = B.to(dt).view(B.shape[0], -1) if cast else views.b_flat  # (n, out·r)
            mix = torch.mm(p_dt, b_flat).view(-1, out_f, r)  # B̃_t, (T, out, r)
            if spec.diagonal:
                lam_op = lam.to(dt).unsqueeze(1) if cast else views.lam_u  # (T, 1, r)
                u = mix * lam_op  # B̃_t diag(λ_t)
            else:
                lam_dt = same(lam, dt)
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
            g2 = flat(g)  # (M, out)
            if need_x or need_a:
                gh = torch.addmm(h2, g2, b0, beta=0, alpha=s)  # s · g B₀, (M, r)
                if need_a:
                    grads[5] = torch.mm(gh.t(), x2)  # (r, in)
                if need_x:
                    grads[1] = shaped(torch.mm(gh, a), ctx.xd_shape)
            if need_b:
                grads[6] = torch.addmm(b0, g2.t(), h2, beta=0, alpha=s).view(ctx.b_shape)  # s · gᵀ h, (1, out, r)
            return tuple(grads)
        g3 = rows3(g)  # (b, L, out)
        if spec.method == "per_task_lora":
            x3, h3, a_rows, u_rows, ids = ctx.saved_tensors
            if need_x or need_a:
                gh = torch.baddbmm(h3, g3, u_rows, beta=0, alpha=s)  # s · g_b B_t, (b, L, r)
                if need_x:
                    grads[1] = shaped(torch.bmm(gh, a_rows), ctx.xd_shape)
                if need_a:
                    grad_rows = torch.bmm(gh.transpose(1, 2), x3)  # (b, r, in)
                    grads[5] = rows_to_routes(grad_rows, ids, ctx.zeros_a, spec.num_tasks).view(ctx.a_shape)
            if need_b:
                grads[6] = rows_to_routes(torch.bmm(g3.transpose(1, 2), h3), ids, ctx.zeros_u, spec.num_tasks,
                                          alpha=s)
            return tuple(grads)
        x3, h3, a_rows, u_rows, ids, p, p_dt, b_flat_t, mix, lam_op = ctx.saved_tensors
        if need_x or need_a:
            gh = torch.baddbmm(h3, g3, u_rows, beta=0, alpha=s)  # s · g_b U_t, (b, L, r)
            if need_a:  # Σ over every token: one 2-D GEMM
                grads[5] = torch.mm(flat(gh).t(), flat(x3))  # (r, in)
            if need_x:
                grads[1] = shaped(torch.bmm(gh, a_rows), ctx.xd_shape)  # (b, L, in)
        if need_b or need_lam or need_w:
            # ∂U_t = s · Σ_{rows of t} g_bᵀ h_b, (T, out, r)
            gu = rows_to_routes(torch.bmm(g3.transpose(1, 2), h3), ids, ctx.zeros_u, spec.num_tasks, alpha=s)
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
                grads[8] = torch._softmax_backward_data(same(g_p, p.dtype), p, -1, p.dtype)
        return tuple(grads)
