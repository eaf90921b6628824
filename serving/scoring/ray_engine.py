"""Batch scoring on Ray: Ray Data streams the job's units through a pool of actors that each hold one model.

    python -m serving.score --model models:/ads-relevance@champion --input s3-mounted/traffic/ \\
        --output scores/ --engine ray --workers 16 --ray-address auto      # pip install '.[ray]'

The dataset is the list of units still to score (serving.scoring.plan: runs of whole row groups of one input
file, one item and one block per unit), so one large file spreads over every actor. ``map_batches`` with
a callable class runs ``UnitScorer`` actors in a fixed pool of --workers; each builds one BatchScorer
in its constructor and scores one unit per call with the single-process code (``serving.scoring.worker.score_unit``),
committing the unit's output, quarantine and marker before the call returns. Outputs, markers and
``--resume`` therefore behave as on one process, and the scores are the same. The inputs and the output
folder must be reachable from every node (an object store or a shared file system).

The model: actors are given its reference, never the driver's copy. A registry model goes to them as
``models:/<name>/<version>`` (an alias pinned to the version the driver resolved) with the tracking URI,
an exported folder on an object store as its ``s3://`` (``gs://``, ...) URI; each actor resolves it through
the checked registry cache of its own node (serving.registry.cache), so actors on one node share one
download. A folder given as ``--model`` is passed as its absolute path: it must be on storage every node
mounts. Each actor checks that what it loaded is the content the driver resolved (the export's digest).

Resources: each actor requests ``threads`` CPUs (torch or ONNX Runtime runs that many threads in it:
serving.threads; 1 by default, so N actors on N cores do not oversubscribe) and ``serving.gpus_per_actor``
GPUs when the cluster has GPUs (1 by default; 0.5 puts two actors, two models, on each GPU; Ray sets the
actor's CUDA_VISIBLE_DEVICES, and without the request it would hide the GPUs from the actor).

``--ray-address local`` (the default) starts a private Ray on this machine bound to 127.0.0.1, no
dashboard; ``auto`` or ``host:port`` joins a running cluster.

Ray's noise, and what is done about it (real errors still surface: a failed unit raises in the driver
with the actor's traceback; Ray's own logs are under /tmp/ray/session_*/logs):
  * the driver's core worker logs an E-line (``core_worker.cc``) for every actor created with
    ``max_restarts > 0`` and constructor arguments in the object store. Ray Data always passes its
    context and UDF as object refs and defaults to ``max_restarts=-1`` (ray-project/ray#57733). On the
    private local Ray the pool is created with ``max_restarts=0``: the line's condition no longer holds.
    An actor that dies there (a bug, out of memory) then fails the job, whose ``--resume`` redoes only
    the unfinished units, as with local worker processes; restarting it on the same machine seldom
    helps. On a cluster Ray Data's restarts stay (a lost node is expected there, and redoing a unit is
    safe), and so does the line. Ray 2.60 takes max_restarts only as a deprecated extra option of
    map_batches (its notice is filtered for that call); a Ray without the option gets the default.
  * the warning a new local Ray prints that it turned token authentication on (it stays on): that one
    log record is dropped while the local Ray starts; the logger's other records still show.
  * Ray Data's INFO lines and progress log: with --quiet, or when stderr is not a terminal (a scheduled
    job's log), its console handler shows WARNING and above only (its log file under the session folder still
    gets everything).
  * an actor that dies mid-job (killed, out of memory): Ray Data logs the error with a traceback on the
    console, then raises it in the driver. The console record is dropped and the driver raises WorkerLost,
    one line naming the actor's pid and node and how many units are finished (exit 8; --resume redoes
    only the rest).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from kernel import storage
from kernel.config import config_from_dict, to_dict
from kernel.environment import RAY_DEATHS
from kernel.errors import ConfigError, DataError, WorkerLost
from kernel.logs import progress_enabled, records_dropped
from serving.layout import read_manifest
from serving.registry.cache import resolve_model
from serving.scoring import outputs
from serving.scoring.plan import Inputs
from serving.scoring.scorer import BatchScorer
from serving.scoring.worker import Job, score_unit

# Seconds the pool may take to start every actor (process, imports, model load) before scoring begins.
ACTOR_START_TIMEOUT_S = 600
# A new local Ray turns token authentication on and says so, as a warning, on every start. That one record
# is dropped (authentication stays on); the logger's other records, e.g. a missing token, still show.
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_ON_BY_DEFAULT = "Token authentication is enabled for this Ray cluster."


class UnitScorer:
    """A Ray Data actor: one BatchScorer for its lifetime; each call scores (and commits) its units.

    Every actor plans the units itself from the same inputs and config (the plan is deterministic), so a
    work item is just the unit's ordinal. ``model``: the reference the actor resolves on its node
    (``model_on_node``).
    """

    def __init__(self, cfg: dict, model: dict, model_version: str, inputs: list[str], out: str,
                 threads: int = 1):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
            # The tokenizer's thread pool too (read when it first runs): N actors use N cores, not N x all.
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        self.cfg = config_from_dict(cfg)
        if threads > 0:  # the actor's CPUs bound both engines' threads (serving.threads), whatever the config says
            self.cfg.serving.threads = threads
        self.data = Inputs(self.cfg, inputs)
        self.scorer = BatchScorer(model_on_node(model), self.cfg.serving, model_version)
        self.out = out if storage.is_uri(out) else Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # batch: {"unit": (k,) int64 ordinals}; batch_size=1, so k == 1: one unit per call, committed
        # before the call returns (a retried call redoes the unit from scratch).
        rows, scored, pids = [], [], []
        for ordinal in batch["unit"]:
            summary = score_unit(self.scorer, self.data, self.data.units[int(ordinal)], self.out)
            rows.append(summary["rows_in"])
            scored.append(summary["scored"])
            pids.append(summary["pid"])
        return {"unit": np.asarray(batch["unit"]), "rows_in": np.asarray(rows, np.int64),
                "scored": np.asarray(scored, np.int64), "pid": np.asarray(pids, np.int64)}


def model_reference(job: Job) -> dict:
    """What an actor is told about the model: the reference any node resolves (``job.model_ref``, else the
    folder's absolute path), the registry's tracking URI, and the content (the export's digest) it must find."""
    return {"ref": job.model_ref or str(Path(job.model).resolve()), "tracking_uri": job.tracking_uri,
            "content": read_manifest(Path(job.model))["model_version"]}


def model_on_node(model: dict) -> Path:
    """The export folder on this node for ``model`` (model_reference): resolved through this node's registry
    cache (a download checked against the registry and the export's digest), or the shared folder itself.
    Raises DataError when its content is not the one the driver resolved (e.g. an export republished at the
    same object-store URI during the job)."""
    export_dir, _ = resolve_model(model["ref"], model["tracking_uri"])
    found = read_manifest(export_dir)["model_version"]
    if found != model["content"]:
        raise DataError(f"model {model['ref']}: this node resolved it to {found}, the job scores with "
                        f"{model['content']}; it changed during the job: rerun with --resume")
    return export_dir


def init_ray(address: str = "local", num_gpus: int | None = None):
    """Connect to ``address`` ('auto': a running cluster) or start a local Ray bound to 127.0.0.1, which
    offers ``num_gpus`` GPUs (default: the CUDA devices torch sees here).

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
        import torch

        # The GPUs torch sees here are the local Ray's GPUs, whatever Ray's own detection finds.
        gpus = num_gpus if num_gpus is not None else torch.cuda.device_count() if torch.cuda.is_available() else 0
        with records_dropped(AUTH_LOGGER, AUTH_ON_BY_DEFAULT):
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_gpus=gpus,
                     log_to_driver=False, configure_logging=False)
        nodes = {n["NodeManagerAddress"] for n in ray.nodes()}
        if nodes != {"127.0.0.1"}:
            ray.shutdown()
            raise RuntimeError(f"local Ray did not bind to 127.0.0.1 (node addresses {sorted(nodes)})")
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


def actor_resources(ray, threads: int, gpus_per_actor: float = 1.0) -> dict:
    """What each actor requests: ``threads`` CPUs, and ``gpus_per_actor`` GPUs (serving.gpus_per_actor; a
    fraction shares a GPU between actors) when the cluster has GPUs (the local Ray gets this machine's CUDA
    devices in init_ray). Without the request Ray hides every GPU from the actor."""
    gpus = ray.cluster_resources().get("GPU", 0)
    return {"num_cpus": max(1, threads), "num_gpus": gpus_per_actor if gpus > 0 else 0}


def run_on_ray(job: Job, plan: Inputs, actors: int, address: str = "local", threads: int = 1) -> list[dict]:
    """Score every unit of ``plan`` still to do (``job.todo``) on Ray; returns one row per unit scored:
    {unit (ordinal), rows_in, scored, pid}."""
    todo = [u.ordinal for u in job.todo(plan.units)]
    if not todo:
        return []
    ray = init_ray(address)
    resources = actor_resources(ray, threads, job.cfg.serving.gpus_per_actor)
    size = max(1, min(actors, len(todo)))
    if address == "local":  # a pool this machine cannot hold would wait for resources that never come
        have = ray.cluster_resources()
        for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            if resources[key] and size * resources[key] > have.get(name, 0):
                raise ConfigError(f"--workers {size} Ray actors need {size * resources[key]:g} {name}s "
                                  f"({resources[key]:g} each: --ray-threads for CPUs, serving.gpus_per_actor "
                                  f"for GPUs); this machine's Ray has {have.get(name, 0):g}")
    context = ray.data.DataContext.get_current()
    # Start scoring once every actor holds its model: the first units then go one to each actor, and a
    # cluster that cannot place the pool fails with a timeout instead of waiting forever.
    saved_wait = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = max(saved_wait, ACTOR_START_TIMEOUT_S)
    extra = _no_restarts(ray) if address == "local" else {}  # see the module docstring (the E-line)
    inputs = [i if storage.is_uri(i) else str(Path(i).resolve()) for i in job.inputs]  # as every node sees them
    try:
        ds = ray.data.from_items([{"unit": i} for i in todo], override_num_blocks=len(todo))
        with warnings.catch_warnings():
            # Ray 2.60 deprecates remote options passed as extra keywords (removed in 2.64) but has no
            # named parameter for max_restarts yet: that one deprecation notice is not shown.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
            ds = ds.map_batches(
                UnitScorer,
                fn_constructor_kwargs={"cfg": to_dict(job.cfg), "model": model_reference(job),
                                       "model_version": job.model_version,
                                       "inputs": inputs,
                                       "out": str(job.out) if storage.is_uri(job.out) else str(Path(job.out).resolve()),
                                       "threads": threads},
                batch_size=1,  # one unit per call: its outputs are committed before the next one starts
                # One unit in flight per actor: a free actor takes the next unit, none queues behind a busy one.
                compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
                **resources,
                **extra,
            )
        quiet = contextlib.nullcontext() if progress_enabled(job.quiet) else _console_at_warning("ray.data")
        with quiet, _without_deaths("ray.data"):
            return ds.take_all()
    except Exception as e:
        lost = _worker_lost(e, job, plan)
        if lost is None:
            raise
        raise lost from e
    finally:
        context.wait_for_min_actors_s = saved_wait


def _worker_lost(error: BaseException, job: Job, plan: Inputs) -> WorkerLost | None:
    """A WorkerLost naming the actor (pid, node) when ``error`` is Ray's report of a dead actor or worker."""
    death = next((e for e in _chain(error) if {c.__name__ for c in type(e).__mro__} & RAY_DEATHS), None)
    if death is None:
        return None
    text = str(death)
    pid, ip = (re.search(rf"\b{k}: (\S+)", text) for k in ("pid", "ip"))
    done = sum(outputs.is_done(job.out, u, job.model_version) for u in plan.units)
    who = f"pid {pid.group(1)} on {ip.group(1)}" if pid and ip else "its process"
    return WorkerLost(f"a Ray scoring actor ({who}) died ({type(death).__name__}: killed, out of memory or its node "
                      f"lost); {done} of {len(plan.units)} units are finished in {job.out}")


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@contextlib.contextmanager
def _without_deaths(name: str):
    """Ray Data logs a dead actor with a traceback on the console before it raises; the driver reports it in
    one line (WorkerLost), so those records are kept off the console handlers of logger ``name`` for the
    block (Ray's log files under the session folder still get them)."""
    def keep(record: logging.LogRecord) -> bool:
        # Ray Data also logs plain lines ("Exception occurred in Ray Data or Ray Core internal code ...")
        # while it handles the death: a filter runs in the logging call, so sys.exc_info() is that death.
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return error is None or not any({c.__name__ for c in type(e).__mro__} & RAY_DEATHS for e in _chain(error))

    handlers = [h for h in logging.getLogger(name).handlers
                if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__]
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)


def _no_restarts(ray) -> dict:
    """map_batches' option for actors that are not restarted, where this Ray can take it: a named
    parameter, or (Ray 2.60 to 2.63) an extra remote option; {} when it cannot (the E-line then stays)."""
    params = inspect.signature(ray.data.Dataset.map_batches).parameters
    if "max_restarts" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"max_restarts": 0}
    return {}


@contextlib.contextmanager
def _console_at_warning(name: str):
    """Console handlers of logger ``name`` at WARNING for the block; file handlers keep every level."""
    handlers = [h for h in logging.getLogger(name).handlers
                if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, logging.WARNING))
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)
