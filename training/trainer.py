"""The training loop: a DeepSpeed engine over a frozen base with MTL-LoRA, evaluated per scenario.

    result = train(cfg, data_dir=Path("runs/demo/data"), out_dir=Path("runs/demo/train"), resume=False)

    t = Trainer(cfg, data_dir, out_dir).setup(resume=False)   # the phases, for tests and notebooks
    t.step(); metrics = t.evaluate(); t.save_checkpoint()

Layout written under ``out_dir``:
    checkpoints/<tag>/   DeepSpeed checkpoints (model, optimizer, scheduler) + client state (sampler, RNG,
                         best-so-far, evaluation history), every ``train.checkpoint_every`` steps; ``latest``
                         names the newest
    model/               the best checkpoint by validation macro AUC, as a trained-model folder
    history.json         every validation of the run: step and full per-scenario metrics
    ds_config.json
    start/               a warm-started run only: the model it started from (training.warm_start)
A NaN/inf loss raises TrainingDiverged before the optimizer step; checkpoints already written stay good.

Warm start (``train.init_from``): the model is built for the starting model's task map extended by the
data's new scenarios, loaded from it (``modeling.warm_start``), and trained on the ``train.warm`` schedule;
with ``train.adapt: task_only`` only the new scenarios' own parameters train.

Evaluation reads the live engine's weights. The adapters cache their per-task factors for no-grad
forwards; DeepSpeed writes updated weights through ``.data``, so every optimizer step is announced to them
(``TaskRouter.weights_changed``, a counter: no tensor operation is added to the step).
"""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from evaluation.metrics import describe_macro
from features.sampler import MixedScenarioSampler
from features.tokenize import FeatureSet, build_features
from kernel import storage
from kernel.atomic import write_json_atomic
from kernel.config import Config, flat_params, to_dict
from kernel.dataset_profile import describe_parquet
from kernel.errors import ConfigError, DataError, TrainingDiverged
from kernel.hashing import fingerprint_files_and_each
from kernel.logs import adopt_library_loggers, drop_records
from kernel.metric_names import VAL, metric_name
from kernel.mlflow_client import NullTracker
from kernel.provenance import git_commit
from kernel.task_map import TASK_MAP_FILE, TaskMap
from modeling.artifact import TRAINABLE_FILE, save_trained
from modeling.base import load_tokenizer
from modeling.hardware import training_precision
from modeling.inject import adapter_param_count
from modeling.model import build_model, enable_activation_checkpointing
from modeling.warm_start import hold_known_tasks, load_start, saved_state
from training.distributed import DistEnv, choose_accelerator, init_distributed
from training.ds_config import build_optimizer, deepspeed_config
from training.evaluate import evaluate, flat_metrics
from training.rng import rng_state, seed_everything, set_rng_state
from training.warm_start import StartPoint, prepare_start, run_schedule, warn_if_known_absent

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HISTORY_FILE = "history.json"
log = logging.getLogger(__name__)
# DeepSpeed's warnings that every run of this trainer raises, and why they are harmless here: the optimizer is
# torch's AdamW (fused/foreach) over our own parameter groups, which ZeRO handles like its own; the LR
# scheduler is read once while it is built, before its first step.
HARMLESS_DEEPSPEED = ("You are using ZeRO with an untested optimizer",
                      "Attempting to get learning rate from scheduler before it has started")
TORCH_DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


@dataclass
class TrainResult:
    model_dir: Path
    best_metrics: dict
    steps: int
    run_id: str | None
    history: list[dict] = field(default_factory=list)


def task_map_for(cfg: Config, data_dir: Path) -> TaskMap:
    """The task map ingestion wrote (``<data_dir>/task_map.json``); ``data.scenarios``, when set, must agree."""
    path = storage.join(data_dir, TASK_MAP_FILE)
    if not storage.is_file(path):
        raise DataError(f"{path} is missing: run ingestion first (python -m pipeline.ingest)")
    task_map = TaskMap.load(path)
    if cfg.data.scenarios and list(cfg.data.scenarios) != task_map.names:
        raise ConfigError(f"data.scenarios {cfg.data.scenarios} differs from the task map {task_map.names} "
                          f"that ingestion wrote to {path}: ingest again with this config")
    return task_map


def load_split_features(cfg: Config, data_dir: Path, split: str, tokenizer, task_map: TaskMap) -> FeatureSet:
    path = storage.join(data_dir, f"{split}.parquet")
    if not storage.is_file(path):
        raise DataError(f"{path} is missing: run ingestion first (python -m pipeline.ingest)")
    return build_features(
        pq.read_table(str(path)), tokenizer, task_map, cfg.features.max_length,
        cache_dir=cfg.local_work_dir / "features_cache", batch_size=cfg.features.tokenize_batch_size,
        pair_format=cfg.features.pair_format,
    )


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss).all())])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


class Trainer:
    """One training run in phases: ``setup``, ``step``, ``evaluate`` (+ ``record``), ``save_checkpoint``."""

    def __init__(self, cfg: Config, data_dir: Path, out_dir: Path, tracker=None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.run_cfg = cfg  # the schedule this run follows: cfg's own, or train.warm's once a start is known
        self.data_dir = data_dir if storage.is_uri(data_dir) else Path(data_dir)  # ingested data: local or a URI
        self.tracker = tracker or NullTracker()
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.model_dir = self.out_dir / "model"
        self.best = {"auc_macro": -1.0, "step": 0, "metrics": None, "bad_evals": 0}
        self.history: list[dict] = []

    # --- set-up -------------------------------------------------------------------------------------

    def setup(self, resume: bool = False) -> "Trainer":
        choose_accelerator()
        import deepspeed

        adopt_library_loggers()  # DeepSpeed's logger prints to stdout in a format of its own
        drop_records("DeepSpeed", *HARMLESS_DEEPSPEED)
        # ZeRO's collectives call torch's old names, which torch flags on every call; nothing to act on here.
        warnings.filterwarnings("ignore", message=TORCH_DEPRECATED_COLLECTIVES, category=FutureWarning)
        cfg = self.cfg
        self.env: DistEnv = init_distributed()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg)
        self.pad_id = self.tokenizer.pad_token_id
        self.start = self._prepare_start(resume)
        data_map = task_map_for(cfg, self.data_dir)
        # A warm start keeps its model's ids and appends the data's new scenarios; the data's own ids do not matter.
        self.task_map = self.start.task_map.extended(data_map.names) if self.start else data_map
        if self.start and self.env.rank == 0:
            warn_if_known_absent(cfg.train.adapt, self.start.task_map.names, data_map.names)
        self.run_cfg = run_schedule(cfg, warm=self.start is not None)
        self.train_set = load_split_features(cfg, self.data_dir, "train", self.tokenizer, self.task_map)
        self.valid_set = load_split_features(cfg, self.data_dir, "valid", self.tokenizer, self.task_map)
        model = build_model(cfg, len(self.task_map), dtype=torch.float32)
        self.held: dict[str, int] = {}
        if self.start:
            self._load_start(model)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model.backbone, model.router.checkpoint_context)
        self.ds_config = deepspeed_config(self.run_cfg, self.env.world, self.env.on_gpu)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, self.run_cfg, self.env.on_gpu), config=self.ds_config)
        self.model = self.engine.module
        self.sampler = MixedScenarioSampler(
            self.train_set.task_ids, self.train_set.lengths, cfg.train.micro_batch_size,
            strategy=cfg.features.sampler, alpha=cfg.features.sampler_alpha, seed=cfg.train.seed,
            rank=self.env.rank, world_size=self.env.world, length_bucketing=cfg.features.length_bucketing)
        if resume and (self.ckpt_dir / "latest").is_file():
            self._restore()
        else:
            self._start_fresh(model)
        self._batches = iter(self.sampler)
        self._dtype = _DTYPES[training_precision(cfg.train.precision)]
        self._diag_every = max(0, cfg.train.diagnostics_every)  # training.diagnostics cadence; 0: off
        self._hold_task_params()
        self._seen, self._t0, self.last_loss = 0, time.time(), float("nan")
        return self

    def _prepare_start(self, resume: bool) -> StartPoint | None:
        """The starting model's local copy: made by one process per machine, read by all."""
        if not self.cfg.train.init_from:
            return None
        if self.env.local_rank == 0:
            prepare_start(self.cfg, self.out_dir, resume=resume)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return prepare_start(self.cfg, self.out_dir, resume=True)

    def _load_start(self, model) -> None:
        """The starting model's adapter and head into ``model``; with task_only, the known scenarios held still."""
        from safetensors.torch import load_file

        known = len(self.start.task_map)
        self.start_state = load_file(str(self.start.dir / TRAINABLE_FILE))
        load_start(model, self.start_state, known, source=f"train.init_from {self.cfg.train.init_from!r}")
        if self.cfg.train.adapt == "task_only":
            self.held = hold_known_tasks(model, known)
        if self.env.rank == 0:
            new = self.task_map.names[known:]
            log.info(f"warm start from {self.start.record.get('init_from')} ({self.start.record.get('version') or ''}"
                     f"{self.start.record.get('path', '')}): {known} known scenarios, new: {new or 'none'}; "
                     f"adapt {self.cfg.train.adapt}, {self.run_cfg.train.max_steps} steps at lr "
                     f"{self.run_cfg.train.lr:g}")

    def _restore(self) -> None:
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        self.sampler.load_state_dict(client["sampler"])
        self.best, self.history = client["best"], client["history"]
        rng = client["rng"]
        set_rng_state(rng[self.env.rank] if isinstance(rng, list) else rng)
        if self.env.rank == 0:
            tag = (self.ckpt_dir / "latest").read_text().strip()
            log.info(f"resumed from {self.ckpt_dir / tag} at step {self.engine.global_steps}")

    def _start_fresh(self, model) -> None:
        if self.env.rank != 0:
            return
        if self.ckpt_dir.exists():
            shutil.rmtree(self.ckpt_dir)
        write_json_atomic(self.out_dir / "ds_config.json", self.ds_config)
        n_adapter, n_expected = adapter_param_count(model)
        t = self.tracker
        t.log_params(flat_params(self.cfg))
        paths = [storage.join(self.data_dir, f"{s}.parquet") for s in ("train", "valid")]
        both, each = fingerprint_files_and_each(paths)  # one read of each split, however large
        t.set_tags({"git_commit": git_commit(), "data_fingerprint": both, "world_size": self.env.world,
                    **self._start_tags()})
        for (split, context), path, digest in zip((("train", "training"), ("valid", "validation")), paths, each):
            schema, profile = describe_parquet(path)  # rows and label rate per scenario, beside the fingerprint
            t.log_dataset(str(path if storage.is_uri(path) else Path(path).resolve()), split, digest, context,
                          schema, profile)
        t.log_metrics({"params/trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "params/adapter": n_adapter, "params/adapter_expected": n_expected,
                       "params/total": sum(p.numel() for p in model.parameters())})
        t.log_dict(to_dict(self.cfg), "config/config.yaml")
        t.log_artifact(self.out_dir / "ds_config.json", "config")

    def _start_tags(self) -> dict:
        """What the run started from, as MLflow tags (none for a run from scratch)."""
        if not self.start:
            return {}
        r, known = self.start.record, len(self.start.task_map)
        return {"init_from": r["init_from"], "init_version": r.get("version", ""), "init_path": r.get("path", ""),
                "init_model_version": r.get("model_version", ""), "init_trained_digest": r["trained_digest"],
                "adapt": self.cfg.train.adapt, "new_scenarios": ",".join(self.task_map.names[known:])}

    # --- one optimizer step ------------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        return self.engine.global_steps

    def step(self) -> float:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns the last micro-batch loss."""
        device = self.env.device
        self.engine.train()
        for _ in range(self.cfg.train.grad_accum):
            batch = self.train_set.collate(next(self._batches), self.pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=self._dtype, enabled=self._dtype != torch.float32):
                logits = self.engine(batch["input_ids"], batch["attention_mask"], batch["task_ids"],
                                     batch.get("token_type_ids"))
            loss = (F.binary_cross_entropy_with_logits(logits.float(), batch["labels"], reduction="none")
                    * batch["weights"]).sum() / batch["weights"].sum().clamp(min=1e-6)
            if not _all_finite(loss):
                latest = self.ckpt_dir / "latest"
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {self.global_step}; last good checkpoint: "
                    f"{latest.read_text().strip() if latest.is_file() else 'none'} in {self.ckpt_dir}")
            self.engine.backward(loss)
            if self._diag_every and self.global_step % self._diag_every == 0 \
                    and self.engine.is_gradient_accumulation_boundary():  # full gradients, before the update
                self._log_diagnostics(grads=True)
            self.engine.step()
            self._hold_task_params()  # the scheduler just set every group's lr for the next step
            # DeepSpeed wrote the new weights through .data: the adapters' no-grad caches must not serve them.
            self.model.router.weights_changed()
            self._seen += len(batch["labels"]) * self.env.world
            self.last_loss = loss.item()
        self._log_progress()
        return self.last_loss

    def _hold_task_params(self) -> None:
        """train.task_warmup_steps: the "task" group (Λ_t, w_t) gets lr 0 until that many steps are done."""
        k = self.run_cfg.train.task_warmup_steps
        if k and self.global_step < k:
            for group in self.engine.optimizer.param_groups:
                if group.get("name") == "task":
                    group["lr"] = 0.0

    def _log_progress(self) -> None:
        step = self.global_step
        if self.env.rank != 0 or not (step % 10 == 0 or step == 1):
            return
        rate = self._seen / max(time.time() - self._t0, 1e-9)
        self.tracker.log_metrics({"train/loss": self.last_loss, "train/lr": self.scheduler.get_last_lr()[0],
                                  "train/samples_per_s": rate}, step=step)
        log.info(f"step {step}/{self.run_cfg.train.max_steps} loss {self.last_loss:.4f} {rate:.1f} samples/s")

    def _log_diagnostics(self, grads: bool) -> None:
        """diag/... metrics (training.diagnostics) of the weights at this step, and with ``grads`` the gradient
        norms of the update from it, logged at this step. Every rank calls it: ZeRO gathers are collective."""
        from training.diagnostics import adapter_diagnostics, grad_norms

        metrics = adapter_diagnostics(self.model, self.task_map.names)
        if grads:
            metrics.update(grad_norms(self.engine))
        if self.env.rank == 0:
            self.tracker.log_metrics(metrics, step=self.global_step)

    # --- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Validation metrics of the engine's current weights (every rank takes part)."""
        return evaluate(self.model, self.valid_set, self.task_map, self.cfg.train.micro_batch_size * 2, self.pad_id,
                        self.env.device, self.env.rank, self.env.world, self.cfg.train.eval_rows_per_scenario)

    def record(self, metrics: dict) -> bool:
        """Log an evaluation, keep the best model by macro AUC; returns whether training should stop early."""
        step = self.global_step
        self.history.append({"step": step, **metrics})
        state = self.gathered_trainable_state()
        macro = metrics["auc_macro"]
        improved = macro is not None and macro > self.best["auc_macro"]
        if improved:
            self.best.update(auc_macro=macro, step=step, metrics=metrics, bad_evals=0)
        else:
            self.best["bad_evals"] += 1
        if self.env.rank == 0:
            self.tracker.log_metrics(flat_metrics(metrics), step=step)
            per = " ".join(f"{k}={v['auc'] and round(v['auc'], 4)}" for k, v in metrics["scenarios"].items())
            log.info(f"step {step} val auc_macro {describe_macro(metrics)} {per}")
            if improved:
                if self.held:  # task_only: every known row exactly as the start had it
                    state = saved_state(state, self.start_state, self.held)
                save_trained(self.model, self.cfg, self.task_map, {"step": step, **metrics}, self.model_dir,
                             state=state, start=self.start.record if self.start else None)
            write_json_atomic(self.out_dir / HISTORY_FILE, self.history)
        patience = self.run_cfg.train.early_stopping_patience
        return bool(patience) and self.best["bad_evals"] >= patience

    def gathered_trainable_state(self) -> dict[str, torch.Tensor]:
        """Full values of every trainable parameter (gathered from ZeRO-3 partitions when needed)."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if self.cfg.train.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                return {n: p.detach().float().cpu().clone() for n, p in params.items()}
        return {n: p.detach().float().cpu().clone() for n, p in params.items()}

    # --- checkpoints -----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        rng = rng_state()
        if self.env.world > 1:
            states: list = [None] * self.env.world
            torch.distributed.all_gather_object(states, rng)
            rng = states
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{self.global_step}", client_state={
            "sampler": self.sampler.state_dict(), "best": self.best, "history": self.history, "rng": rng})
        keep = self.run_cfg.train.keep_checkpoints
        if self.env.rank == 0 and keep > 0:
            tags = sorted((p for p in self.ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
            for old in tags[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    # --- the loop --------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        t = self.run_cfg.train
        while self.global_step < t.max_steps:
            self.step()
            step = self.global_step
            last = step >= t.max_steps
            stop_early = self.record(self.evaluate()) if step % t.eval_every == 0 or last else False
            if step % t.checkpoint_every == 0 or last or stop_early:
                self.save_checkpoint()
            if stop_early:
                if self.env.rank == 0:
                    log.info(f"early stopping at step {step}: no macro-AUC gain in {t.early_stopping_patience} "
                             "evaluations")
                break
        if self._diag_every:  # the final weights (the loop logged those before each due update)
            self._log_diagnostics(grads=False)
        if self.env.rank == 0:
            self.tracker.log_metrics({metric_name(VAL, "auc_macro_best"): self.best["auc_macro"],
                                      metric_name(VAL, "best_step"): self.best["step"]})
            self.tracker.log_artifacts(self.model_dir, "model")
        return TrainResult(self.model_dir, self.best["metrics"], self.global_step, self.tracker.run_id, self.history)


def train(cfg: Config, data_dir: Path, out_dir: Path, resume: bool = False, tracker=None) -> TrainResult:
    return Trainer(cfg, data_dir, out_dir, tracker).setup(resume=resume).run()
