"""Warm start and a new market on tiny random-init models, through real DeepSpeed, export and batch scoring.

The module trains one three-market model (de, jp, uk of the tiny synthetic data); each test continues it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from kernel.config import load_config
from kernel.errors import ConfigError, DataError
from kernel.task_map import TASK_MAP_FILE, TaskMap
from tests.shared import TINY_CONFIG as TINY

KNOWN, NEW = ["de", "jp", "uk"], "us"


def _markets(src: Path, dst: Path, names: list[str], train_rows: int | None = None) -> Path:
    """An ingested-data folder holding only ``names`` (the first ``train_rows`` training rows, if given)."""
    dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        t = pq.read_table(src / f"{split}.parquet")
        t = t.filter(pc.is_in(t["scenario"], value_set=pa.array(names)))
        pq.write_table(t.slice(0, train_rows) if split == "train" and train_rows else t, dst / f"{split}.parquet")
    TaskMap(names).save(dst / TASK_MAP_FILE)
    return dst


def _cfg(work: Path, *extra: str):
    return load_config(TINY, [f"work_dir={work}", "tracking.enabled=false", *extra])


@pytest.fixture(scope="module")
def one_rank():
    mp = pytest.MonkeyPatch()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29671", "DS_ACCELERATOR": "cpu"}.items():
        mp.setenv(k, v)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def markets(tiny_data_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("markets")
    return {"known": _markets(tiny_data_dir, root / "known", KNOWN),
            "new": _markets(tiny_data_dir, root / "new", [NEW], train_rows=48),  # a few labelled rows, one market
            "test": tiny_data_dir / "test.parquet", "root": root}


@pytest.fixture(scope="module")
def base(markets, one_rank) -> Path:
    """MTL-LoRA trained from scratch on the three known markets (its training output folder)."""
    from training.trainer import train

    out = markets["root"] / "base"
    train(_cfg(markets["root"], "train.max_steps=12"), markets["known"], out)
    return out


def test_task_map_is_only_ever_appended_to():
    tm = TaskMap(KNOWN)
    grown = tm.extended(["us", "de", "fr", "us"])
    assert grown.names == [*KNOWN, "us", "fr"] and all(grown.id_of(n) == i for i, n in enumerate(KNOWN))
    assert tm.extended(["jp", "de"]) is tm  # nothing new: the same map
    grown.check_extends(tm, "the starting model")
    for reordered in (["jp", "de", "uk", "us"], ["de", "uk"], ["de", "jp", "us", "uk"]):
        with pytest.raises(DataError, match="ids would change meaning"):
            TaskMap(reordered).check_extends(tm, "the starting model")


def test_task_only_trains_only_the_new_market_and_keeps_every_known_row_bitwise(base, markets, tmp_path, one_rank):
    """Only the new market's Λ_t and w_t train; every known market's weights are written bit for bit, even with
    the engine holding the frozen ones in bf16. (Through export and scoring: tests/test_new_market_job.py.)"""
    from training.trainer import train

    cfg = _cfg(tmp_path, f"train.init_from={base}", "train.adapt=task_only", "train.warm.steps=8",
               "train.task_lr=0.05", "train.precision=bf16")
    result = train(cfg, markets["new"], tmp_path / "train")
    before = load_file(str(base / "model" / "trainable.safetensors"))
    after = load_file(str(result.model_dir / "trainable.safetensors"))
    assert set(before) == set(after)
    grown = [k for k in before if before[k].shape != after[k].shape]
    assert grown and all(k.endswith((".lam", ".w")) for k in grown)  # only the per-task parameters grew
    for k, t in before.items():
        assert torch.equal(after[k][: t.shape[0]], t), k  # every known row, bit for bit
    moved = [k for k in grown if not torch.equal(after[k][3:], _fresh_new_rows(cfg, k))]
    assert moved  # the new market's own parameters trained away from their spec init
    assert TaskMap.load(result.model_dir / TASK_MAP_FILE).names == [*KNOWN, NEW]
    record = json.loads((result.model_dir / "start.json").read_text())
    assert record["path"] == str((base / "model").resolve()) and record["scenarios"] == KNOWN


def _fresh_new_rows(cfg, name: str) -> torch.Tensor:
    """What the new market's rows of parameter ``name`` were before training: a fresh build's (seeded) init."""
    from modeling.model import build_model

    return dict(build_model(cfg, len(KNOWN) + 1).named_parameters())[name].detach()[3:]


def test_per_task_lora_task_only_under_zero3(base, markets, tmp_path, one_rank):
    """Per-task LoRA appends a fresh A_t, B_t for the new market; under ZeRO-3 only those rows train."""
    from training.trainer import train

    scratch = _cfg(tmp_path, "adapter.method=per_task_lora", "train.max_steps=6", "train.zero_stage=3")
    start = train(scratch, markets["known"], tmp_path / "start")
    cfg = _cfg(tmp_path, "adapter.method=per_task_lora", "train.zero_stage=3", f"train.init_from={start.model_dir}",
               "train.adapt=task_only", "train.warm.steps=6", "train.warm.lr=0.05")
    result = train(cfg, markets["new"], tmp_path / "grown")
    before = load_file(str(start.model_dir / "trainable.safetensors"))
    after = load_file(str(result.model_dir / "trainable.safetensors"))
    for k, t in before.items():
        assert torch.equal(after[k][: t.shape[0]], t), k
    b_new = [after[k][3] for k in after if k.endswith(".B")]
    assert b_new and any(b.abs().max() > 0 for b in b_new)  # B_t starts at zero: the new market's trained


def test_warm_start_resumed_after_a_stop_matches_an_uninterrupted_one(base, markets, tmp_path, one_rank):
    """adapt=all on the new market's rows: stopped after a checkpoint and resumed == run straight through."""
    from training.trainer import Trainer

    def cfg(work):
        return _cfg(work, f"train.init_from={base}", "train.warm.steps=8", "train.checkpoint_every=4",
                    "train.eval_every=4")

    straight = Trainer(cfg(tmp_path / "a"), markets["new"], tmp_path / "a").setup().run()
    first = Trainer(cfg(tmp_path / "b"), markets["new"], tmp_path / "b").setup()
    for _ in range(4):
        first.step()
    first.record(first.evaluate())
    first.save_checkpoint()  # then the process "stops"
    resumed = Trainer(cfg(tmp_path / "b"), markets["new"], tmp_path / "b").setup(resume=True)
    assert resumed.global_step == 4 and resumed.start.record == first.start.record
    result = resumed.run()
    assert result.steps == straight.steps == 8
    sa, sb = (load_file(str(r.model_dir / "trainable.safetensors")) for r in (straight, result))
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=0)


def test_what_a_warm_start_refuses(base, markets, tmp_path, one_rank):
    from training.trainer import train

    with pytest.raises(ConfigError, match="adapter.r: 4 -> 8"):  # another architecture: every key named
        train(_cfg(tmp_path, f"train.init_from={base}", "adapter.r=8"), markets["new"], tmp_path / "r8")
    with pytest.raises(ConfigError, match="no scenario the starting model does not know"):
        train(_cfg(tmp_path, f"train.init_from={base}", "train.adapt=task_only"), markets["known"], tmp_path / "same")
    with pytest.raises(ConfigError, match="adapter.method lora has none"):
        _cfg(tmp_path, f"train.init_from={base}", "train.adapt=task_only", "adapter.method=lora")
    with pytest.raises(ConfigError, match="pin the method"):
        _cfg(tmp_path, f"train.init_from={base}", "train.adapt=task_only", "train.compare=[mtl_lora, lora]")
    with pytest.raises(ConfigError, match="not a trained-model folder"):
        train(_cfg(tmp_path, f"train.init_from={markets['known']}"), markets["new"], tmp_path / "nothing")

def test_a_model_that_gains_a_task_computes_each_known_tasks_factors_bit_for_bit():
    """Task t's factors U_t, A must not depend on how many tasks the model holds (a GEMM's rounding may depend on
    its row count): a model that gains a scenario then scores the known ones exactly as before."""
    from modeling.inject import adapter_layers
    from modeling.warm_start import load_start
    from tests.shared import BERT, randomize_adapters, tiny_adapted_model

    small = tiny_adapted_model(BERT, "mean", ["query", "value"], 3)
    randomize_adapters(small)
    grown = tiny_adapted_model(BERT, "mean", ["query", "value"], 5)
    load_start(grown, {n: p.detach().clone() for n, p in small.named_parameters() if p.requires_grad}, 3)
    for name, layer in adapter_layers(small).items():
        other = adapter_layers(grown)[name]
        for t in range(3):
            assert all(torch.equal(x, y) for x, y in zip(layer.lora_pair(t), other.lora_pair(t))), (name, t)



def test_shared_lora_continues_its_own_model_under_zero1(base, markets, tmp_path, one_rank):
    """LoRA has no per-scenario parameters: a new market is served by its one update, fine-tuned (adapt=all)."""
    from training.trainer import Trainer, train

    stage = 1
    start = train(_cfg(tmp_path, "adapter.method=lora", "train.max_steps=4", f"train.zero_stage={stage}"),
                  markets["known"], tmp_path / "start")
    cfg = _cfg(tmp_path, "adapter.method=lora", f"train.zero_stage={stage}", f"train.init_from={start.model_dir}",
               "train.warm.steps=3")
    trainer = Trainer(cfg, markets["new"], tmp_path / "grown").setup()
    state = load_file(str(start.model_dir / "trainable.safetensors"))
    live = trainer.gathered_trainable_state()
    assert set(live) == set(state) and all(torch.equal(live[k], state[k]) for k in state)  # starts where it was
    assert trainer.task_map.names == [*KNOWN, NEW] and trainer.run().steps == 3


def test_compare_warm_starts_the_method_of_the_starting_model_only(base, tmp_path, caplog):
    from job.steps import JobContext, JobPaths
    from job.warm import compare_configs

    caplog.set_level("INFO", logger="job.warm")  # alone, no CLI has set the log level yet: WARNING
    cfg = _cfg(tmp_path, f"train.init_from={base}", "train.compare=[mtl_lora, lora]")
    configs = compare_configs(JobContext(JobPaths(cfg), {}, lineage=None), resume=False)
    assert configs["mtl_lora"].train.init_from == str(base) and configs["mtl_lora"].adapter.method == "mtl_lora"
    assert configs["lora"].train.init_from == "" and configs["lora"].adapter.method == "lora"
    assert any("lora trains from scratch" in r.getMessage() for r in caplog.records)


def test_adapt_all_on_data_without_a_known_scenario_warns_that_they_will_move(caplog):
    from training.warm_start import warn_if_known_absent

    with caplog.at_level("WARNING", logger="training.warm_start"):
        message = warn_if_known_absent("all", ["de", "jp"], ["fr"])
        assert warn_if_known_absent("all", ["de", "jp"], ["fr", "jp"]) is None  # a known market trains too
        assert warn_if_known_absent("task_only", ["de", "jp"], ["fr"]) is None  # they cannot move
    assert [r.getMessage() for r in caplog.records] == [message]
    assert "de, jp" in message and "fr alone" in message and "train.adapt=task_only" in message
