"""The typed config: YAML + overrides, every problem reported at once, derived DeepSpeed config."""

import pytest

from kernel.config import config_from_dict, flat_params, load_config
from kernel.errors import ConfigError
from tests.shared import REPO
from training.ds_config import deepspeed_config

CONFIGS = REPO / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.adapter.targets and cfg.train.max_steps > 0


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.lr=3e-4", "adapter.targets=[query, value]", "train.zero_stage=3"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.adapter.targets == ["query", "value"]
    assert cfg.train.zero_stage == 3


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", ["train.lrr=1", "adapter.r=0", "model.pooling=max", "train.max_steps=abc"])
    msg = str(e.value)
    for fragment in ("train.lrr: unknown key", "adapter.r: must be >= 1", "model.pooling: 'max'", "train.max_steps"):
        assert fragment in msg


def test_scenario_source_must_be_unique():
    with pytest.raises(ConfigError, match="exactly one of scenario"):
        config_from_dict({"data": {"columns": {"scenario": "market", "scenario_constant": "us"}}})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_is_derived(world, stage):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"train.zero_stage={stage}", "train.grad_accum=3", "train.precision=bf16"])
    ds = deepspeed_config(cfg, world_size=world, on_gpu=False)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 3 * world
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.max_steps
    assert ds["gradient_clipping"] == cfg.train.grad_clip


def test_training_precision_auto_is_bf16_only_where_bf16_is_fast():
    """bf16 training on a CPU without oneDNN's bf16 path (AVX2 only) ran ~50x slower than fp32: auto avoids it."""
    import torch

    from modeling.hardware import fast_bf16, training_precision

    fast = torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert fast_bf16() == fast
    assert training_precision("auto") == ("bf16" if fast else "fp32")
    assert [training_precision(p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    ds = deepspeed_config(load_config(CONFIGS / "tiny.yaml", ["train.precision=auto"]), world_size=1, on_gpu=False)
    assert ds["bf16"]["enabled"] == fast and not ds["fp16"]["enabled"]
    assert load_config(CONFIGS / "demo.yaml").train.precision == "auto"


def test_deepspeed_config_rejects_impossible_combinations():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        deepspeed_config(load_config(CONFIGS / "tiny.yaml", ["train.precision=fp16"]), 1, on_gpu=False)
    with pytest.raises(ConfigError, match="offload_optimizer"):
        deepspeed_config(load_config(CONFIGS / "tiny.yaml", ["train.offload_optimizer=true", "train.zero_stage=0"]), 1, False)


def test_flat_params_cover_the_tree():
    params = flat_params(load_config(CONFIGS / "demo.yaml"))
    assert params["adapter.method"] == "mtl_lora" and params["train.zero_stage"] == "2"


def test_optimizer_groups_follow_the_method():
    from training.ds_config import group_lrs

    mtl = load_config(CONFIGS / "tiny.yaml", ["train.lr=1e-3", "train.task_lr=1e-2", "train.head_lr=5e-4"])
    assert group_lrs(mtl) == {"adapters": 1e-3, "task": 1e-2, "head": 5e-4}
    ds = deepspeed_config(mtl, 1, on_gpu=False)
    assert ds["scheduler"]["params"]["warmup_max_lr"] == [1e-3, 1e-2, 5e-4]
    lora = load_config(CONFIGS / "tiny.yaml", ["adapter.method=lora", "train.lr=1e-3"])
    assert group_lrs(lora) == {"adapters": 1e-3, "head": 1e-3}  # no per-scenario Λ, w: no task group
    with pytest.raises(ConfigError, match="train.task_lr: must be >= 0"):
        load_config(CONFIGS / "tiny.yaml", ["train.task_lr=-1"])


def test_a_task_only_warm_start_trains_the_new_task_parameters_at_ten_times_the_runs_lr_unless_told():
    """The new scenarios' Λ_t, w_t train at train.warm.task_lr_scale × the warm schedule's lr; train.task_lr,
    when set, wins; per-task LoRA's A_t, B_t stay at the run's lr."""
    from training.ds_config import group_lrs
    from training.warm_start import run_schedule

    def lrs(*extra):
        cfg = load_config(CONFIGS / "tiny.yaml", ["train.init_from=some/model", "train.adapt=task_only",
                                                  "train.lr=1e-3", *extra])
        return group_lrs(run_schedule(cfg, warm=True))

    assert lrs() == {"task": pytest.approx(1e-2)}
    assert lrs("train.warm.lr=2e-4") == {"task": pytest.approx(2e-3)}  # the warm schedule's lr, scaled
    assert lrs("train.warm.task_lr_scale=1") == {"task": pytest.approx(1e-3)}
    assert lrs("train.task_lr=5e-2") == {"task": pytest.approx(5e-2)}
    assert lrs("adapter.method=per_task_lora") == {"adapters": pytest.approx(1e-3)}
    with pytest.raises(ConfigError, match="train.warm.task_lr_scale: must be > 0"):
        lrs("train.warm.task_lr_scale=0")


@pytest.mark.parametrize("method", ["mtl_lora", "lora", "per_task_lora"])
def test_every_trainable_parameter_is_in_exactly_one_group(method):
    import torch

    from modeling.model import build_model, is_task_param
    from training.ds_config import build_optimizer, group_lrs

    cfg = load_config(CONFIGS / "tiny.yaml", [f"adapter.method={method}", "train.task_lr=7e-3"])
    model = build_model(cfg, num_tasks=3, dtype=torch.float32)
    opt = build_optimizer(model, cfg, on_gpu=False)
    assert [g["name"] for g in opt.param_groups] == list(group_lrs(cfg))
    grouped = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(grouped) == sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    for n, p in trainable.items():
        assert (grouped[id(p)] == "task") == is_task_param(n)


def test_a_config_shipped_with_the_package_loads_by_name_from_anywhere(tmp_path, monkeypatch):
    from kernel.config import config_path

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    for name in ("demo", "tiny", "smollm2"):
        assert config_path(name).read_bytes() == (CONFIGS / f"{name}.yaml").read_bytes()
        assert load_config(name) == load_config(CONFIGS / f"{name}.yaml")
    (tmp_path / "tiny").write_text("work_dir: mine\n")  # a file of that name wins over the shipped config
    assert load_config("tiny").work_dir == "mine"
    with pytest.raises(ConfigError, match="shipped with the package: demo, smollm2, tiny"):
        load_config("nope")


def test_a_warm_start_runs_its_fraction_of_the_schedule_unless_given_steps():
    """train.warm.steps=0 (the default): round(train.warm.fraction × train.max_steps), at least 1; explicit
    steps win; a run from scratch keeps its own schedule."""
    from training.warm_start import run_schedule

    def steps(warm=True, *extra):
        cfg = load_config(CONFIGS / "tiny.yaml", ["train.init_from=some/model", "train.max_steps=250", *extra])
        return run_schedule(cfg, warm=warm).train.max_steps

    assert steps() == 75  # 0.3 × 250
    assert steps(True, "train.warm.fraction=0.1") == 25
    assert steps(True, "train.warm.fraction=0.001") == 1
    assert steps(True, "train.warm.steps=40", "train.warm.fraction=0.1") == 40
    assert steps(False) == 250
    with pytest.raises(ConfigError, match="train.warm.fraction: must be > 0"):
        steps(True, "train.warm.fraction=0")
