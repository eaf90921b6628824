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

import logging

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification

from kernel.config import Config
from kernel.logs import records_dropped
from modeling.base import base_config, drop_gguf_quantizer, gguf_file, resolve_model_path
from modeling.inject import inject_adapters
from modeling.modeling_ads_relevance import masked_mean
from modeling.mtl_lora import TaskRouter

# Parameter-name fragments of the trainable heads of HF sequence-classification models.
HEAD_PARAM_KEYS = ("classifier.", "score.", "pooler.", "head.")
ADAPTER_PARAM_SUFFIXES = (".A", ".B", ".lam", ".w")
TASK_PARAM_SUFFIXES = (".lam", ".w")  # MTL-LoRA's per-scenario Λ_t and mixing logits w_t


def pooled_logits(backbone: nn.Module, pooling: str, head: nn.Module | None, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The relevance logit (batch,) float32 of ``backbone`` pooled as ``pooling`` says: the one pooling
    dispatch of training (RelevanceModel) and serving (a merged backbone, serving.scoring.model)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    if pooling == "mean":
        hidden = backbone(**kwargs).last_hidden_state  # (b, L, d)
        pooled = masked_mean(hidden, attention_mask)
        weight = getattr(head, "weight", None)  # a bf16 head over an encoder whose last states are fp32
        return head(pooled.to(weight.dtype) if weight is not None else pooled).squeeze(-1).float()
    return backbone(**kwargs).logits.squeeze(-1).float()


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
        return pooled_logits(self.backbone, self.pooling, self.head, input_ids, attention_mask, token_type_ids)

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


def build_model(cfg: Config, num_tasks: int, dtype: torch.dtype = torch.float32, *,
                trained_weights_follow: bool = False) -> RelevanceModel:
    """Load (or randomly build) the base, freeze it, inject adapters, unfreeze adapters and head.
    ``trained_weights_follow``: the caller loads a trained model's adapters and head over it next, so a head
    missing from the base checkpoint is no news (a DEBUG line, not INFO)."""
    hf = base_config(cfg)
    pooling = cfg.model.pooling
    if cfg.model.init == "random":
        torch.manual_seed(cfg.train.seed)
        backbone = (AutoModel if pooling == "mean" else AutoModelForSequenceClassification).from_config(hf)
    else:
        cls = AutoModel if pooling == "mean" else AutoModelForSequenceClassification
        backbone = drop_gguf_quantizer(load_pretrained(cls, resolve_model_path(cfg.model.path), hf, gguf_file(cfg),
                                                       trained_head_follows=trained_weights_follow))
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


log = logging.getLogger(__name__)
HF_LOADER_LOGGER = "transformers.modeling_utils"  # where from_pretrained logs its multi-line LOAD REPORT


def load_pretrained(cls, path, hf, gguf: str | None, trained_head_follows: bool = False) -> nn.Module:
    """``cls.from_pretrained`` with its load report in one line: a head that the checkpoint lacks (a sentence
    encoder under a classification head) is expected and trains, so it is INFO (DEBUG where the trained head
    is loaded over it next); any other missing or unexpected weight is a WARNING that names them."""
    with records_dropped(HF_LOADER_LOGGER, "LOAD REPORT"):
        backbone, info = cls.from_pretrained(path, config=hf, gguf_file=gguf, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    heads = [k for k in missing if any(h in k for h in HEAD_PARAM_KEYS)]
    others, unexpected = [k for k in missing if k not in heads], sorted(info.get("unexpected_keys") or [])
    if heads and trained_head_follows:
        log.debug(f"base {path}: {len(heads)} head weights not in the checkpoint; the trained model's replace them: "
                  + ", ".join(heads))
    elif heads:
        log.info(f"base {path}: {len(heads)} head weights not in the checkpoint, newly initialised (they train): "
                 + ", ".join(heads))
    if others or unexpected:
        log.warning(f"base {path}: " + "; ".join(
            f"{what} {', '.join(keys[:8])}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"
            for what, keys in (("missing (newly initialised)", others), ("unused", unexpected)) if keys))
    return backbone


def _is_hf_head(name: str) -> bool:
    return name.startswith("backbone.") and any(k in name for k in HEAD_PARAM_KEYS)
