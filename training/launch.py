"""Train MTL-LoRA with DeepSpeed ZeRO: one CPU process up to multi-GPU, multi-node.

One process (runs in this process; CPU with gloo, or one GPU):
    python -m training.launch --config configs/demo.yaml --data runs/demo/data
Several processes / GPUs / nodes (wraps the ``deepspeed`` launcher; CPU works too, with gloo):
    python -m training.launch --config configs/demo.yaml --num_gpus 2 train.zero_stage=3
    python -m training.launch --config X.yaml --num_nodes 2 --hostfile hosts --master_addr 10.0.0.1
Resume a killed run where it stopped (same out dir):
    python -m training.launch --config configs/demo.yaml --resume

Data is the ingested folder (train.parquet, valid.parquet; see ``python -m pipeline.ingest``); the default
is <work_dir>/data. Output goes to <work_dir>/train unless --out is given.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from kernel.config import Config, add_config_args, dump_config, load_config
from kernel.errors import RelevanceError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--data", help="ingested data folder (default: <work_dir>/data)")
    p.add_argument("--out", help="output folder (default: <work_dir>/train)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the out folder")
    p.add_argument("--num_gpus", type=int, default=None, help="processes per node (GPUs, or CPU processes)")
    p.add_argument("--num_nodes", type=int, default=None)
    p.add_argument("--hostfile", default=None)
    p.add_argument("--master_addr", default=None)
    p.add_argument("--master_port", type=int, default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _launcher_command(args: argparse.Namespace, resolved_config: Path) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    for flag in ("num_gpus", "num_nodes", "hostfile", "master_addr", "master_port"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag}", str(value)]
    cmd += ["--module", "training.launch", "--worker", "--config", str(resolved_config)]
    for flag in ("data", "out"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if args.resume:
        cmd.append("--resume")
    return cmd


def run(cfg: Config, data_dir: Path, out_dir: Path, resume: bool = False):
    """Train in this process (rank and world size come from the environment the launcher sets)."""
    from kernel.tracking import open_tracker
    from training.trainer import train

    rank = int(os.environ.get("RANK", 0))
    tracker = open_tracker(cfg, rank)
    run_id_file = out_dir / "mlflow_run_id"
    resume_run = resume and run_id_file.is_file()
    tracker.start(run_name=cfg.tracking.run_name or Path(cfg.work_dir).name,
                  run_id=run_id_file.read_text().strip() if resume_run else None)
    if rank == 0 and tracker.run_id:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(tracker.run_id)
    try:
        result = train(cfg, data_dir, out_dir, resume=resume, tracker=tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    try:
        cfg = load_config(args.config, args.overrides)
        data_dir = Path(args.data or Path(cfg.work_dir) / "data")
        out_dir = Path(args.out or Path(cfg.work_dir) / "train")
        multi = (args.num_gpus or 1) > 1 or (args.num_nodes or 1) > 1 or args.hostfile
        if multi and not args.worker:
            out_dir.mkdir(parents=True, exist_ok=True)
            resolved = out_dir / "launch_config.yaml"
            dump_config(cfg, resolved)
            return subprocess.call(_launcher_command(args, resolved))
        result = run(cfg, data_dir, out_dir, resume=args.resume)
    except RelevanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        best = result.best_metrics or {}
        print(f"best validation macro AUC {best.get('auc_macro')} after {result.steps} steps; model: {result.model_dir}")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
