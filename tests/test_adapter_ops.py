"""The host-side cost of the adapters, held to its targets: operations dispatched per step, graph breaks.

On a GPU the eager step's speed follows how many operations the host launches, not the kernels'
arithmetic, so these counts (benchmarks/adapter_ops.py, every aten operation through a TorchDispatchMode)
are the CPU-side proxies of the GPU gap to PEFT LoRA. Counts are deterministic: these are properties, not
timings. The model is the proxies' tiny LLaMA (4 layers, hidden 256, 8 tasks, r=8 on q, k, v, o).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from benchmarks import adapter_ops
from benchmarks.adapter_models import build_base, make_batch, parse_args, with_mtl_lora, with_peft
from modeling.inject import adapter_layers

TARGET = 1.10  # MTL-LoRA / PEFT LoRA, every proxy


def _args(dtype: str = "fp32"):
    # Counts do not depend on the batch size; rows of >= r tokens take the gather path, as in training.
    return parse_args(["--preset", "llama-small", "--batch", "2", "--seq", "16", "--dtype", dtype])


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def counts(request):
    args = _args(request.param)
    base = build_base(args)
    batch = make_batch(args, base.config.vocab_size)
    out = {}
    for name, build in (("peft_lora", with_peft), ("mtl_lora", with_mtl_lora),
                        ("lora", lambda b, a: with_mtl_lora(b, a, method="lora")),
                        ("per_task_lora", lambda b, a: with_mtl_lora(b, a, method="per_task_lora"))):
        model, set_ids = build(base, args)
        out[name] = {k: c.total for k, c in adapter_ops.count_step(model, set_ids, batch).items()}
    return out


@pytest.mark.parametrize("measure", ["fwd+bwd", "optimizer", "scoring"])
def test_mtl_lora_dispatches_at_most_10_percent_more_operations_than_peft_lora(counts, measure):
    ratio = counts["mtl_lora"][measure] / counts["peft_lora"][measure]
    assert ratio <= TARGET, f"{measure}: {counts['mtl_lora'][measure]} vs PEFT {counts['peft_lora'][measure]}"


def test_the_baselines_on_the_same_machinery_cost_no_more_than_peft_lora(counts):
    for method in ("lora", "per_task_lora"):
        for measure, n in counts[method].items():
            assert n <= counts["peft_lora"][measure], (method, measure, n, counts["peft_lora"][measure])


def test_one_adapted_layer_costs_a_few_operations_more_than_a_peft_layer():
    """Per layer alone, fwd + bwd: the mixing, Λ and the per-row gather fit in a handful of operations."""
    args = _args()
    peft = adapter_ops.count_layer("peft_lora", 256, 256, args, torch.float32)
    mtl = adapter_ops.count_layer("mtl_lora", 256, 256, args, torch.float32)
    assert mtl["params"] == 4 and peft["params"] == 2
    assert mtl["fwd"] + mtl["bwd"] <= peft["fwd"] + peft["bwd"] + 4, (mtl, peft)
    assert mtl["scoring"] < peft["scoring"]


def test_task_learning_rate_of_its_own_costs_one_fused_call():
    args = _args()
    base = build_base(args)
    batch = make_batch(args, base.config.vocab_size)
    model, set_ids = with_mtl_lora(base, args)
    same = adapter_ops.count_step(model, set_ids, batch)["optimizer"].total
    model, set_ids = with_mtl_lora(base, args)
    apart = adapter_ops.count_step(model, set_ids, batch, task_lr=3e-4)["optimizer"].total
    assert apart == same + 2  # one more group: its step counter and its fused kernel


@pytest.mark.parametrize("method", ["mtl_lora", "lora", "per_task_lora"])
def test_training_forward_has_no_graph_breaks(method):
    args = _args()
    base = build_base(args)
    model, set_ids = with_mtl_lora(base, args, method=method)
    explained = adapter_ops.explain(model, set_ids, make_batch(args, base.config.vocab_size))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_fullgraph_compiled_training_step_equals_eager():
    """The whole forward compiled with fullgraph=True (AOT autograd derives the backward): same loss, same
    gradients as the eager step's written-out backward. aot_eager keeps the test free of code generation."""
    torch._dynamo.reset()
    args = _args()
    base = build_base(args)
    ids, mask, tasks, labels = make_batch(args, base.config.vocab_size)
    eager, _ = with_mtl_lora(base, args)
    eager.eval()  # dropout off: both runs see the same function
    compiled = copy.deepcopy(eager)  # the same adapter values, its own router
    compiled_forward = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    results = []
    for model, forward in ((eager, eager), (compiled, compiled_forward)):
        next(iter(adapter_layers(model).values())).router.task_ids = tasks
        logits = forward(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) == 4 * 16
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-6, rtol=1e-4, msg=name)


def test_grouped_adamw_steps_like_torch_adamw_per_group():
    """Groups that share their hyperparameters step in one call; the numbers are torch AdamW's, group by group,
    including a group whose lr differs and a scheduler that changes lrs between steps."""
    from training.ds_config import GroupedAdamW

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(6)]

    def groups(ps):
        return [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1, "name": "adapters"},
                {"params": ps[2:4], "lr": 1e-2, "weight_decay": 0.1, "name": "task"},
                {"params": ps[4:], "lr": 3e-2, "weight_decay": 0.0, "name": "head"}]

    ours_p = [p.detach().clone().requires_grad_() for p in params]
    ref_p = [p.detach().clone().requires_grad_() for p in params]
    ours = GroupedAdamW(groups(ours_p), lr=1e-2, fused=True)
    ref = torch.optim.AdamW(groups(ref_p), lr=1e-2, fused=True)
    for step in range(4):
        g = [torch.randn(3, 4) for _ in params]
        for ps, opt in ((ours_p, ours), (ref_p, ref)):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            for group in opt.param_groups:
                group["lr"] *= 0.5 if step == 2 else 1.0
            opt.step()
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(a, b)
    assert [g["name"] for g in ours.param_groups] == ["adapters", "task", "head"]  # groups stay as built
    assert [len(g["params"]) for g in ours.param_groups] == [2, 2, 2]
    ours.load_state_dict(ref.state_dict())  # the same state layout as torch's AdamW
    calls = []
    ours.register_step_pre_hook(lambda *args: calls.append(1))
    ours.step()
    assert calls == [1]  # hooks run once, though torch has wrapped AdamW.step too by now


def test_optimizer_step_operations_do_not_grow_with_tensors():
    from training.ds_config import make_optimizer

    def ops(n_tensors: int) -> int:
        ps = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(n_tensors)]
        opt = make_optimizer([{"params": ps[::2], "lr": 1e-3, "weight_decay": 0.0, "name": "adapters"},
                              {"params": ps[1::2], "lr": 1e-3, "weight_decay": 0.0, "name": "task"}], on_gpu=False)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        with adapter_ops.OpCounter() as counter:
            opt.step()
        return counter.total

    assert ops(4) == ops(64)
