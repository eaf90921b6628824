"""Masked mean pooling + a linear head over any transformers encoder, as a transformers model.

Exported mean-pooling checkpoints (``<export>/base/``, ``<export>/scenarios/<s>/``) carry a copy of this file;
their ``config.json`` names it in ``auto_map``, so the usual Auto classes load them whole::

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    score = torch.sigmoid(model(**tokenizer(...)).logits[:, 0])

Without ``trust_remote_code=True`` transformers refuses to load the folder (its model type is not a built-in
one), rather than loading the encoder with a randomly initialised classifier as it would for a plain BERT
folder. The project itself loads the class directly (no remote code involved), and its training model pools
with ``masked_mean`` from here: one implementation of the pooling for training, export and scoring.

This file imports only torch and transformers, so that it runs wherever the checkpoint is loaded.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real tokens: (b, L, d) and (b, L) -> (b, d); a row of no tokens gives 0."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MeanPoolRelevanceConfig(PretrainedConfig):
    """``encoder``: the wrapped model's own config as a dict (with its ``model_type``)."""

    model_type = "ads_relevance_mean_pool"

    def __init__(self, encoder: dict | None = None, **kwargs):
        self.encoder = dict(encoder or {})
        super().__init__(**kwargs)


class MeanPoolRelevanceModel(PreTrainedModel):
    """logits (b, 1) = head(masked_mean(backbone(...).last_hidden_state)); weights ``backbone.*``, ``head.*``."""

    config_class = MeanPoolRelevanceConfig
    base_model_prefix = "backbone"

    def __init__(self, config: MeanPoolRelevanceConfig):
        super().__init__(config)
        encoder = dict(config.encoder)
        self.backbone = AutoModel.from_config(AutoConfig.for_model(encoder.pop("model_type"), **encoder))
        self.head = nn.Linear(self.backbone.config.hidden_size, 1)
        self.post_init()

    @classmethod
    def wrap(cls, backbone: nn.Module, head: nn.Linear) -> "MeanPoolRelevanceModel":
        """Around existing modules (their weights are used as they are; nothing is copied)."""
        config = MeanPoolRelevanceConfig(encoder=backbone.config.to_dict())
        with torch.device("meta"):  # placeholders only: replaced just below
            model = cls(config)
        model.backbone, model.head = backbone, head
        return model

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return SequenceClassifierOutput(logits=self.head(masked_mean(hidden, attention_mask)))
