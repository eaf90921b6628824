"""Injection into Hugging Face models: by names, suffixes, presets and regular expressions."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from kernel.config import AdapterConfig
from kernel.errors import ConfigError
from modeling.inject import adapter_layers, adapter_param_count, inject_adapters
from modeling.mtl_lora import MTLLoRALinear
from tests.shared import BERT, LLAMA


def hf_model(spec: dict, seq_cls: bool = False, **overrides) -> nn.Module:
    kw = {**spec, **overrides}
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    cfg.num_labels = 1
    torch.manual_seed(0)
    return (AutoModelForSequenceClassification if seq_cls else AutoModel).from_config(cfg)


def test_bert_attention_names():
    model = hf_model(BERT)
    cfg = AdapterConfig(targets=["query", "key", "value", "attention.output.dense"])
    router, replaced = inject_adapters(model, cfg, 3)
    expected = [f"encoder.layer.{i}.attention.{s}" for i in range(2)
                for s in ("self.query", "self.key", "self.value", "output.dense")]
    assert sorted(replaced) == sorted(expected)
    assert set(adapter_layers(model)) == set(expected)
    assert all(isinstance(model.get_submodule(n), MTLLoRALinear) for n in expected)
    assert router.num_tasks == 3
    # The FFN's output.dense and the pooler stay plain linear layers.
    assert isinstance(model.get_submodule("encoder.layer.0.output.dense"), nn.Linear)
    assert isinstance(model.get_submodule("pooler.dense"), nn.Linear)


def test_llama_projections_and_presets():
    model = hf_model(LLAMA, seq_cls=True)
    _, replaced = inject_adapters(model, AdapterConfig(targets=["llama_all"]), 4)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = [n for n, m in hf_model(LLAMA, seq_cls=True).named_modules()
                if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in projections]
    assert sorted(replaced) == sorted(expected) and len(expected) == 14
    assert isinstance(model.score, nn.Linear)  # the head is never adapted by these targets
    for name in expected:
        assert model.get_submodule(name).base_layer.bias is None


def test_bert_all_preset_covers_attention_and_ffn():
    model = hf_model(BERT)
    _, replaced = inject_adapters(model, AdapterConfig(targets=["bert_all"]), 2)
    per_layer = {n.split(".", 3)[3] for n in replaced}
    assert per_layer == {"attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense"}
    assert len(replaced) == 12


def test_dotted_suffix_matches_at_module_boundaries_only():
    model = hf_model(LLAMA, num_hidden_layers=12)
    _, replaced = inject_adapters(model, AdapterConfig(targets=["layers.1.self_attn.q_proj"]), 2)
    assert replaced == ["layers.1.self_attn.q_proj"]  # not layers.11


def test_regular_expression_targets():
    model = hf_model(BERT)
    _, replaced = inject_adapters(model, AdapterConfig(targets=[r"layer\.0\..*(query|value)$"]), 2)
    assert sorted(replaced) == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]


def test_unmatched_target_lists_the_available_linear_layers():
    model = hf_model(BERT)
    with pytest.raises(ConfigError) as err:
        inject_adapters(model, AdapterConfig(targets=["query", "q_proj"]), 2)
    msg = str(err.value)
    assert "['q_proj']" in msg and "BertModel" in msg
    for name in ("encoder.layer.N.attention.self.query", "encoder.layer.N.intermediate.dense", "pooler.dense"):
        assert name in msg
    assert not adapter_layers(model)  # nothing was half-injected


def test_invalid_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid regular expressions"):
        inject_adapters(hf_model(BERT), AdapterConfig(targets=["query(["]), 2)


def test_injecting_twice_never_wraps_a_wrapped_layer():
    model = hf_model(LLAMA)
    inject_adapters(model, AdapterConfig(targets=["q_proj"]), 2)
    with pytest.raises(ConfigError, match="q_proj"):
        inject_adapters(model, AdapterConfig(targets=["q_proj"]), 2)
    _, replaced = inject_adapters(model, AdapterConfig(targets=[r"proj$"]), 2)  # a regex skips base_layer
    assert not any("base_layer" in n for n in replaced) and not any(n.endswith("q_proj") for n in replaced)


@pytest.mark.parametrize("method", ["mtl_lora", "lora", "per_task_lora"])
def test_config_switch_selects_the_method_and_the_count_matches(method):
    model = hf_model(LLAMA)
    cfg = AdapterConfig(method=method, targets=["llama_attention"], r=4, n_up=2)
    inject_adapters(model, cfg, 5)
    layers = adapter_layers(model)
    assert {layer.method for layer in layers.values()} == {method}
    actual, expected = adapter_param_count(model)
    assert actual == expected
    # q, o: 32 -> 32; k, v: 32 -> 16 (2 kv heads of 8), in each of 2 layers.
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32)] * 2
    per = {"mtl_lora": lambda i, o: 4 * i + 5 * 16 + 2 * o * 4 + 5 * 2,
           "lora": lambda i, o: 4 * (i + o),
           "per_task_lora": lambda i, o: 5 * 4 * (i + o)}[method]
    assert actual == sum(per(i, o) for i, o in shapes)
