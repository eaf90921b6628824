"""Properties of tiny BERT and LLaMA models built with MTL-LoRA layers (and the two baselines).

B = 0 gives the base output; a mixed-scenario batch equals each scenario alone; the update paths agree in
scores and gradients; gradients reach only A, Λ, B, w and the head; bf16 tracks fp32; the parameter count
matches the spec's formula; no bias is added; task ids survive non-reentrant checkpointing; every layer owns
its parameters (ZeRO-3); per-task LoRA's tasks are independent. The layer alone: tests/test_mtl_lora.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from modeling.inject import adapter_layers, adapter_param_count
from modeling.model import enable_activation_checkpointing, is_adapter_param
from modeling.mtl_lora import expected_trainable_params
from tests.shared import BERT, LLAMA, NO_DROPOUT, padded_batch, randomize_adapters, tiny_adapted_model

T = 3
ARCHS = {
    "bert": {
        "random_config": {**BERT, **NO_DROPOUT},
        "pooling": "mean",
        "targets": ["query", "key", "value", "attention.output.dense"],
    },
    "llama": {
        "random_config": LLAMA,
        "pooling": "last",
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
}
METHODS = ["mtl_lora", "lora", "per_task_lora"]


def make_model(arch: str, method: str = "mtl_lora", lambda_type: str = "full", dtype=torch.float32,
               dropout: float = 0.0, num_tasks: int = T):
    a = ARCHS[arch]
    return tiny_adapted_model(a["random_config"], a["pooling"], a["targets"], num_tasks, dtype=dtype, method=method,
                              lambda_type=lambda_type, r=4, n_up=3, dropout=dropout)


def make_batch(model, batch: int = 6, length: int = 7, seed: int = 0):
    """Right-padded token ids, mask and per-row task ids cycling 0..T-1."""
    ids, mask = padded_batch(model, batch, length, min_length=2, seed=seed)
    return ids, mask, torch.arange(batch) % T


def strip_adapters(model):
    """The same model with every adapted layer replaced by its frozen base layer."""
    base = copy.deepcopy(model)
    for name, layer in adapter_layers(base).items():
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base_layer)
    return base


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_zero_up_projections_give_the_base_output(arch, method):
    model = make_model(arch, method, dropout=0.5)
    randomize_adapters(model, zero_b=True)  # A, Λ, w random: only B = 0 must matter
    base = strip_adapters(model)
    ids, mask, tasks = make_batch(model)
    model.train()  # adapter dropout active: the base path must stay untouched
    base.train()
    torch.testing.assert_close(model(ids, mask, tasks), base(ids, mask, tasks), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lambda_type", ["full", "diagonal"])
def test_mixed_batch_equals_each_scenario_alone(arch, method, lambda_type):
    model = make_model(arch, method, lambda_type).eval()
    randomize_adapters(model)
    ids, mask, tasks = make_batch(model)
    with torch.no_grad():
        mixed = model(ids, mask, tasks)
        for t in range(T):
            rows = tasks == t
            alone = model(ids[rows], mask[rows], tasks[rows])
            torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-5)
        # Routing matters (except for shared LoRA, which ignores task ids).
        other = model(ids, mask, (tasks + 1) % T)
    assert torch.equal(other, mixed) == (method == "lora")


@pytest.mark.parametrize("arch", ARCHS)
def test_update_paths_agree_in_scores_and_gradients(arch):
    """The fused (K = T·r) and gather (per-row U_t) layouts compute the same function and gradients."""
    fused = make_model(arch)
    randomize_adapters(fused)
    gather = copy.deepcopy(fused)
    for model, path in ((fused, "fused"), (gather, "gather")):
        for layer in adapter_layers(model).values():
            layer.update_path = path
    ids, mask, tasks = make_batch(fused)
    a, b = fused(ids, mask, tasks), gather(ids, mask, tasks)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    grads = {n: p.grad for n, p in gather.named_parameters() if p.grad is not None}
    for name, p in fused.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lambda_type", ["full", "diagonal"])
def test_gradients_reach_only_adapters_and_head(arch, lambda_type):
    model = make_model(arch, "mtl_lora", lambda_type)
    randomize_adapters(model)
    ids, mask, tasks = make_batch(model)
    model(ids, mask, tasks).pow(2).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif name in trainable:  # the head
            assert "head." in name or "score." in name or "classifier." in name or "pooler." in name, name
        else:
            assert p.grad is None, name
    suffixes = {n.rsplit(".", 1)[1] for n in trainable if is_adapter_param(n)}
    assert suffixes == {"A", "B", "lam", "w"}


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_model_trains_and_tracks_fp32(arch):
    ref = make_model(arch).eval()
    randomize_adapters(ref)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    ids, mask, tasks = make_batch(ref)
    out = low(ids, mask, tasks)
    out.float().pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in low.parameters() if p.grad is not None)
    scale = ref(ids, mask, tasks).abs().max().item() + 1
    torch.testing.assert_close(out.float(), ref(ids, mask, tasks), atol=0.05 * scale, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 parameters under autocast
        auto = ref(ids, mask, tasks)
    torch.testing.assert_close(auto.float(), ref(ids, mask, tasks), atol=0.05 * scale, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lambda_type", ["full", "diagonal"])
def test_trainable_parameter_count_matches_the_formula(arch, method, lambda_type):
    model = make_model(arch, method, lambda_type)
    actual, expected = adapter_param_count(model)
    assert actual == expected
    r, n = 4, (3 if method == "mtl_lora" else 1)
    by_hand = 0
    for layer in adapter_layers(model).values():
        i, o = layer.base_layer.in_features, layer.base_layer.out_features
        lam = T * r * r if lambda_type == "full" else T * r
        by_hand += {"mtl_lora": r * i + lam + n * o * r + T * n, "lora": r * (i + o),
                    "per_task_lora": T * r * (i + o)}[method]
    assert actual == by_hand
    adapter_total = sum(p.numel() for name, p in model.named_parameters() if is_adapter_param(name))
    assert adapter_total == actual


def test_spec_example_count_llama2_7b():
    per_layer = expected_trainable_params(4096, 4096, r=8, num_tasks=8, n_up=3, method="mtl_lora")
    assert 32 * 4 * per_layer == 16_845_824


def test_no_bias_is_added_or_reinitialised():
    llama = make_model("llama")
    for name, layer in adapter_layers(llama).items():
        assert layer.base_layer.bias is None, name
        assert not any(n.endswith("bias") for n, _ in layer.named_parameters()), name
    bert = make_model("bert")
    torch.manual_seed(0)
    from transformers import AutoConfig, AutoModel

    cfg = dict(ARCHS["bert"]["random_config"])
    plain = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    plain_state = plain.state_dict()
    for name, layer in adapter_layers(bert.backbone).items():
        assert torch.equal(layer.base_layer.bias, plain_state[f"{name}.bias"]), name
        assert torch.equal(layer.base_layer.weight, plain_state[f"{name}.weight"]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_task_ids_survive_non_reentrant_checkpointing(arch):
    ref = make_model(arch).train()
    randomize_adapters(ref)
    ids, mask, tasks = make_batch(ref)
    ref(ids, mask, tasks).pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}

    def checkpointed_grads(context: bool):
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        enable_activation_checkpointing(model.backbone, model.router.checkpoint_context if context else None)
        loss = model(ids, mask, tasks).pow(2).sum()
        model.router.task_ids = (tasks + 1) % T  # an interleaved forward set other ids before backward
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    got = checkpointed_grads(context=True)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    # Without the context the recomputation uses the wrong ids: the check above is not vacuous.
    wrong = checkpointed_grads(context=False)
    assert any(not torch.allclose(wrong[n], expected[n], atol=1e-6) for n in expected)


@pytest.mark.parametrize("method", METHODS)
def test_each_layer_owns_its_parameters(method):
    """ZeRO-3 gathers a module's own parameters around its forward: nothing may be shared."""
    model = make_model("llama", method)
    owner: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            assert id(p) not in owner, f"{mod_name}.{p_name} is also {owner[id(p)]}"
            owner[id(p)] = f"{mod_name}.{p_name}"
    for name, layer in adapter_layers(model).items():
        direct = {n for n, _ in layer.named_parameters(recurse=False)}
        assert direct == ({"A", "B", "lam", "w"} if method == "mtl_lora" else {"A", "B"}), name


def test_per_task_lora_tasks_are_independent():
    model = make_model("bert", "per_task_lora")
    randomize_adapters(model)
    ids, mask, _ = make_batch(model)
    model(ids, mask, torch.ones(ids.shape[0], dtype=torch.long)).sum().backward()
    for layer in adapter_layers(model).values():
        r = layer.r
        a_grad = layer.A.grad.view(T, r, -1).abs().sum((1, 2))
        b_grad = layer.B.grad.abs().sum((1, 2))
        assert a_grad[1] > 0 and b_grad[1] > 0
        assert a_grad[0] == 0 and a_grad[2] == 0 and b_grad[0] == 0 and b_grad[2] == 0
