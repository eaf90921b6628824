"""The job's side of a warm start (``train.init_from``) and of a new market.

    start_input(ctx)                  # the train step's input: which model it starts from (a registry version)
    compare_configs(ctx, resume)      # train.compare: per method its config (warm where the start is its own)
    served_scenarios(ctx)             # the champion's scenarios: the promotion gate must evaluate every one
    champion_scored_nothing(outcome)  # the champion knew none of the scored rows (a new market only)

A starting model is an input of the train step like its data: ``models:/<name>@champion`` is resolved to the
version it names now, and a different version reruns training. The alias this run's own promotion moves onto
the model it trained is not a new starting model for it: a replay of a finished night stays up to date.

``train.compare`` with a starting model: a warm start continues its own method, so the compared method that
is the starting model's method starts from it (on the ``train.warm`` schedule); every other method trains
from scratch on the full schedule, and the job says so. The winner is chosen on validation as always.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

from kernel.config import Config
from kernel.errors import ConfigError
from kernel.hashing import file_digest
from kernel.task_map import TaskMap
from modeling.artifact import TRAINABLE_FILE
from serving.layout import read_task_map
from serving.registry.cache import resolve_model
from training.warm_start import is_registry_ref, prepare_start, registry_version, trained_folder

log = logging.getLogger(__name__)


def start_input(ctx) -> dict:
    """{"init_from": the starting model's identity}: a registry version, or the digest of a folder's weights."""
    cfg: Config = ctx.cfg
    ref = cfg.train.init_from
    if not ref:
        return {}
    started = ctx.info("train").get("started_from") or {}
    if is_registry_ref(ref):
        if not cfg.tracking.enabled:
            raise ConfigError(f"train.init_from {ref!r}: a registered model needs tracking.enabled")
        version = registry_version(ref, cfg.tracking_uri, cfg.tracking.timeout_s)["version"]
        if version == str(ctx.info("export").get("version")) and started.get("version"):
            version = started["version"]  # the alias now names this run's own model: not a new start
        return {"init_from": {"ref": ref, "version": version}}
    digest = file_digest(trained_folder(Path(ref)) / TRAINABLE_FILE, 12)
    if digest == ctx.info("train").get("trained_digest") and started.get("trained_digest"):
        digest = started["trained_digest"]  # the folder now holds this run's own model
    return {"init_from": {"ref": ref, "trained_digest": digest}}


def compare_configs(ctx, resume: bool) -> dict[str, Config]:
    """train.compare: each method's config. Without a starting model every method trains from scratch; with
    one, the method it was trained with starts from it and the others train from scratch (printed)."""
    cfg: Config = ctx.cfg
    start = prepare_start(cfg, ctx.paths.train, resume=resume, check=False)
    out = {}
    for method in cfg.train.compare:
        c = copy.deepcopy(cfg)
        c.adapter.method = method
        if start is not None and start.config.adapter.method != method:
            c.train.init_from, c.train.adapt = "", "all"
            log.info(f"compare: {method} trains from scratch ({c.train.max_steps} steps): the starting model "
                     f"{cfg.train.init_from} is {start.config.adapter.method}, and a warm start continues its own "
                     "method")
        out[method] = c
    return out


def served_scenarios(ctx, champion: str | None) -> list[str] | None:
    """The scenarios registered version ``champion`` serves (its export's task map); None without one."""
    if champion is None:
        return None
    cfg = ctx.cfg
    export_dir, _ = resolve_model(f"models:/{cfg.tracking.registered_model}/{champion}", cfg.tracking_uri)
    return read_task_map(export_dir).names


def model_scenarios(model_dir: Path) -> list[str]:
    """The trained model's scenarios: its own task map (a warm start extends its start's)."""
    from kernel.task_map import TASK_MAP_FILE

    return TaskMap.load(Path(model_dir) / TASK_MAP_FILE).names


def champion_scored_nothing(outcome) -> bool:
    """Whether the champion scored none of the input's rows: it knows none of its scenarios (a new market)."""
    return not outcome.info.get("scored")
