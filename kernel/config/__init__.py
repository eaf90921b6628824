"""One typed configuration tree for every stage.

Loaded from YAML, then dotted ``key=value`` overrides (``train.lr=3e-4``). Unknown keys and wrong types
are errors, and every problem is reported at once. The DeepSpeed JSON and the MLflow params are derived
from this tree by code (``training.ds_config``, ``flat_params``); nothing else is configured by hand.

    cfg = load_config("configs/demo.yaml", ["train.max_steps=50", "adapter.r=4"])
    cfg = load_config("tiny")        # a config shipped with the package, by name (demo, smollm2, tiny)

The sections and their keys are ``kernel.config.schema``; reading, checking and writing them is
``kernel.config.load``. Import either from here.
"""
from kernel.config.load import (
    add_config_args,
    apply_overrides,
    config_from_dict,
    config_path,
    dump_config,
    flat_params,
    load_config,
    to_dict,
)
from kernel.config.schema import (
    AdapterConfig,
    ColumnsConfig,
    Config,
    DataConfig,
    FeaturesConfig,
    ModelConfig,
    MonitoringConfig,
    ServingConfig,
    SplitConfig,
    SyntheticConfig,
    TrackingConfig,
    TrainConfig,
    WarmConfig,
)

__all__ = [
    "AdapterConfig", "ColumnsConfig", "Config", "DataConfig", "FeaturesConfig", "ModelConfig", "MonitoringConfig",
    "ServingConfig", "SplitConfig", "SyntheticConfig", "TrackingConfig", "TrainConfig", "WarmConfig",
    "add_config_args", "apply_overrides", "config_from_dict", "config_path", "dump_config", "flat_params",
    "load_config", "to_dict",
]
