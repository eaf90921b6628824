"""Loading a configuration: YAML, then dotted ``key=value`` overrides, type-checked against the schema
(``kernel.config.schema``) with every problem reported at once; and the config back out (YAML, flat MLflow
params, a dict).

    cfg = load_config("configs/demo.yaml", ["train.max_steps=50", "adapter.r=4"])
    config_from_dict({"train": {"lr": 3e-4}}); dump_config(cfg, "resolved.yaml"); flat_params(cfg)
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from kernel.config.schema import Config
from kernel.errors import ConfigError


def _check_value(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__}")
            return tp()
        return _build(tp, value, key, errors)
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, key, errors)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {type(value).__name__}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__}")
            return {}
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        errors.append(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            errors.append(f"{prefix + '.' if prefix else ''}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & data.keys():
        kwargs[name] = _check_value(data[name], hints[name], f"{prefix + '.' if prefix else ''}{name}", errors)
    return cls(**kwargs)


def _validate(cfg: Config, errors: list[str]) -> None:
    """Cross-field checks that types alone cannot express."""
    c = cfg.data.columns
    sources = [(k, getattr(c, k)) for k in ("scenario", "scenario_from_partition", "scenario_constant")
               if getattr(c, k)]
    if not sources:
        errors.append("data.columns: no scenario source; set one of scenario (a column), "
                      "scenario_from_partition (a hive key such as market) or scenario_constant (one name)")
    elif len(sources) > 1:
        got = " and ".join(f"{k}={v!r}" for k, v in sources)
        unset = " or ".join(f"data.columns.{k}: null" for k, _ in sources)
        errors.append("data.columns: set exactly one of scenario, scenario_from_partition, scenario_constant; "
                      f"got {got}: unset one ({unset})")
    s = cfg.data.split
    if not (0 <= s.valid_fraction < 1 and 0 <= s.test_fraction < 1 and s.valid_fraction + s.test_fraction < 1):
        errors.append("data.split: valid_fraction and test_fraction must be in [0, 1) and sum below 1")
    if len(set(cfg.data.scenarios)) != len(cfg.data.scenarios):
        errors.append("data.scenarios: duplicate scenario names")
    a = cfg.adapter
    for name, value in (("r", a.r), ("n_up", a.n_up)):
        if value < 1:
            errors.append(f"adapter.{name}: must be >= 1, got {value}")
    if a.tau <= 0:
        errors.append(f"adapter.tau: must be > 0, got {a.tau}")
    if a.w_init_scale < 0:
        errors.append(f"adapter.w_init_scale: must be >= 0, got {a.w_init_scale}")
    if not 0 <= a.dropout < 1:
        errors.append(f"adapter.dropout: must be in [0, 1), got {a.dropout}")
    if not a.targets:
        errors.append("adapter.targets: at least one target module is needed")
    t = cfg.train
    for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_every", "checkpoint_every"):
        if getattr(t, name) < 1:
            errors.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if t.lr <= 0:
        errors.append(f"train.lr: must be > 0, got {t.lr}")
    for name in ("head_lr", "task_lr"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name}: must be >= 0 (0: same as train.lr), got {getattr(t, name)}")
    w = t.warm
    for name in ("steps", "lr", "warmup_steps"):
        if getattr(w, name) < 0:
            errors.append(f"train.warm.{name}: must be >= 0, got {getattr(w, name)}")
    for name in ("fraction", "task_lr_scale"):
        if getattr(w, name) <= 0:
            errors.append(f"train.warm.{name}: must be > 0, got {getattr(w, name)}")
    if t.adapt == "task_only" and not t.init_from:
        errors.append("train.adapt: task_only trains the new scenarios of a starting model; set train.init_from")
    if t.adapt == "task_only" and t.compare:
        errors.append(f"train.adapt: task_only adds scenarios to one starting model; train.compare {t.compare} "
                      "trains several methods: pin the method (train.compare=[])")
    if t.adapt == "task_only" and cfg.adapter.method == "lora" and not t.compare:
        errors.append("train.adapt: task_only trains per-scenario parameters, and adapter.method lora has none "
                      "(one update serves every scenario). Use train.adapt=all to fine-tune the shared adapter and "
                      "head on the new rows (every scenario's scores may move), or serve the new scenario through "
                      "the shared adapter as it is: serving.unknown_scenario=fallback with "
                      "serving.fallback_scenario=<a known scenario> (LoRA scores every scenario alike)")
    if cfg.remote_work_dir and cfg.tracking.enabled and not cfg.tracking.uri:
        errors.append(f"tracking.uri: required with an object-store work_dir ({cfg.work_dir}): the default sqlite "
                      "database needs a local file; give a tracking server (or a sqlite path), or "
                      "tracking.enabled=false")
    if cfg.model.init == "random" and not cfg.model.random_config:
        errors.append("model.random_config: required when model.init is 'random'")
    if cfg.serving.unknown_scenario == "fallback" and not cfg.serving.fallback_scenario:
        errors.append("serving.fallback_scenario: required when serving.unknown_scenario is 'fallback'")
    g = cfg.serving.gpus_per_actor
    if g < 0 or (g > 1 and g != int(g)):
        errors.append(f"serving.gpus_per_actor: must be a fraction in [0, 1] (several actors per GPU) or a whole "
                      f"number of GPUs, got {g}")


def config_from_dict(data: dict[str, Any]) -> Config:
    errors: list[str] = []
    cfg = _build(Config, data or {}, "", errors)
    try:
        _validate(cfg, errors)
    except TypeError:  # a wrongly typed value, already reported above
        pass
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML scalars/lists (``3e-4``, ``[q, v]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# The configs that ship with the package (package data: links to the checkout's configs/), by name.
PRESETS = Path(__file__).resolve().parent / "presets"


def presets() -> list[str]:
    """The names ``--config`` takes besides a file: demo, smollm2, tiny."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the shipped config of that name (``--config demo`` or
    ``--config tiny``, wherever the package is installed); ConfigError when neither exists."""
    p = Path(path)
    if p.is_file():
        return p
    preset = PRESETS / f"{p.stem}.yaml"
    if str(path) in (p.stem, p.name) and p.suffix in ("", ".yaml") and preset.is_file():
        return preset
    raise ConfigError(f"config file {p} does not exist (the configs shipped with the package: "
                      f"{', '.join(presets())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of the YAML file ``path`` (or a shipped config's name, ``config_path``), ``overrides``
    applied; every problem reported at once."""
    data: dict[str, Any] = {}
    if path:
        p = config_path(path)
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        _floatify_strings(data)
    return config_from_dict(apply_overrides(data, overrides or []))


def _floatify_strings(node: dict[str, Any]) -> None:
    for k, v in node.items():
        if isinstance(v, dict):
            _floatify_strings(v)
        elif isinstance(v, str) and _looks_like_float(v) and ("e" in v.lower()):
            node[k] = float(v)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flat_params(cfg: Config) -> dict[str, str]:
    """The config as flat ``section.key`` strings: the MLflow run params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = str(node)[:500]

    walk(to_dict(cfg), "")
    return out


def add_config_args(parser: Any) -> None:
    """The two arguments every entry point shares: --config and trailing key=value overrides."""
    parser.add_argument("--config", help="YAML config file, or the name of a config shipped with the package: "
                                         "demo, tiny, smollm2 (configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
