r"""Put MTL-LoRA layers into any Hugging Face transformer, by target-module names or patterns.

    router, replaced = inject_adapters(model, AdapterConfig(targets=["q_proj", "v_proj"]), num_tasks=4)

A target is either a module-name suffix taken at dot boundaries (``query`` and ``self.query`` match
``encoder.layer.0.attention.self.query``; ``layer.1.attention.self.query`` does not match layer 11), or,
when it holds any of ``*+?[](){}|^$\``, a regular expression searched in the full name
(``r"layer\.[0-5]\..*query$"``). Presets (``TARGET_PRESETS``) expand to lists. A target that matches no
``nn.Linear`` raises ``ConfigError`` listing the linear layers the model has. Base layers are frozen,
keep their own bias (none is added) and are not re-initialised.
"""
from __future__ import annotations

import re

from torch import nn

from kernel.config import AdapterConfig
from kernel.errors import ConfigError
from modeling.mtl_lora import MTLLoRALinear, TaskRouter, expected_trainable_params

# Common presets, so configs can say "bert_all" instead of listing names.
TARGET_PRESETS = {
    "bert_attention": ["query", "key", "value", "attention.output.dense"],
    "bert_all": ["query", "key", "value", "attention.output.dense", "intermediate.dense", r"output\.dense$"],
    "llama_attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "llama_all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

_REGEX_CHARS = set("*+?[](){}|^$\\")


def _matches(name: str, target: str) -> bool:
    if _REGEX_CHARS & set(target):
        return re.search(target, name) is not None
    return name == target or name.endswith("." + target)


def _check_patterns(targets: list[str]) -> None:
    bad = []
    for t in targets:
        if _REGEX_CHARS & set(t):
            try:
                re.compile(t)
            except re.error as e:
                bad.append(f"{t!r} ({e})")
    if bad:
        raise ConfigError(f"adapter.targets: invalid regular expressions {', '.join(bad)}")


def expand_targets(targets: list[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        out.extend(TARGET_PRESETS.get(t, [t]))
    return out


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` layers, leaving out those already wrapped by an adapter."""
    wrapped = {n + ".base_layer" for n, m in model.named_modules() if isinstance(m, MTLLoRALinear)}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wrapped]


def inject_adapters(
    model: nn.Module, cfg: AdapterConfig, num_tasks: int, router: TaskRouter | None = None
) -> tuple[TaskRouter, list[str]]:
    """Replace every matching ``nn.Linear`` by an ``MTLLoRALinear``; return the router and the names.

    Every other parameter of ``model`` is left as it is (callers freeze the base themselves).
    """
    router = router or TaskRouter(num_tasks)
    if router.num_tasks is None:
        router.num_tasks = num_tasks
    targets = expand_targets(cfg.targets)
    _check_patterns(targets)
    linear = _linear_names(model)
    unmatched = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if unmatched:
        shapes = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in linear})
        raise ConfigError(
            f"adapter.targets {unmatched} match no linear layer of {type(model).__name__}; "
            f"its linear layers are: {', '.join(shapes)}"
        )
    replaced = [n for n in linear if any(_matches(n, t) for t in targets)]
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = MTLLoRALinear(
            base,
            num_tasks=num_tasks,
            router=router,
            method=cfg.method,
            r=cfg.r,
            alpha=cfg.alpha,
            n_up=cfg.n_up,
            tau=cfg.tau,
            dropout=cfg.dropout,
            lambda_type=cfg.lambda_type,
            w_init_scale=cfg.w_init_scale,
        )
        setattr(parent, child, layer)
    return router, replaced


def adapter_layers(model: nn.Module) -> dict[str, MTLLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MTLLoRALinear)}


def adapter_param_count(model: nn.Module) -> tuple[int, int]:
    """(counted from the parameters, expected from the spec's formula) over every adapted layer."""
    actual = expected = 0
    for layer in adapter_layers(model).values():
        actual += sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer."))
        expected += expected_trainable_params(
            layer.base_layer.in_features,
            layer.base_layer.out_features,
            layer.r,
            layer.num_tasks,
            layer.n_up,
            layer.method,
            layer.lambda_type,
        )
    return actual, expected
