"""training.diagnostics (logged by the trainer, read by the quality benchmark), against direct recomputation.

Mixing entropy, sharing of the B_i and Λ drift of known parameters; the aggregate over every layer; gradient
norms per optimizer group through a real DeepSpeed engine (ZeRO 0-3 on CPU) against plain autograd; the
trainer's logging cadence.
"""
from __future__ import annotations

import pytest

from kernel.config import load_config
from modeling.model import build_model
from tests.shared import TINY_CONFIG as TINY


def _entropy_of(p) -> list[float]:
    import math

    return [-sum(x * math.log(x) for x in row if x > 0) for row in p]


def _tiny_layer(**kw):
    import torch

    from modeling.mtl_lora import MTLLoRALinear, TaskRouter

    torch.manual_seed(0)
    return MTLLoRALinear(torch.nn.Linear(6, 5), num_tasks=3, router=TaskRouter(3), r=2, **kw)


def test_mixing_entropy_sharing_and_lambda_drift_of_known_parameters():
    import math

    import torch

    from training.diagnostics import lambda_drift, mixing_entropy, sharing

    layer = _tiny_layer(n_up=3, tau=0.5)
    with torch.no_grad():
        layer.w.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [9.0, 0.0, 0.0]]))
    p = torch.softmax(layer.w.detach() / 0.5, dim=-1).tolist()
    h, h_max = mixing_entropy(layer)
    assert h_max == pytest.approx(math.log(3))
    assert h.tolist() == pytest.approx(_entropy_of(p), abs=1e-6)
    assert h[0].item() == pytest.approx(math.log(3), abs=1e-6) and h[2].item() < 1e-6  # uniform, ~one-hot
    share = sharing(layer)
    load = [sum(p[t][i] for t in range(3)) for i in range(3)]
    eff = [load[i] ** 2 / sum(p[t][i] ** 2 for t in range(3)) for i in range(3)]
    assert share["load"].tolist() == pytest.approx(load, abs=1e-6) and sum(load) == pytest.approx(3.0)
    assert share["tasks_eff"].tolist() == pytest.approx(eff, abs=1e-5)
    with torch.no_grad():  # every task one-hot on its own B_i: per-scenario routing, one task per B_i
        layer.w.copy_(torch.eye(3) * 50)
    assert sharing(layer)["tasks_eff"].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert mixing_entropy(layer)[0].max().item() < 1e-6
    # Λ drift: identity init is 0; a known change is ||Λ_t - I||_F / ||I||_F.
    assert lambda_drift(layer).tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        layer.lam[1] += torch.tensor([[0.3, 0.0], [0.4, 0.0]])
    assert lambda_drift(layer).tolist() == pytest.approx([0.0, 0.5 / math.sqrt(2), 0.0], abs=1e-6)
    diag = _tiny_layer(n_up=2, lambda_type="diagonal")
    with torch.no_grad():
        diag.lam[2] = torch.tensor([1.0, 4.0])
    assert lambda_drift(diag).tolist() == pytest.approx([0.0, 0.0, 3.0 / math.sqrt(2)], abs=1e-6)
    one = _tiny_layer(n_up=1)
    assert mixing_entropy(one)[1] == 0.0 and mixing_entropy(one)[0].tolist() == [0.0] * 3
    with pytest.raises(ValueError, match="only mtl_lora"):
        mixing_entropy(_tiny_layer(method="lora"))


def test_adapter_diagnostics_aggregate_every_layer():
    import torch

    from modeling.inject import adapter_layers
    from training.diagnostics import adapter_diagnostics

    cfg = load_config(TINY, ["adapter.targets=[bert_all]"])
    model = build_model(cfg, 4)
    names = ["a", "b", "c", "d"]
    got = adapter_diagnostics(model, names)
    layers = list(adapter_layers(model).values())
    p = torch.stack([layer.mixing_weights() for layer in layers])  # (layers, T, n)
    h = torch.tensor([_entropy_of(x.tolist()) for x in p])  # (layers, T)
    assert got["diag/layers"] == len(layers) == 12
    assert got["diag/entropy_mean"] == pytest.approx(h.mean().item(), abs=1e-6)
    assert got["diag/entropy_min"] == pytest.approx(h.min().item(), abs=1e-6)
    assert got["diag/entropy_frac"] == pytest.approx(h.mean().item() / torch.log(torch.tensor(3.0)).item(), abs=1e-6)
    assert got["diag/entropy/c"] == pytest.approx(h[:, 2].mean().item(), abs=1e-6)
    assert got["diag/top_p_mean"] == pytest.approx(p.max(-1).values.mean().item(), abs=1e-6)
    assert got["diag/shared_top_layers"] == sum(len(set(x.argmax(-1).tolist())) == 1 for x in p)
    eff = p.sum(1) ** 2 / (p ** 2).sum(1)  # (layers, n)
    assert got["diag/tasks_eff_mean"] == pytest.approx(eff.mean().item(), abs=1e-5)
    assert 1.0 <= got["diag/tasks_eff_min"] <= got["diag/tasks_eff_mean"] <= 4.0
    assert got["diag/lambda_drift_mean"] == got["diag/lambda_drift_max"] == 0.0  # Λ_t = I at init
    assert got["diag/b_norm_mean"] == 0.0  # B = 0 at init
    lora = adapter_diagnostics(build_model(load_config(TINY, ["adapter.method=lora"]), 4))
    assert set(lora) == {"diag/layers", "diag/b_norm_mean"}  # no routing to describe


def _one_in_process_rank(monkeypatch, port: int) -> None:
    """The environment of a 1-process world, so that the trainer's DeepSpeed engine runs inside the test."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)


def _plain_grad_norms(cfg, trainer, batch) -> dict[str, float]:
    """Gradient norms per optimizer group of a plain torch replica of the engine's model on ``batch``."""
    import math

    import torch
    import torch.nn.functional as F

    from training.diagnostics import param_group

    fresh = build_model(cfg, len(trainer.task_map), dtype=torch.float32)
    fresh.load_state_dict(trainer.gathered_trainable_state(), strict=False)
    fresh.train()
    logits = fresh(batch["input_ids"], batch["attention_mask"], batch["task_ids"], batch.get("token_type_ids"))
    F.binary_cross_entropy_with_logits(logits, batch["labels"]).backward()
    sq: dict[str, float] = {}
    for name, p in fresh.named_parameters():
        if p.requires_grad and p.grad is not None:
            sq[param_group(name)] = sq.get(param_group(name), 0.0) + p.grad.double().square().sum().item()
    return {g: math.sqrt(v) for g, v in sq.items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_grad_norms_through_a_deepspeed_engine_match_plain_torch(tmp_path, tiny_data_dir, monkeypatch, stage):
    """Between backward and step, per optimizer group, ZeRO 0-3 on CPU: the same norms as plain autograd."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tests.shared import NO_DROPOUT
    from training.diagnostics import adapter_diagnostics, grad_norms
    from training.ds_config import build_optimizer
    from training.trainer import Trainer

    _one_in_process_rank(monkeypatch, port=29670 + stage)
    cfg = load_config(TINY, [f"work_dir={tmp_path}", "tracking.enabled=false", f"train.zero_stage={stage}",
                             *[f"model.random_config.{k}={v}" for k, v in NO_DROPOUT.items()]])
    trainer = Trainer(cfg, tiny_data_dir, tmp_path / "train").setup()
    batch = trainer.train_set.collate(np.arange(16), trainer.pad_id)
    assert len(set(batch["task_ids"].tolist())) > 1  # a mixed-task batch
    expected = _plain_grad_norms(cfg, trainer, batch)
    # The diagnostics' groups are the optimizer's groups.
    groups = {g["name"]: {id(p) for p in g["params"]} for g in build_optimizer(trainer.model, cfg, False).param_groups}
    assert set(groups) == set(expected) == {"adapters", "task", "head"}
    logits = trainer.engine(batch["input_ids"], batch["attention_mask"], batch["task_ids"], batch.get("token_type_ids"))
    trainer.engine.backward(F.binary_cross_entropy_with_logits(logits.float(), batch["labels"]))
    got = grad_norms(trainer.engine)
    for g, norm in expected.items():
        assert got[f"diag/grad_norm/{g}"] == pytest.approx(norm, rel=1e-4), (stage, g)
    assert got["diag/grad_norm/total"] == pytest.approx(sum(v * v for v in expected.values()) ** 0.5, rel=1e-4)
    assert got["diag/grad_norm/adapters"] > 0 and got["diag/grad_norm/task"] == 0.0  # B = 0: no Λ, w gradient yet
    trainer.engine.step()
    # Parameter diagnostics read the engine's (ZeRO-gathered) weights: equal to a replica's.
    fresh = build_model(cfg, len(trainer.task_map), dtype=torch.float32)
    fresh.load_state_dict(trainer.gathered_trainable_state(), strict=False)
    live, replica = adapter_diagnostics(trainer.model), adapter_diagnostics(fresh)
    assert live.keys() == replica.keys()
    for k in live:
        assert live[k] == pytest.approx(replica[k], abs=1e-6), k


class _Recorder:
    """A tracker that keeps every logged metric: (step, key) -> value."""

    run_id = None

    def __init__(self):
        self.metrics: dict[tuple, float] = {}

    def log_metrics(self, metrics, step=None, **_):
        self.metrics.update({(step, k): v for k, v in metrics.items()})

    def __getattr__(self, name):  # params, tags, artifacts: not needed here
        return lambda *a, **k: None


def test_trainer_logs_diagnostics_at_init_and_at_the_cadence_only_when_on(tmp_path, tiny_data_dir, monkeypatch):
    import torch

    from training.diagnostics import adapter_diagnostics
    from training.trainer import train

    _one_in_process_rank(monkeypatch, port=29676)
    common = [f"work_dir={tmp_path}", "tracking.enabled=false", "train.max_steps=6", "train.eval_every=6",
              "train.checkpoint_every=6", "train.grad_accum=2"]
    on = _Recorder()
    cfg = load_config(TINY, [*common, "train.diagnostics_every=4"])
    train(cfg, tiny_data_dir, tmp_path / "on", tracker=on)
    diag_steps = sorted({s for s, k in on.metrics if k.startswith("diag/")})
    assert diag_steps == [0, 4, 6]  # init, the cadence, the final weights
    assert {s for s, k in on.metrics if k.startswith("diag/grad_norm/")} == {0, 4}  # gradients before the updates
    # Step 0 describes the initial model: the trainer seeds torch with train.seed just before it builds.
    torch.manual_seed(cfg.train.seed)
    init = adapter_diagnostics(build_model(cfg, 4, dtype=torch.float32), ["de", "jp", "uk", "us"])
    for k, v in init.items():
        assert on.metrics[(0, k)] == pytest.approx(v, abs=1e-6), k
    assert on.metrics[(6, "diag/lambda_drift_mean")] > 0 and on.metrics[(0, "diag/lambda_drift_mean")] == 0
    off = _Recorder()
    train(load_config(TINY, common), tiny_data_dir, tmp_path / "off", tracker=off)
    assert off.metrics and not any(k.startswith("diag/") for _, k in off.metrics)
