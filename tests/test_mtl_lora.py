"""Properties of the MTL-LoRA layer alone (``modeling.mtl_lora``) and of its fast layouts.

The forward (with and without autograd) and the reference maths equal the spec's per-row formula in float64;
the written-out backward passes gradcheck; the eager layouts give the reference's scores and gradients in
fp32, bf16 and under autocast; cached factors and persistent views follow parameter updates; the spec's
initialisation; diagonal Λ equals full Λ with that diagonal; clear errors for bad task ids.
Whole models built with the layer: tests/test_mtl_lora_models.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kernel.errors import UnknownScenario
from modeling import mtl_lora_fast as fast
from modeling.mtl_lora import MTLLoRALinear, TaskRouter
from modeling.routed_update import RoutedUpdate
from tests.shared import randomize_adapters

METHODS = ["mtl_lora", "lora", "per_task_lora"]


def spec_forward(layer: MTLLoRALinear, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """y = W x + b + s·B̃_t·Λ_t·A·x written row by row in float64, straight from the spec."""
    W = layer.base_layer.weight.double()
    b = layer.base_layer.bias
    rows = []
    for row, t in zip(x.double(), ids.tolist()):
        y = row @ W.T + (b.double() if b is not None else 0)
        r = layer.r
        if layer.method == "mtl_lora":
            p = torch.softmax(layer.w[t].double() / layer.tau, dim=-1)
            b_mix = sum(p[i] * layer.B[i].double() for i in range(layer.n_up))
            lam = layer.lam[t].double()
            lam = lam if layer.lambda_type == "full" else torch.diag(lam)
            delta = layer.scaling * b_mix @ lam @ layer.A.double()
        elif layer.method == "lora":
            delta = layer.scaling * layer.B[0].double() @ layer.A.double()
        else:
            delta = layer.scaling * layer.B[t].double() @ layer.A[t * r:(t + 1) * r].double()
        rows.append(y + row @ delta.T)
    return torch.stack(rows)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lambda_type", ["full", "diagonal"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 4), (5,), (5, 2, 3)])
@pytest.mark.parametrize("path", ["auto", "fused", "gather"])
def test_forward_equals_spec_formula(method, lambda_type, bias, shape, path):
    torch.manual_seed(0)
    router = TaskRouter(4)
    layer = MTLLoRALinear(nn.Linear(12, 10, bias=bias), 4, router, method, r=3, alpha=6.0, n_up=2,
                          tau=0.5, dropout=0.0, lambda_type=lambda_type)
    layer.update_path = path
    randomize_adapters(nn.ModuleDict({"l": layer}))
    x = torch.randn(*shape, 12)
    router.task_ids = torch.tensor([2, 0, 3, 1, 2])
    flat = x.reshape(5, -1, 12)
    expected = torch.stack([spec_forward(layer, flat[:, j], router.task_ids) for j in range(flat.shape[1])], 1)
    ids = None if method == "lora" else router.task_ids
    with torch.no_grad():
        scored = layer(x)  # without autograd: the reference maths or a plain layout, factors cached
        reference = layer.reference_update(layer.base_layer(x), x, ids)
    for y in (layer(x), scored, reference):  # layer(x) with autograd: the training layouts
        assert y.shape == (*shape, 10)
        torch.testing.assert_close(y.reshape(5, -1, 10).double(), expected, atol=1e-5, rtol=1e-5)
    # delta_weight / lora_pair describe the same update.
    for t in range(4):
        a, up = layer.lora_pair(t)
        torch.testing.assert_close(up @ a, layer.delta_weight(t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lambda_type", ["full", "diagonal"])
def test_compiled_and_eager_contraction_forms_agree(lambda_type):
    """The tiny contractions written elementwise (the form inductor fuses) give the numbers of mm/bmm."""
    layer = MTLLoRALinear(nn.Linear(12, 10), 4, TaskRouter(4), r=3, n_up=2, lambda_type=lambda_type)
    randomize_adapters(nn.ModuleDict({"l": layer}))
    torch.testing.assert_close(fast.up_t_elementwise(layer), layer._up_t(), atol=1e-6, rtol=1e-6)


def _three_task_layer(path: str) -> MTLLoRALinear:
    """A 12 -> 10 layer over 3 tasks with random adapters, routed for a batch of 3 rows (tasks 0, 2, 1)."""
    router = TaskRouter(3)
    layer = MTLLoRALinear(nn.Linear(12, 10), 3, router, r=4, dropout=0.0)
    layer.update_path = path
    randomize_adapters(nn.ModuleDict({"l": layer}))
    router.task_ids = torch.tensor([0, 2, 1])
    return layer


@pytest.mark.parametrize("path", ["fused", "gather"])
def test_autocast_with_fp32_parameters(path):
    layer = _three_task_layer(path)
    x = torch.randn(3, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.02)


FAST_CASES = [("mtl_lora", "full"), ("mtl_lora", "diagonal"), ("lora", "full"), ("per_task_lora", "full")]


@pytest.mark.parametrize("method,lambda_type", FAST_CASES)
def test_hand_written_backward_passes_gradcheck(method, lambda_type):
    """The eager path's written-out backward against finite differences, in float64. The parameters enter
    through the layer's persistent views as well, so this also shows that those follow in-place changes."""
    torch.manual_seed(0)
    layer = MTLLoRALinear(nn.Linear(5, 6), 3, TaskRouter(3), method, r=2, n_up=2, tau=0.7, dropout=0.0,
                          lambda_type=lambda_type).double()
    randomize_adapters(nn.ModuleDict({"l": layer}))
    ids = torch.tensor([2, 0, 2, 1])
    out0 = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    xd = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    params = [p for p in (layer.A, layer.B, getattr(layer, "lam", None), getattr(layer, "w", None)) if p is not None]

    def update(out0, xd, A, B, lam=None, w=None):
        return RoutedUpdate.apply(out0.clone(), xd, ids, fast.spec(layer), fast.views(layer), A, B, lam, w)

    assert torch.autograd.gradcheck(update, [out0, xd, *params])


def _plain_forward(layer: MTLLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward in plain tensor ops, autograd deriving the backward: the reference maths where the
    layer takes the written-out autograd node, else the (plain) layout it takes."""
    out, xd = layer.base_layer(x), layer.dropout(x)
    ids = None if layer.method == "lora" else layer._row_ids(x)
    layout = fast.choose_layout(layer, x)
    if layout in ("routed", "reference"):
        return layer.reference_update(out, xd, ids)
    return fast.update(layer, layout, out, xd, ids)


def _four_row_layer(method: str, lambda_type: str) -> MTLLoRALinear:
    """Seeded: a 12 -> 10 layer over 3 tasks (n = 3, τ = 0.5) with random adapters, routed for tasks 0, 2, 1, 2."""
    torch.manual_seed(0)
    router = TaskRouter(3)
    layer = MTLLoRALinear(nn.Linear(12, 10), 3, router, method, r=4, n_up=3, tau=0.5, dropout=0.0,
                          lambda_type=lambda_type)
    randomize_adapters(nn.ModuleDict({"l": layer}))
    router.task_ids = torch.tensor([0, 2, 1, 2])
    return layer


def _fast_and_plain(layer: MTLLoRALinear, x: torch.Tensor, autocast: bool = False) -> list[tuple]:
    """(scores, input grad, parameter grads) of the layer's own forward, then of the plain maths: the same
    weighted-sum loss backpropagated through each. Scores keep their dtype; gradients come back as fp32."""
    results = []
    for forward in (layer, lambda x: _plain_forward(layer, x)):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad.float() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), x.grad.float(), grads))
    return results


@pytest.mark.parametrize("method,lambda_type", FAST_CASES)
@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 2), (4,)])
def test_eager_fast_path_equals_the_plain_maths(method, lambda_type, shape):
    """Same scores and the same gradients for A, B, Λ, w and the input, path by path."""
    layer = _four_row_layer(method, lambda_type)
    for path in ("gather", "fused", "auto"):
        layer.update_path = path
        x = torch.randn(*shape, 12, requires_grad=True)
        (y_fast, gx_fast, g_fast), (y_plain, gx_plain, g_plain) = _fast_and_plain(layer, x)
        torch.testing.assert_close(y_fast, y_plain, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gx_fast, gx_plain, atol=1e-6, rtol=1e-5)
        assert g_fast.keys() == g_plain.keys() and g_fast
        for name in g_fast:
            torch.testing.assert_close(g_fast[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=f"{path} {name}")


@pytest.mark.parametrize("method,lambda_type", FAST_CASES)
@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_eager_fast_path_tracks_the_plain_maths_in_bf16(method, lambda_type, precision):
    """bf16 parameters, and fp32 parameters under bf16 autocast: scores and gradients agree to bf16 rounding."""
    layer = _four_row_layer(method, lambda_type)
    if precision == "bf16":
        layer.to(torch.bfloat16)
    x = torch.randn(4, 6, 12, dtype=layer.A.dtype, requires_grad=True)
    (y_fast, gx_fast, g_fast), (y_plain, gx_plain, g_plain) = _fast_and_plain(layer, x, precision == "autocast")
    assert y_fast.dtype == y_plain.dtype == torch.bfloat16
    y_fast, y_plain = y_fast.float(), y_plain.float()
    pairs = [("y", y_fast, y_plain), ("x", gx_fast, gx_plain), *((n, g_fast[n], g_plain[n]) for n in g_plain)]
    for name, a, b in pairs:
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, atol=0.02 * scale, rtol=0.02, msg=name)
    assert g_fast.keys() == g_plain.keys()
    assert all(p.grad.dtype == p.dtype for p in layer.parameters() if p.grad is not None)


def test_persistent_views_follow_a_new_storage():
    """``.data =`` (ZeRO-3 re-gathers, ``.to()``) gives a parameter new storage: the views are made again."""
    layer = _three_task_layer("gather")
    x = torch.randn(3, 6, 12)
    before = fast.views(layer)
    assert fast.views(layer) is before  # reused while the storage stays
    with torch.no_grad():
        layer.A.mul_(2)  # in place: the old views show it
    assert fast.views(layer) is before and torch.equal(before.a_t, layer.A.t())
    layer.A.data = layer.A.data * 0.5
    after = fast.views(layer)
    assert after is not before and torch.equal(after.a_t, layer.A.t())
    torch.testing.assert_close(layer(x), _plain_forward(layer, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["fused", "gather"])
def test_scoring_cache_follows_parameter_updates(path):
    """Without autograd the factors are cached; any change to B, Λ or w must show in the next score."""
    layer = _three_task_layer(path)
    x = torch.randn(3, 6, 12)

    def check():
        with torch.no_grad():
            scored = layer(x)
        # vs the autograd path: the same maths in another summation order (fp32: ~1e-5); a stale factor is O(1) off
        torch.testing.assert_close(scored, layer(x).detach(), atol=1e-5, rtol=1e-5)
        return scored

    first = check()
    torch.optim.SGD([layer.B, layer.lam, layer.w], lr=0.5).zero_grad()
    layer(x).pow(2).sum().backward()
    torch.optim.SGD([layer.B, layer.lam, layer.w], lr=0.5).step()  # in-place: bumps _version
    stepped = check()
    assert not torch.allclose(stepped, first)
    layer.B.data = layer.B.data * 2  # a storage swap, as DeepSpeed ZeRO-3 does
    swapped = check()
    assert not torch.allclose(swapped, stepped)
    # DeepSpeed ZeRO-1/2/3 write stepped weights with .data.copy_(): neither _version nor data_ptr moves, so
    # the writer announces it (the trainer does after every optimizer step) and the next score is fresh.
    for p in (layer.B, layer.lam, layer.w):
        p.data.copy_(p.data * 0.5 + 0.1)
    layer.router.weights_changed()
    assert not torch.allclose(check(), swapped)


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    in_f, out_f, r, n = 256, 48, 8, 3
    layer = MTLLoRALinear(nn.Linear(in_f, out_f), 5, TaskRouter(5), r=r, n_up=n)
    bound = 1 / math.sqrt(in_f)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound  # U(±1/√in)
    assert torch.equal(layer.lam, torch.eye(r).expand(5, r, r))
    assert torch.count_nonzero(layer.B) == 0 and layer.B.shape == (n, out_f, r)
    assert layer.w.shape == (5, n) and layer.w.abs().max() <= 1 / math.sqrt(n)
    assert layer.w.std() > 0.1  # random on purpose, not uniform
    diag = MTLLoRALinear(nn.Linear(in_f, out_f), 5, TaskRouter(5), r=r, lambda_type="diagonal")
    assert torch.equal(diag.lam, torch.ones(5, r))


def test_random_mixing_logits_separate_the_up_projections():
    """With B = 0 the first gradients of B_i differ iff the mixing logits w differ across i."""
    torch.manual_seed(0)
    router = TaskRouter(4)
    layer = MTLLoRALinear(nn.Linear(16, 8), 4, router, n_up=3, dropout=0.0)
    router.task_ids = torch.tensor([0, 1, 2, 3, 0, 1])
    layer(torch.randn(6, 16)).pow(2).sum().backward()
    g = layer.B.grad
    assert not torch.allclose(g[0], g[1]) and not torch.allclose(g[1], g[2])
    # The flaw the random init avoids: uniform logits give identical gradients to every B_i.
    layer.B.grad = None
    with torch.no_grad():
        layer.w.zero_()
    layer(torch.randn(6, 16)).pow(2).sum().backward()
    assert torch.allclose(layer.B.grad[0], layer.B.grad[1]) and torch.allclose(layer.B.grad[1], layer.B.grad[2])


def test_diagonal_lambda_equals_full_lambda_with_that_diagonal():
    torch.manual_seed(0)
    router = TaskRouter(3)
    base = nn.Linear(12, 9)
    diag = MTLLoRALinear(base, 3, router, r=4, dropout=0.0, lambda_type="diagonal")
    randomize_adapters(nn.ModuleDict({"d": diag}))
    full = MTLLoRALinear(base, 3, router, r=4, dropout=0.0, lambda_type="full")
    with torch.no_grad():
        for name in ("A", "B", "w"):
            getattr(full, name).copy_(getattr(diag, name))
        full.lam.copy_(torch.diag_embed(diag.lam))
    router.task_ids = torch.tensor([0, 1, 2, 2])
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(diag(x), full(x), atol=1e-6, rtol=1e-6)


def test_softmax_runs_in_fp32_for_bf16_parameters():
    layer = MTLLoRALinear(nn.Linear(16, 8).to(torch.bfloat16), 4, TaskRouter(4), tau=0.1)
    p = layer.mixing_weights()
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.softmax(layer.w.float() / 0.1, -1))


def test_bad_task_ids_raise_clear_errors():
    router = TaskRouter(3)
    layer = MTLLoRALinear(nn.Linear(8, 8), 3, router)
    with pytest.raises(ValueError, match="no task ids"):
        layer(torch.randn(2, 8))
    router.task_ids = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="3 rows but the input batch has 2"):
        layer(torch.randn(2, 8))
    with pytest.raises(UnknownScenario, match="task id 3 at row 1"):
        router.task_ids = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="1-D integer"):
        router.task_ids = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="unknown adapter method"):
        MTLLoRALinear(nn.Linear(8, 8), 3, router, method="dora")
    with pytest.raises(UnknownScenario):
        layer.delta_weight(3)


def test_w_init_scale_shrinks_the_mixing_logits_toward_uniform_mixing():
    torch.manual_seed(0)
    for scale in (1.0, 0.1, 0.0):
        layer = MTLLoRALinear(torch.nn.Linear(16, 16), 4, TaskRouter(4), n_up=3, tau=0.1, w_init_scale=scale)
        bound = scale / math.sqrt(3)
        assert layer.w.abs().max() <= bound + 1e-7
        if scale > 0:
            assert layer.w.abs().max() > 0.5 * bound  # still random: the B_i are told apart
    torch.testing.assert_close(layer.mixing_weights(), torch.full((4, 3), 1 / 3))  # scale 0: uniform
