"""The weights of an export: the base once, every scenario's LoRA pair, merged checkpoints, PEFT adapters.

    layers, entries = write_checkpoints(model, tokenizer, task_map, stage, final=out)

    base/                   the frozen base weights (plus the shared trained head), a plain checkpoint
    factors.safetensors     per scenario and adapted layer: A (r, in) and U (out, r), fp32; ΔW = U @ A
    scenarios/<s>/          a plain checkpoint with that scenario's ΔW merged into the weights
    adapters/<s>/           the same pair as a standard PEFT LoRA adapter (scaling 1) over base/

File names and keys: serving.layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernel import storage
from modeling.inject import adapter_layers
from modeling.merge import base_backbone, merged_backbone, save_peft_adapter, save_plain
from serving.layout import ADAPTERS_DIR, BASE_DIR, FACTORS_FILE, SCENARIOS_DIR, factor_key, scenario_dirname

ADAPTER_README = """# {scenario}: a PEFT LoRA adapter of {name}

One scenario of a multi-scenario MTL-LoRA relevance model, as a standard LoRA adapter (scaling 1):
lora_A = A ({r} x in), lora_B = U_t (out x {r}), so that W + lora_B @ lora_A is this scenario's merged weight.

Head weights that travel with this adapter (``modules_to_save``): {heads}. They are the trained relevance
head, shared by every scenario, and equal to those in the base folder.

    from peft import AutoPeftModelForSequenceClassification
    model = AutoPeftModelForSequenceClassification.from_pretrained("{folder}"{trust})
    score = torch.sigmoid(model(**tokenizer(...)).logits[:, 0])

The base is ``base_model_name_or_path`` in adapter_config.json ({base}); the tokenizer and the pair format
are in the export's manifest.json (``input``).
"""


def write_checkpoints(model, tokenizer, task_map, out: Path, final: Path | None = None) -> tuple[list[str], dict]:
    """base/, factors.safetensors, scenarios/<s>/ and adapters/<s>/ under ``out``; returns (layers, entries).
    ``final`` is where ``out`` will be published: the adapters name its base/ folder."""
    layers = adapter_layers(model.backbone)  # names relative to the backbone
    save_plain(model, base_backbone(model), out / BASE_DIR, tokenizer)
    factors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name in task_map.names:
        tid = task_map.id_of(name)
        for layer_name, layer in layers.items():
            a, u = layer.lora_pair(tid, dtype=torch.float32)  # (r, in), (out, r); ΔW = u @ a
            factors[factor_key(tid, layer_name, "A")] = a.contiguous().cpu()
            factors[factor_key(tid, layer_name, "U")] = u.contiguous().cpu()
        sub = scenario_dirname(name, tid)
        save_plain(model, merged_backbone(model, tid), out / SCENARIOS_DIR / sub, tokenizer)
        adapter = save_peft_adapter(model, tid, out / ADAPTERS_DIR / sub,
                                    base_path=str(storage.join(final, BASE_DIR)) if storage.is_uri(final or out)
                                    else str((Path(final or out) / BASE_DIR).resolve()))
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "README.md").write_text(ADAPTER_README.format(
            scenario=name, name="the relevance model", r=config["r"], heads=", ".join(config["modules_to_save"] or []),
            folder=f"{ADAPTERS_DIR}/{sub}", base=config["base_model_name_or_path"],
            trust=", trust_remote_code=True" if model.head is not None else ""))
        entries[name] = {"merged": f"{SCENARIOS_DIR}/{sub}", "adapter": f"{ADAPTERS_DIR}/{sub}"}
    save_file(factors, str(out / FACTORS_FILE))
    return sorted(layers), entries
