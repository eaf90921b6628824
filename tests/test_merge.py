"""Per-scenario export: merged == unmerged, plain HF checkpoints, and PEFT loading the LoRA export.

Every pooling variant is covered: BERT with its own sequence-classification head (cls), a LLaMA
sequence classifier (last token), and BERT with mean pooling and our own head outside the backbone.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from kernel.errors import TrainingDiverged, UnknownScenario
from modeling.inject import adapter_layers
from modeling.merge import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    base_backbone,
    merged_backbone,
    merged_model,
    peft_lora_state,
    save_peft_adapter,
    save_plain,
)
from modeling.mtl_lora import MTLLoRALinear
from tests.shared import BERT, LLAMA, padded_batch, tiny_adapted_model

T = 3
CASES = {  # name: (random_config, pooling, targets)
    "bert_cls": (BERT, "cls", ["bert_all"]),
    "bert_mean": (BERT, "mean", ["query", "key", "value", "attention.output.dense"]),
    "llama_last": (LLAMA, "last", ["llama_all"]),
}


def trained_like(case: str, method: str = "mtl_lora", lambda_type: str = "full", dtype=torch.float32):
    """A tiny model whose adapters and head hold random values, as if trained."""
    spec, pooling, targets = CASES[case]
    model = tiny_adapted_model(spec, pooling, targets, T, dtype=dtype, method=method, lambda_type=lambda_type, r=4,
                               n_up=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # adapters and head
                p.add_(0.15 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model.eval()


def batch(model):
    return padded_batch(model, rows=6, length=9, min_length=3)


def scenario_scores(model, ids, mask, task):
    with torch.no_grad():
        return model(ids, mask, torch.full((ids.shape[0],), task, dtype=torch.long))


@pytest.mark.parametrize("case,method,lambda_type", [
    *[(case, "mtl_lora", "full") for case in CASES],
    ("llama_last", "mtl_lora", "diagonal"), ("bert_cls", "lora", "full"), ("bert_cls", "per_task_lora", "full"),
])
def test_merged_equals_unmerged_per_scenario(case, method, lambda_type):
    model = trained_like(case, method, lambda_type)
    ids, mask = batch(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    outputs = []
    for t in range(T):
        merged = merged_model(model, t)
        assert not adapter_layers(merged)
        got = scenario_scores(merged, ids, mask, t)
        torch.testing.assert_close(got, scenario_scores(model, ids, mask, t), atol=1e-5, rtol=1e-5)
        outputs.append(got)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # the source is untouched
    distinct = not torch.allclose(outputs[0], outputs[1])
    assert distinct == (method != "lora")


def test_merged_backbone_is_a_plain_checkpoint_that_reloads(tmp_path):
    model = trained_like("llama_last")
    ids, mask = batch(model)
    merged = merged_backbone(model, 2)
    assert isinstance(merged, PreTrainedModel)
    assert not any(isinstance(m, MTLLoRALinear) for m in merged.modules())
    for name, layer in adapter_layers(model.backbone).items():
        plain = merged.get_submodule(name)
        assert type(plain) is torch.nn.Linear and plain.bias is None  # no bias appears
        expected = layer.base_layer.weight + layer.delta_weight(2)
        torch.testing.assert_close(plain.weight, expected, atol=1e-6, rtol=1e-6)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(got, scenario_scores(model, ids, mask, 2), atol=1e-5, rtol=1e-5)


def test_merging_keeps_base_biases_and_the_head():
    model = trained_like("bert_cls")
    merged = merged_backbone(model, 0)
    for name, layer in adapter_layers(model.backbone).items():
        assert torch.equal(merged.get_submodule(name).bias, layer.base_layer.bias), name
    assert torch.equal(merged.classifier.weight, model.backbone.classifier.weight)
    base = base_backbone(model)
    for name, layer in adapter_layers(model.backbone).items():
        assert torch.equal(base.get_submodule(name).weight, layer.base_layer.weight), name


@pytest.mark.parametrize("case,method", [*[(case, "mtl_lora") for case in CASES], ("llama_last", "per_task_lora")])
def test_peft_loads_each_scenario_and_scores_like_mtl_lora(case, method, tmp_path):
    model = trained_like(case, method)
    ids, mask = batch(model)
    save_plain(model, base_backbone(model), tmp_path / "base")
    remote = model.pooling == "mean"  # mean-pooling checkpoints carry their model code
    for t in range(T):
        adapter_dir = save_peft_adapter(model, t, tmp_path / f"adapter_{t}", base_path=str(tmp_path / "base"))
        assert sorted(p.name for p in adapter_dir.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
        base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", trust_remote_code=remote)
        # Over a base given explicitly, and by name: base_model_name_or_path and task_type say everything.
        by_name = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, trust_remote_code=remote)
        for peft_model in (PeftModel.from_pretrained(base, adapter_dir).eval(), by_name.eval()):
            with torch.no_grad():
                got = peft_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            torch.testing.assert_close(got, scenario_scores(model, ids, mask, t), atol=1e-5, rtol=1e-5)


def test_peft_state_naming_and_config():
    model = trained_like("bert_cls")
    config, state = peft_lora_state(model, 1)
    layers = adapter_layers(model.backbone)
    assert config["target_modules"] == sorted(layers)
    assert config["r"] == config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    json.dumps(config)  # serialisable as adapter_config.json
    heads = sorted(k for k in state if ".lora_" not in k)  # the trained head travels with each adapter
    assert len(state) == 2 * len(layers) + len(heads)
    assert heads == ["base_model.model.bert.pooler.dense.bias", "base_model.model.bert.pooler.dense.weight",
                     "base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    for name, layer in layers.items():
        a = state[f"base_model.model.{name}.lora_A.weight"]
        u = state[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (4, layer.base_layer.in_features) and u.shape == (layer.base_layer.out_features, 4)
        torch.testing.assert_close(u @ a, layer.delta_weight(1), atol=1e-6, rtol=1e-6)


def test_bf16_merge_tracks_the_unmerged_model():
    model = trained_like("llama_last", dtype=torch.bfloat16)
    ids, mask = batch(model)
    merged = merged_model(model, 1)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    ref = scenario_scores(model, ids, mask, 1)
    scale = ref.abs().max().item() + 1
    torch.testing.assert_close(scenario_scores(merged, ids, mask, 1), ref, atol=0.03 * scale, rtol=0)


def test_export_errors_name_the_problem():
    model = trained_like("bert_mean")
    with pytest.raises(UnknownScenario, match="task 3"):
        merged_backbone(model, 3)
    with pytest.raises(UnknownScenario):
        peft_lora_state(model, -1)
    broken = copy.deepcopy(model)
    name, layer = next(iter(adapter_layers(broken.backbone).items()))
    with torch.no_grad():
        layer.B.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=name):
        merged_backbone(broken, 0)
