"""Batch scoring on a Ray cluster: Ray Data hands shards to actors that each hold one model.

    python -m serving.score --model models:/ads-relevance@champion --input s3-mounted/traffic/ \\
        --output scores/ --engine ray --workers 16 --ray-address auto      # pip install '.[ray]'

The dataset is the list of shards (one item per input file); ``map_batches`` with a callable class runs
``ShardScorer`` actors (``concurrency`` = --workers), each loading the exported model once and scoring
whole shards with exactly the single-process code (``serving.score.score_shard``). Per-shard atomic
outputs, quarantine files, markers and ``--resume`` therefore behave the same on one machine or many, and
the scores are identical to the single-process path. The output folder must be reachable from every node
(a shared file system). ``--ray-address local`` (the default) starts a private Ray on this machine bound to
127.0.0.1 with no dashboard.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kernel.config import Config, config_from_dict, to_dict
from kernel.errors import ConfigError
from serving import shards as sh
from serving.batch import Inputs, score_shard
from serving.scorer import BatchScorer


class ShardScorer:
    """A Ray Data actor: one BatchScorer for its lifetime; each call scores the shards it is given."""

    def __init__(self, cfg: dict, export_dir: str, model_version: str, inputs: list[str], out: str):
        self.cfg = config_from_dict(cfg)
        self.data = Inputs(self.cfg, inputs)
        self.scorer = BatchScorer(export_dir, self.cfg.serving, model_version)
        self.out = Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, scored = [], []
        for index in batch["shard"]:
            summary = score_shard(self.scorer, self.data, self.data.shards[int(index)], self.out)
            rows.append(summary["rows_in"])
            scored.append(summary["scored"])
        return {"shard": np.asarray(batch["shard"]), "rows_in": np.asarray(rows), "scored": np.asarray(scored)}


def init_ray(address: str = "local"):
    """Connect to ``address`` ('auto': a running cluster) or start a local Ray bound to 127.0.0.1.

    Ray advertises its node IP and binds its servers to it; a ``127.0.0.1`` given to ``ray.init`` is
    rewritten to the machine's external address unless Ray runs in its single-machine mode. That mode is
    chosen by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import (hence the constant is set as well when
    Ray was imported earlier) and by every Ray process started from here.
    """
    if address == "local":
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--engine ray needs Ray: pip install 'ray[data]' (or the project's [ray] extra)") from e
    if ray.is_initialized():
        return ray
    if address == "local":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        nodes = {n["NodeManagerAddress"] for n in ray.nodes()}
        if nodes != {"127.0.0.1"}:
            ray.shutdown()
            raise RuntimeError(f"local Ray did not bind to 127.0.0.1 (node addresses {sorted(nodes)})")
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


def run_on_ray(cfg: Config, export_dir: Path, model_version: str, inputs: list[str], out: Path, resume: bool,
               actors: int, address: str = "local") -> list[dict]:
    """Score every (unfinished, with ``resume``) shard on Ray; returns one row per shard scored."""
    data = Inputs(cfg, inputs)
    todo = [s.index for s in data.shards if not (resume and sh.is_done(out, s, model_version))]
    if not todo:
        return []
    ray = init_ray(address)
    ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        ShardScorer,
        fn_constructor_kwargs={"cfg": to_dict(cfg), "export_dir": str(Path(export_dir).resolve()),
                               "model_version": model_version, "inputs": [str(Path(i).resolve()) for i in inputs],
                               "out": str(Path(out).resolve())},
        batch_size=1,  # one shard per call: a shard's outputs are committed before the next one starts
        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(todo)))),
        num_cpus=1,
    )
    return ds.take_all()
