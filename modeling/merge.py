"""Per-scenario export of an MTL-LoRA model: merged weights, or a standard LoRA adapter for PEFT.

For scenario t each adapted layer's update is a rank-≤r matrix ΔW_t = U_t A_t (out × in) with
U_t = s·B̃_t·Λ_t (out × r), so one scenario can be served at exactly the base model's cost, and
(A_t, U_t) is an ordinary LoRA pair with scaling 1 that existing LoRA tooling loads.

    backbone = merged_backbone(model, task=2)   # plain HF model, every adapted W replaced by W + ΔW_2
    base = base_backbone(model)                 # plain HF model without adapters (trained HF head kept)
    save_peft_adapter(model, 2, out_dir)        # adapter_config.json + adapter_model.safetensors
    # base.save_pretrained(base_dir); PeftModel.from_pretrained(AutoModel*.from_pretrained(base_dir), out_dir)

``save_plain(model, backbone, out_dir, tokenizer)`` writes a loadable checkpoint of a plain backbone: the
backbone itself for cls/last pooling (its sequence-classification head lives inside), or for mean pooling
(the head ``model.head`` lives outside the backbone) a ``MeanPoolRelevanceModel`` around backbone and head,
with its code beside it (``modeling.modeling_ads_relevance``), so that the Auto classes load it whole or
refuse. Under DeepSpeed ZeRO-3 gather the parameters first (``deepspeed.zero.GatheredParameters``). The
export stage that writes every scenario of a trained model is ``python -m serving.export``; this module is
the library it calls.
"""
from __future__ import annotations

import copy
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kernel.atomic import atomic_path, write_json_atomic
from kernel.errors import RelevanceError, TrainingDiverged, UnknownScenario
from modeling import modeling_ads_relevance
from modeling.inject import adapter_layers
from modeling.model import RelevanceModel
from modeling.mtl_lora import MTLLoRALinear, TaskRouter

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
REMOTE_CODE_FILE = Path(modeling_ads_relevance.__file__).name
AUTO_MAP = {auto: f"{REMOTE_CODE_FILE[:-3]}.{cls}" for auto, cls in (
    ("AutoConfig", "MeanPoolRelevanceConfig"), ("AutoModel", "MeanPoolRelevanceModel"),
    ("AutoModelForSequenceClassification", "MeanPoolRelevanceModel"))}


def _layers(model: RelevanceModel, task: int | None) -> dict[str, MTLLoRALinear]:
    layers = adapter_layers(model.backbone)
    if not layers:
        raise RelevanceError(f"{type(model.backbone).__name__} has no MTL-LoRA layers to export")
    num_tasks = next(iter(layers.values())).num_tasks
    if task is not None and not 0 <= task < num_tasks:
        raise UnknownScenario(f"task {task} is not one of the model's {num_tasks} tasks [0, {num_tasks})")
    return layers


def _swap_adapters(backbone: nn.Module, make) -> nn.Module:
    """Deep copy of ``backbone`` with each MTLLoRALinear replaced by ``make(name, layer)``."""
    out = copy.deepcopy(backbone)
    for name, layer in adapter_layers(out).items():
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, make(name, layer))
    return out


def base_backbone(model: RelevanceModel) -> nn.Module:
    """A deep copy of the backbone without adapters: the base weights (and any trained HF head)."""
    _layers(model, None)
    return _swap_adapters(model.backbone, lambda name, layer: layer.base_layer)


def merged_backbone(model: RelevanceModel, task: int) -> nn.Module:
    """A deep copy of the backbone whose adapted layers are plain ``nn.Linear`` with W + ΔW_task.

    ΔW is computed in fp32 and added once, then cast to the base dtype; the bias is kept as is.
    Raises TrainingDiverged naming the layer when a merged weight is not finite.
    """
    _layers(model, task)

    def merge(name: str, layer: MTLLoRALinear) -> nn.Linear:
        base = layer.base_layer
        with torch.no_grad():
            weight = base.weight.float() + layer.delta_weight(task, dtype=torch.float32)
            if not torch.isfinite(weight).all():
                raise TrainingDiverged(f"merging task {task} into {name} gives non-finite weights")
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                               device=base.weight.device, dtype=base.weight.dtype)
            merged.weight.copy_(weight)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        return merged

    return _swap_adapters(model.backbone, merge)


def merged_model(model: RelevanceModel, task: int) -> RelevanceModel:
    """A RelevanceModel for one scenario: merged backbone, a copy of the head; task ids are ignored."""
    head = copy.deepcopy(model.head) if model.head is not None else None
    return RelevanceModel(merged_backbone(model, task), model.pooling, TaskRouter(), head)


def plain_module_prefix(model: RelevanceModel) -> str:
    """Where the backbone's modules sit inside a plain checkpoint: "" (cls/last), "backbone." (mean)."""
    return "backbone." if model.head is not None else ""


def head_modules(model: RelevanceModel) -> dict[str, torch.Tensor]:
    """The trained head's weights by their names in the plain checkpoint (``classifier.weight``,
    ``bert.pooler.dense.weight``, ``score.weight``, ``head.bias``, ...): everything trained but the adapters."""
    prefix = plain_module_prefix(model)
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and not name.endswith((".A", ".B", ".lam", ".w")):
            plain = name.removeprefix("backbone.") if model.head is None else name.replace("backbone.", prefix, 1)
            out[plain] = p
    return out


def peft_lora_state(model: RelevanceModel, task: int, base_path: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One scenario as a PEFT LoRA adapter: (adapter_config dict, state dict in PEFT's key naming).

    lora_A = A_t (r, in), lora_B = U_t (out, r) (ΔW_t = lora_B @ lora_A), lora_alpha == r so PEFT's
    scaling is 1. ``target_modules`` lists the adapted modules' full names relative to the plain
    checkpoint's model (``plain_module_prefix``). The trained head (shared by every scenario) travels with
    each adapter as ``modules_to_save``, so the adapter is a whole sequence classifier over the untouched
    base: ``task_type`` SEQ_CLS, and ``base_model_name_or_path`` names the export's ``base/`` folder, so that
    ``AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)`` loads it by name.
    """
    prefix = plain_module_prefix(model)
    layers = {prefix + n: layer for n, layer in _layers(model, task).items()}
    state: dict[str, torch.Tensor] = {}
    heads = head_modules(model)
    for name, p in heads.items():
        state[f"base_model.model.{name}"] = p.detach().contiguous().cpu()
    # PEFT matches modules_to_save by module-name suffix: the modules that own those weights.
    head_owners = sorted({name.rsplit(".", 1)[0] for name in heads})
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        a, up = layer.lora_pair(task, dtype=torch.float32)  # built in fp32, stored in the base dtype
        dtype = layer.base_layer.weight.dtype
        state[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = up.to(dtype).contiguous().cpu()
        ranks[name] = layer.r
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {n: k for n, k in ranks.items() if k != r}  # only if layers ever differ in rank
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": head_owners or None,
        "inference_mode": True,
    }
    return config, state


def save_peft_adapter(model: RelevanceModel, task: int, out_dir: Path, base_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for one scenario; return out_dir."""
    config, state = peft_lora_state(model, task, base_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PEFT_WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(out / PEFT_CONFIG_FILE, config)
    return out


def plain_checkpoint_model(model: RelevanceModel, backbone: nn.Module) -> nn.Module:
    """What a plain checkpoint of ``backbone`` holds: the backbone itself (cls/last pooling), or a
    ``MeanPoolRelevanceModel`` around it and a copy of ``model.head`` (mean pooling)."""
    if model.head is None:
        return backbone
    wrapped = modeling_ads_relevance.MeanPoolRelevanceModel.wrap(backbone, copy.deepcopy(model.head))
    wrapped.config.auto_map = dict(AUTO_MAP)
    return wrapped


def save_plain(model: RelevanceModel, backbone: nn.Module, out_dir: Path, tokenizer=None) -> Path:
    """A checkpoint that ``AutoModelForSequenceClassification.from_pretrained`` loads whole (mean pooling:
    with ``trust_remote_code=True``; without it transformers refuses instead of guessing a head)."""
    out = Path(out_dir)
    plain = plain_checkpoint_model(model, backbone)
    plain.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if plain is not backbone:
        shutil.copyfile(modeling_ads_relevance.__file__, out / REMOTE_CODE_FILE)
    return out
