"""One model in memory that scores every scenario with that scenario's merged weights.

    sm = ScoringModel.load(export_dir, dtype=torch.float32)
    sm.use("computers")                       # adapted weights become W0 + U_t A_t
    logits = sm.logits(input_ids, attention_mask, token_type_ids)    # (batch,) float32

The compact artifact keeps the base weights once and per scenario a LoRA pair per adapted layer, so
holding T scenarios costs one model plus T·Σ r·(in+out) numbers, not T models. ``use`` folds one scenario's
update into the live weights: ΔW = U @ A is computed in fp32 from the stored factors and added to a kept
copy of W0 (never to the previous merged weight, so switching many times accumulates no rounding), then
cast to the run dtype. A switch costs one (out, r) @ (r, in) product per adapted layer; callers group a
chunk of rows by scenario so switches stay rare.

Where the export folder comes from (a path, or the model registry) is ``serving.registry.cache``. The
pooling after the backbone is training's own (``modeling.model.pooled_logits``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from kernel.errors import DataError, UnknownScenario
from kernel.task_map import TaskMap
from modeling.inject import adapter_layers
from modeling.merge import base_backbone
from modeling.model import pooled_logits
from modeling.modeling_ads_relevance import MeanPoolRelevanceModel
from serving.layout import BASE_DIR, FACTORS_FILE, factor_key, read_manifest, read_task_map


def load_plain(model_dir: str | Path, pooling: str, dtype: torch.dtype = torch.float32):
    """(backbone, head) of a plain checkpoint (base/ or scenarios/<s>/); head None for cls/last pooling."""
    from transformers import AutoModelForSequenceClassification

    d = Path(model_dir)
    if pooling == "mean":  # the class itself: no remote code is executed
        wrapped = MeanPoolRelevanceModel.from_pretrained(d, dtype=dtype).eval()
        return wrapped.backbone, wrapped.head
    return AutoModelForSequenceClassification.from_pretrained(d, dtype=dtype).eval(), None


class ScoringModel:
    """Base weights once + each scenario's low-rank factors; switches merged weights per scenario.

    Args:
        backbone: a plain transformers model holding the base weights, already in the run dtype.
        head: the mean-pooling head (None for cls/last pooling).
        pooling: "mean", "cls" or "last", as trained.
        pairs: scenario -> adapted layer name (relative to ``backbone``) -> (A (r, in), U (out, r)), in
            task-id order; ΔW = U @ A.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None, pooling: str,
                 pairs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], device: str | None = None,
                 manifest: dict | None = None):
        self.manifest = manifest or {}
        self.pooling = pooling
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone = backbone.eval().to(self.device)
        self.head = head.eval().to(self.device) if head is not None else None
        self.dtype = next(backbone.parameters()).dtype
        self._layers: dict[str, nn.Linear] = {}
        self._w0: dict[str, torch.Tensor] = {}  # the unmerged weights, kept once in the run dtype
        layer_names = next(iter(pairs.values())).keys() if pairs else []
        for layer in layer_names:
            module = self.backbone.get_submodule(layer)
            if not isinstance(module, nn.Linear):
                raise DataError(f"adapted layer {layer} is not a linear layer of the base model")
            self._layers[layer] = module
            self._w0[layer] = module.weight.detach().clone()
        self._pairs = {name: {layer: (a.float().to(self.device), u.float().to(self.device))
                              for layer, (a, u) in layers.items()} for name, layers in pairs.items()}
        self.current: str | None = None
        self.task_map = TaskMap(list(pairs))  # scenario -> task id, in the order the pairs were given

    @classmethod
    def load(cls, export_dir: str | Path, dtype: torch.dtype = torch.float32,
             device: str | None = None) -> "ScoringModel":
        """From an export folder: base/ (plain checkpoint + head) and factors.safetensors."""
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        backbone, head = load_plain(export_dir / BASE_DIR, manifest["pooling"], dtype)
        factors = load_file(str(export_dir / FACTORS_FILE))
        pairs = {}
        task_map = read_task_map(export_dir)
        for name in task_map.names:
            tid, layers = task_map.id_of(name), {}
            for layer in manifest["adapted_layers"]:
                a, u = factor_key(tid, layer, "A"), factor_key(tid, layer, "U")
                if a not in factors or u not in factors:
                    raise DataError(f"{export_dir / FACTORS_FILE}: factors of scenario {name!r}, layer {layer} "
                                    "are missing")
                layers[layer] = (factors[a], factors[u])
            pairs[name] = layers
        model = cls(backbone, head, manifest["pooling"], pairs, device, manifest)
        model.task_map = task_map  # the export's copy of ingestion's file (pairs were built in its order)
        return model

    @classmethod
    def from_trained(cls, model: nn.Module, scenarios: list[str], device: str | None = None) -> "ScoringModel":
        """From an in-memory RelevanceModel (no files): its base weights and each task's LoRA pairs."""
        import copy


        layers = adapter_layers(model.backbone)
        pairs = {name: {ln: layer.lora_pair(t, dtype=torch.float32) for ln, layer in layers.items()}
                 for t, name in enumerate(scenarios)}
        head = copy.deepcopy(model.head) if model.head is not None else None
        return cls(base_backbone(model), head, model.pooling, pairs, device)

    @property
    def scenarios(self) -> list[str]:
        """Scenario names in task-id order."""
        return self.task_map.names

    @torch.no_grad()
    def use(self, scenario: str) -> None:
        """Make every adapted layer hold W0 + U_t A_t for ``scenario`` (no-op if already current)."""
        if scenario == self.current:
            return
        if scenario not in self._pairs:
            raise UnknownScenario(f"scenario {scenario!r} is not one of the exported scenarios {self.scenarios}")
        for layer, module in self._layers.items():
            a, u = self._pairs[scenario][layer]
            # W0 + U A in fp32 by one fused GEMM, cast to the run dtype by the copy: 2-3 kernels a layer.
            module.weight.copy_(torch.addmm(self._w0[layer].float(), u, a))
        self.current = scenario

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch,) float32 of the current scenario's merged model."""
        if self.current is None:
            raise RuntimeError("call use(scenario) before logits()")
        dev = self.device
        tt = token_type_ids.to(dev) if token_type_ids is not None else None
        return pooled_logits(self.backbone, self.pooling, self.head, input_ids.to(dev), attention_mask.to(dev), tt)
