"""Training through real DeepSpeed on CPU: 1 process, 2 processes (ZeRO-2/3) via the launcher, resume, NaN."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from kernel.config import load_config
from kernel.errors import TrainingDiverged
from tests.shared import REPO as ROOT
from tests.shared import TINY_CONFIG as TINY
from tests.shared import log_message, log_messages


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir) -> Path:
    return tiny_data_dir


def _env(port: int) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", MASTER_PORT=str(port))


def _launch(args: list[str], port: int, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.launch", "--config", str(TINY), *args],
                            cwd=ROOT, env=_env(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(args: list[str], port: int, timeout: int = 240) -> str:
    proc = _launch(args, port)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_one_process_trains_tracks_and_freezes_base(tmp_path, data_dir):
    work = tmp_path / "w"
    _run([f"work_dir={work}", "--data", str(data_dir)], port=29601)
    model_dir = work / "train" / "model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    scenarios = json.loads((model_dir / "task_map.json").read_text())["scenarios"]
    assert set(metrics["scenarios"]) == set(scenarios) and len(scenarios) >= 4
    # Only adapter and head parameters are saved (and trained).
    state = load_file(str(model_dir / "trainable.safetensors"))
    assert state and all(k.endswith((".A", ".B", ".lam", ".w")) or k.startswith("head.") for k in state)
    # B starts at zero: a trained B is non-zero, i.e. the adapter learned something.
    assert any(k.endswith(".B") and v.abs().sum() > 0 for k, v in state.items())
    # MLflow: per-scenario AUC, macro AUC, params, config artifacts, commit and data fingerprint.
    client = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
    run_id = (work / "train" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    for s in scenarios:
        assert f"val/auc/{s}" in run.data.metrics
    assert "val/auc_macro" in run.data.metrics
    assert run.data.params["adapter.method"] == "mtl_lora"
    assert run.data.metrics["params/adapter"] == run.data.metrics["params/adapter_expected"]
    assert run.data.tags["git_commit"] and len(run.data.tags["data_fingerprint"]) == 16
    artifacts = {a.path for a in client.list_artifacts(run_id, "config")}
    assert {"config/config.yaml", "config/ds_config.json"} <= artifacts


def test_two_processes_through_the_deepspeed_launcher(tmp_path, data_dir):
    stage = 3
    """2 CPU processes (gloo) via the real launcher; the gathered model reproduces its own metrics."""
    work = tmp_path / "w"
    _run(["--num_gpus", "2", "--master_port", str(29610 + stage), f"work_dir={work}", "--data", str(data_dir),
          f"train.zero_stage={stage}", "tracking.enabled=false", "train.max_steps=10", "train.eval_every=5"],
         port=29610 + stage)
    model_dir = work / "train" / "model"
    saved = json.loads((model_dir / "metrics.json").read_text())
    # Reload the (ZeRO-gathered) folder in one plain process and evaluate: the same per-scenario AUCs.
    import pyarrow.parquet as pq

    from features.tokenize import build_features
    from modeling.artifact import load_trained
    from modeling.base import load_tokenizer
    from training.evaluate import evaluate

    cfg, task_map, model = load_trained(model_dir)
    tok = load_tokenizer(cfg)
    valid = build_features(pq.read_table(data_dir / "valid.parquet"), tok, task_map, cfg.features.max_length)
    again = evaluate(model, valid, task_map, 64, tok.pad_token_id, torch.device("cpu"))
    assert again["n"] == saved["n"] == len(valid)  # every example counted exactly once across ranks
    for s, m in saved["scenarios"].items():
        assert again["scenarios"][s]["auc"] == pytest.approx(m["auc"], abs=1e-5)


def test_two_nodes_without_ssh_match_one_process(tmp_path, data_dir):
    """Two node launchers on 127.0.0.1 (--node_rank 0 and 1, one process each, ZeRO-2) train exactly what one
    process does at the same global batch (dropout off: masks depend on the world size)."""
    common = ["--data", str(data_dir), "tracking.enabled=false", "train.max_steps=6", "train.eval_every=6",
              "train.zero_stage=2", "model.random_config.hidden_dropout_prob=0.0",
              "model.random_config.attention_probs_dropout_prob=0.0"]
    _run([f"work_dir={tmp_path / 'one'}", *common, "train.micro_batch_size=16"], port=29651)
    port = 29652
    nodes = [_launch([f"work_dir={tmp_path / 'two'}", *common, "train.micro_batch_size=8", "--num_nodes", "2",
                      "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)], port)
             for rank in (0, 1)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    one = load_file(str(tmp_path / "one" / "train" / "model" / "trainable.safetensors"))
    two = load_file(str(tmp_path / "two" / "train" / "model" / "trainable.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4)
    m1 = json.loads((tmp_path / "one" / "train" / "model" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "train" / "model" / "metrics.json").read_text())
    assert m2["auc_macro"] == pytest.approx(m1["auc_macro"], abs=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--num_gpus", "0"], "--num_gpus 0"),
    (["--num_nodes", "2"], "--node_rank N on each node"),
    (["--num_nodes", "2", "--node_rank", "2"], "--node_rank 2: must be in [0, 2)"),
    (["--hostfile", "MISSING"], "no such file"),
    (["--hostfile", "BAD"], "line 2"),
    (["--num_nodes", "3", "--hostfile", "GOOD"], "lists only 2 hosts"),
])
def test_launcher_arguments_are_checked_before_anything_starts(tmp_path, capsys, monkeypatch, args, message):
    from training.launch import main

    for var in ("NNODES", "NODE_RANK", "SLURM_NNODES", "SLURM_NODEID"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "BAD").write_text("node0 slots=1\nnode1 slots=two\n")
    (tmp_path / "GOOD").write_text("node0 slots=1\nnode1 slots=1\n")
    args = [str(tmp_path / a) if a in ("MISSING", "BAD", "GOOD") else a for a in args]
    assert main(["--config", str(TINY), f"work_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, data_dir):
    """Weights, best checkpoint, validation history and the MLflow record of a run killed with -9 and resumed
    equal an uninterrupted run's. The kill comes right after the step-16 evaluation was logged, with the last
    checkpoint at step 12: the resumed run replays step 16 and must not log its metrics a second time."""
    common = ["--data", str(data_dir), "train.max_steps=40", "train.checkpoint_every=12", "train.eval_every=8",
              "train.keep_checkpoints=3"]
    _run([f"work_dir={tmp_path / 'a'}", *common], port=29621)
    b = tmp_path / "b"
    proc = _launch([f"work_dir={b}", *common], port=29622)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if log_message(line) is not None and log_message(line).startswith("step 16 val"):
            proc.send_signal(signal.SIGSTOP)  # frozen right here (checkpoint 24 is 8 steps away)
            break
    else:
        pytest.fail("the run ended without logging its step-16 evaluation:\n" + "".join(seen)[-3000:])
    assert proc.poll() is None, "".join(seen)[-3000:]
    # Network hygiene: a one-process CPU run listens on loopback only (rendezvous store, gloo), never on *.
    listening = listening_addresses(proc.pid)
    assert listening and all(ip.is_loopback for ip, _ in listening), listening
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert _latest_step(b) == 12
    out = _run([f"work_dir={b}", *common, "--resume"], port=29623)
    assert "resumed from" in out
    ma = json.loads((tmp_path / "a" / "train" / "model" / "metrics.json").read_text())
    mb = json.loads((b / "train" / "model" / "metrics.json").read_text())
    assert ma["step"] == mb["step"]
    for s in ma["scenarios"]:
        assert mb["scenarios"][s]["auc"] == pytest.approx(ma["scenarios"][s]["auc"], abs=1e-4)
    # The same validation history, evaluation by evaluation (each one read the weights of its own step).
    ha = json.loads((tmp_path / "a" / "train" / "history.json").read_text())
    hb = json.loads((b / "train" / "history.json").read_text())
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [8, 16, 24, 32, 40]
    for ea, eb in zip(ha, hb):
        for s in ea["scenarios"]:
            assert eb["scenarios"][s]["auc"] == pytest.approx(ea["scenarios"][s]["auc"], abs=1e-6), ea["step"]
    # Same data in the same order ⇒ the same trained weights (fp32 on CPU: tight tolerance).
    sa = load_file(str(tmp_path / "a" / "train" / "model" / "trainable.safetensors"))
    sb = load_file(str(b / "train" / "model" / "trainable.safetensors"))
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-4)
    # The MLflow record: every val/* and train/* history on the server equals the uninterrupted run's,
    # one point per step (the values too, but for throughput, which is a timing).
    histories = {}
    for work in (tmp_path / "a", b):
        client = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
        run_id = (work / "train" / "mlflow_run_id").read_text().strip()
        keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(("val/", "train/"))]
        histories[work.name] = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
                                for k in keys}
    ha, hb = histories["a"], histories["b"]
    assert ha.keys() == hb.keys() and "val/auc_macro" in ha and "train/loss" in ha
    assert [s for s, _ in hb["val/auc_macro"]] == [8, 16, 24, 32, 40]
    for key in ha:
        assert [s for s, _ in hb[key]] == [s for s, _ in ha[key]], key  # no duplicate point, none missing
        if key != "train/samples_per_s":
            assert [v for _, v in hb[key]] == pytest.approx([v for _, v in ha[key]], abs=1e-5), key


def listening_addresses(pid: int) -> list[tuple]:
    """(ip address, port) of every TCP socket the process listens on, read from /proc (Linux)."""
    import ipaddress

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as host-order 32-bit words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.append((ipaddress.ip_address(raw), int(hex_port, 16)))
    return out


def _latest_step(work: Path) -> int:
    """The step of the newest complete checkpoint (DeepSpeed writes ``latest`` after the files)."""
    latest = work / "train" / "checkpoints" / "latest"
    return int(latest.read_text().strip()[4:]) if latest.is_file() else -1


def _one_in_process_rank(monkeypatch, port: int) -> None:
    """The environment of a 1-process world, so that ``training.trainer.train`` runs inside the test."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path, data_dir, monkeypatch):
    from training.trainer import train

    _one_in_process_rank(monkeypatch, port=29631)
    cfg = load_config(TINY, [f"work_dir={tmp_path}", "tracking.enabled=false", "train.lr=1e30",
                             "train.grad_clip=0.0", "train.warmup_steps=0", "train.checkpoint_every=1",
                             "train.max_steps=50", "train.eval_every=100"])
    with pytest.raises(TrainingDiverged, match="last good checkpoint: step"):
        train(cfg, data_dir, tmp_path / "train")
    assert (tmp_path / "train" / "checkpoints" / "latest").is_file()


def test_task_lr_drives_only_the_per_scenario_parameters(tmp_path, data_dir, monkeypatch):
    """Λ_t and w_t sit in their own optimizer group: at a ~0 task lr they keep their init while A, B train."""
    from modeling.artifact import load_trained
    from modeling.model import build_model, is_task_param
    from training.trainer import train

    _one_in_process_rank(monkeypatch, port=29632)
    cfg = load_config(TINY, [f"work_dir={tmp_path}", "tracking.enabled=false", "train.task_lr=1e-12",
                             "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6",
                             "train.activation_checkpointing=true"])  # also runs the trainer's checkpointed path
    train(cfg, data_dir, tmp_path / "train")
    _, task_map, _ = load_trained(tmp_path / "train" / "model")
    torch.manual_seed(cfg.train.seed)  # the trainer seeds the same way before it builds the model
    init = {n: p.detach() for n, p in build_model(cfg, len(task_map), dtype=torch.float32).named_parameters()}
    trained = load_file(str(tmp_path / "train" / "model" / "trainable.safetensors"))
    task = [k for k in trained if is_task_param(k)]
    shared_a = [k for k in trained if k.endswith(".A")]
    assert task and shared_a
    for k in task:
        torch.testing.assert_close(trained[k], init[k], atol=1e-8, rtol=0)
    assert all((trained[k] - init[k]).abs().max() > 1e-4 for k in shared_a)
    # The quality diagnostic sees the same: no routing change, Λ_t still the identity.
    from benchmarks.task_params import describe

    moved = describe(tmp_path / "train" / "model")
    assert moved["w_moved_max"] < 1e-8 and moved["p_moved_max"] < 1e-6
    assert moved["lambda_from_identity_max"] < 1e-6


# --- evaluation reads the live weights (DeepSpeed writes them through .data) ------------------------------

def _fresh_logits(cfg, trainer) -> torch.Tensor:
    """Logits on the validation rows of a newly built model loaded with the trainer's current weights."""
    import numpy as np

    from modeling.model import build_model
    from training.evaluate import predict

    fresh = build_model(cfg, len(trainer.task_map), dtype=torch.float32)
    fresh.load_state_dict(trainer.gathered_trainable_state(), strict=False)
    fresh.eval()
    rows = np.arange(len(trainer.valid_set))
    return torch.from_numpy(predict(fresh, trainer.valid_set, rows, 32, trainer.pad_id, torch.device("cpu")))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_evaluation_after_steps_equals_a_fresh_model_with_the_same_weights(tmp_path, data_dir, monkeypatch, stage):
    """Validation after k ZeRO steps sees the stepped weights, not factors cached by an earlier validation."""
    import numpy as np

    from training.evaluate import predict
    from training.trainer import Trainer

    _one_in_process_rank(monkeypatch, port=29640 + stage)
    cfg = load_config(TINY, [f"work_dir={tmp_path}", "tracking.enabled=false", f"train.zero_stage={stage}",
                             "train.max_steps=20", "train.warmup_steps=0"])
    trainer = Trainer(cfg, data_dir, tmp_path / "train").setup()
    rows = np.arange(len(trainer.valid_set))

    def live_logits() -> torch.Tensor:
        trainer.model.eval()
        out = predict(trainer.model, trainer.valid_set, rows, 32, trainer.pad_id, torch.device("cpu"))
        trainer.model.train()
        return torch.from_numpy(out)

    before = live_logits()  # the first validation of the run fills the adapters' factor caches
    for _ in range(3):
        trainer.step()
    after = live_logits()
    assert (after - before).abs().max() > 1e-4  # the steps changed the model's scores
    torch.testing.assert_close(after, _fresh_logits(cfg, trainer), atol=1e-6, rtol=0)
    metrics = trainer.evaluate()
    assert metrics["auc_macro"] is not None and metrics["scenarios_total"] == len(trainer.task_map)


def test_step_10_metrics_do_not_depend_on_how_often_validation_ran(tmp_path, data_dir, monkeypatch):
    from training.trainer import train

    _one_in_process_rank(monkeypatch, port=29644)
    histories = {}
    for every in (5, 10):
        cfg = load_config(TINY, [f"work_dir={tmp_path / str(every)}", "tracking.enabled=false",
                                 "train.max_steps=10", f"train.eval_every={every}", "train.checkpoint_every=10"])
        histories[every] = train(cfg, data_dir, tmp_path / str(every) / "train").history
    assert [h["step"] for h in histories[5]] == [5, 10] and [h["step"] for h in histories[10]] == [10]
    a, b = histories[5][-1], histories[10][-1]
    assert a["auc_macro"] == pytest.approx(b["auc_macro"], abs=1e-9)
    for s in a["scenarios"]:
        assert a["scenarios"][s]["auc"] == pytest.approx(b["scenarios"][s]["auc"], abs=1e-9)
        assert a["scenarios"][s]["log_loss"] == pytest.approx(b["scenarios"][s]["log_loss"], abs=1e-7)


# --- the tracking server going away -----------------------------------------------------------------------

def test_an_unreachable_tracking_server_fails_fast_with_one_line(tmp_path, data_dir):
    t0 = time.time()
    proc = _launch([f"work_dir={tmp_path}", "--data", str(data_dir), "tracking.uri=http://127.0.0.1:1",
                    "tracking.timeout_s=3"], port=29661)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 5, out[-3000:]  # kernel.exit_codes.SERVICE_UNAVAILABLE
    errors = [m for m in log_messages(out) if m.startswith("error:")]
    assert len(errors) == 1 and "http://127.0.0.1:1" in errors[0] and "Traceback" not in out
    assert time.time() - t0 < 60


def test_training_rides_out_a_tracking_server_outage(tmp_path, data_dir):
    """The real server is killed (its process group) mid-run: training goes on at full speed, and once the
    server is back every metric arrives, with the run finished and its model artifact."""
    from tests.mlflow_testkit import MlflowServer

    server = MlflowServer(tmp_path / "server")
    uri = server.start()
    proc = _launch([f"work_dir={tmp_path / 'w'}", "--data", str(data_dir), f"tracking.uri={uri}",
                    "tracking.timeout_s=2", "tracking.flush_timeout_s=180", "train.max_steps=60",
                    "train.eval_every=20", "train.checkpoint_every=60"], port=29662)
    lines = []
    for line in proc.stdout:  # wait until training is under way, then take the server away
        lines.append(line)
        if (log_message(line) or "").startswith("step 10/"):
            break
    server.stop()
    t_down = time.time()
    for line in proc.stdout:
        lines.append(line)
        if (log_message(line) or "").startswith(("best validation", "step 60 val")):
            break
    assert time.time() - t_down < 60, "training stalled while the tracking server was down"
    assert proc.poll() is None  # done training, waiting for the server to deliver the spooled records
    server.start()
    try:
        out = "".join(lines) + proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, out[-3000:]
        client = MlflowClient(tracking_uri=uri)
        run_id = (tmp_path / "w" / "train" / "mlflow_run_id").read_text().strip()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == [1, *range(10, 61, 10)]
        assert sorted(m.step for m in client.get_metric_history(run_id, "val/auc_macro")) == [20, 40, 60]
        assert any(a.path == "model" for a in client.list_artifacts(run_id))
        assert not list((tmp_path / "w" / "tracking_spool").glob("*.jsonl"))  # all delivered
    finally:
        server.stop()


def test_task_warmup_holds_lambda_and_w_at_their_init_then_trains_them(tmp_path, data_dir, monkeypatch):
    """train.task_warmup_steps=3: after 3 steps Λ_t and w_t are still their init (A and B moved); by 6 they moved."""
    from modeling.model import is_task_param
    from training.trainer import Trainer

    _one_in_process_rank(monkeypatch, port=29671)
    cfg = load_config(TINY, [f"work_dir={tmp_path}", "tracking.enabled=false", "train.task_warmup_steps=3",
                             "train.max_steps=6", "train.warmup_steps=0"])
    trainer = Trainer(cfg, data_dir, tmp_path / "train").setup()
    init = trainer.gathered_trainable_state()
    for _ in range(3):
        trainer.step()
    held = trainer.gathered_trainable_state()
    task = [k for k in init if is_task_param(k)]
    assert task and all(torch.equal(held[k], init[k]) for k in task)
    assert any(not torch.equal(held[k], init[k]) for k in init if k.endswith(".B"))
    for _ in range(3):
        trainer.step()
    moved = trainer.gathered_trainable_state()
    assert all((moved[k] - init[k]).abs().max() > 0 for k in task)
