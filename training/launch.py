"""Train MTL-LoRA with DeepSpeed ZeRO: one CPU process up to multi-GPU, multi-node.

One process (runs in this process; CPU with gloo, or one GPU):
    python -m training.launch --config configs/demo.yaml --data runs/demo/data
Several processes / GPUs on this machine (wraps the ``deepspeed`` launcher; CPU works too, with gloo):
    python -m training.launch --config configs/demo.yaml --num_gpus 2 train.zero_stage=3
Several nodes, one launcher per node, no ssh (Kubernetes, Slurm, or by hand); every node runs the same line
with its own rank, and rank 0's address is the rendezvous:
    python -m training.launch --config X.yaml --num_nodes 2 --node_rank 0 --num_gpus 8 --master_addr 10.0.0.1
    python -m training.launch --config X.yaml --num_nodes 2 --node_rank 1 --num_gpus 8 --master_addr 10.0.0.1
    # or from the environment: NNODES / NODE_RANK (torchrun, Kubernetes), SLURM_NNODES / SLURM_NODEID,
    # MASTER_ADDR / MASTER_PORT
Several nodes from one machine over ssh (needs passwordless ssh and pdsh):
    python -m training.launch --config X.yaml --num_nodes 2 --hostfile hosts --master_addr 10.0.0.1
Resume a killed run where it stopped (same out dir):
    python -m training.launch --config configs/demo.yaml --resume

Data is the ingested folder (train.parquet, valid.parquet, task_map.json; see ``python -m pipeline.ingest``);
the default is <work_dir>/data. Output goes to <work_dir>/train unless --out is given. Exit codes:
kernel.exit_codes (2: bad arguments or config, 5: tracking server unreachable, 7: training diverged,
8: no space left, a file-size limit or an unwritable path: the checkpoints are kept, rerun with --resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kernel import exit_codes, storage
from kernel.config import Config, add_config_args, dump_config, load_config
from kernel.errors import ConfigError
from kernel.hashing import file_digest
from kernel.logs import ENV_LEVEL, add_logging_args, logging_flags, setup_from_args
from kernel.stage import Outcome, stage_tracker
from kernel.tracking import open_tracker
from training.distributed import choose_accelerator

HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    add_logging_args(p)
    p.add_argument("--data", help="ingested data folder (default: <work_dir>/data)")
    p.add_argument("--out", help="output folder (default: <work_dir>/train)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the out folder")
    p.add_argument("--num_gpus", type=int, default=None, help="processes per node (GPUs, or CPU processes)")
    p.add_argument("--num_nodes", type=int, default=None, help="nodes (default: $NNODES, $SLURM_NNODES or 1)")
    p.add_argument("--node_rank", type=int, default=None,
                   help="this node's rank: one launcher per node, no ssh (default: $NODE_RANK or $SLURM_NODEID)")
    p.add_argument("--hostfile", default=None, help="'host slots=N' lines (ssh launch, or node list for --node_rank)")
    p.add_argument("--master_addr", default=None, help="rank 0's address (default: $MASTER_ADDR or 127.0.0.1)")
    p.add_argument("--master_port", type=int, default=None, help="rendezvous port (default: $MASTER_PORT or 29500)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


@dataclass
class Topology:
    """How many processes where: the launcher's arguments after defaults from the environment."""

    num_gpus: int
    num_nodes: int
    node_rank: int | None  # set: one launcher per node (no ssh)
    hostfile: Path | None
    master_addr: str
    master_port: int

    @property
    def multi(self) -> bool:
        return self.num_gpus > 1 or self.num_nodes > 1 or self.hostfile is not None


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip():
            try:
                return int(os.environ[name])
            except ValueError as e:
                raise ConfigError(f"${name}={os.environ[name]!r} is not an integer") from e
    return None


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile; ConfigError names the file and the bad line."""
    if not path.is_file():
        raise ConfigError(f"--hostfile {path}: no such file")
    hosts = []
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = HOSTFILE_LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise ConfigError(f"--hostfile {path}, line {i}: {raw!r} is not 'HOST slots=N' (N >= 1)")
        if m.group(1) in {h for h, _ in hosts}:
            raise ConfigError(f"--hostfile {path}, line {i}: host {m.group(1)!r} is listed twice")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise ConfigError(f"--hostfile {path}: lists no host")
    return hosts


def topology(args: argparse.Namespace) -> Topology:
    """Check the launcher's arguments before anything starts; every problem names the flag."""
    num_gpus = args.num_gpus if args.num_gpus is not None else 1
    num_nodes = args.num_nodes if args.num_nodes is not None else (_env_int("NNODES", "SLURM_NNODES") or 1)
    node_rank = args.node_rank if args.node_rank is not None else _env_int("NODE_RANK", "SLURM_NODEID")
    if num_nodes == 1 and args.node_rank is None:
        node_rank = None  # a single node needs no node rank, even if the environment carries one
    port = args.master_port if args.master_port is not None else (_env_int("MASTER_PORT") or 29500)
    addr = args.master_addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    hostfile = Path(args.hostfile) if args.hostfile else None
    if num_gpus < 1:
        raise ConfigError(f"--num_gpus {num_gpus}: need at least 1 process per node")
    if num_nodes < 1:
        raise ConfigError(f"--num_nodes {num_nodes}: need at least 1 node")
    if not 0 < port < 65536:
        raise ConfigError(f"--master_port {port}: not a TCP port")
    if hostfile is not None:
        hosts = read_hostfile(hostfile)
        if num_nodes > len(hosts):
            raise ConfigError(f"--num_nodes {num_nodes}: --hostfile {hostfile} lists only {len(hosts)} hosts")
    elif num_nodes > 1 and node_rank is None:
        raise ConfigError(f"--num_nodes {num_nodes}: say how the nodes start: --node_rank N on each node "
                          "(one launcher per node, no ssh), or --hostfile for an ssh launch from here")
    if node_rank is not None and not 0 <= node_rank < num_nodes:
        raise ConfigError(f"--node_rank {node_rank}: must be in [0, {num_nodes})")
    return Topology(num_gpus, num_nodes, node_rank, hostfile, addr, port)


def launcher_command(args: argparse.Namespace, topo: Topology, resolved_config: Path, work: Path) -> list[str]:
    """The deepspeed launcher's command line; with a node rank it starts this node's processes only."""
    # training.ds_runner: deepspeed.launcher.runner with this project's logs (its INFO lines only at DEBUG).
    level = os.environ.get(ENV_LEVEL, "INFO")
    cmd = [sys.executable, "-m", "training.ds_runner", "--num_gpus", str(topo.num_gpus),
           "--num_nodes", str(topo.num_nodes), "--master_addr", topo.master_addr,
           "--master_port", str(topo.master_port), f"--log_level={'debug' if level == 'DEBUG' else 'warning'}"]
    hostfile = topo.hostfile
    if topo.node_rank is not None:
        if hostfile is None:  # the launcher learns the world from a hostfile; without ssh, names are labels
            hostfile = work / f"hostfile.node{topo.node_rank}"
            hostfile.write_text("".join(f"node{i} slots={topo.num_gpus}\n" for i in range(topo.num_nodes)))
        cmd += ["--no_ssh", "--node_rank", str(topo.node_rank)]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    # The workers log as this process does (kernel.logs: the flags, and the environment they inherit).
    cmd += ["--module", "training.launch", "--worker", "--config", str(resolved_config), *logging_flags()]
    for flag in ("data", "out"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if args.resume:
        cmd.append("--resume")
    return cmd


def run(cfg: Config, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
        tags: dict | None = None) -> Outcome:
    """The train stage in this process (rank and world size come from the environment the launcher sets):
    ``training.trainer.train`` logged to a new MLflow run; ``tags`` go on that run (the job passes its parent
    run and stage), a resumed run keeps its own. Outcome info: run_id, model_dir, steps, val (the best
    validation metrics), trained_digest (of its weights), started_from (a warm start's record, else None)."""
    # Imported here, not at the top: a launcher that only starts the deepspeed launcher (several processes or
    # nodes) never trains itself and starts without DeepSpeed and transformers.
    from modeling.artifact import START_FILE, TRAINABLE_FILE
    from training.trainer import train

    out_dir = Path(out_dir)
    rank = int(os.environ.get("RANK", 0))
    run_id_file = out_dir / "mlflow_run_id"
    resume_run = resume and run_id_file.is_file()

    def start():
        tracker = open_tracker(cfg, rank)
        tracker.start(run_name=cfg.tracking.run_name or "train", tags={"stage": "train", **(tags or {})},
                      run_id=run_id_file.read_text().strip() if resume_run else None)
        if rank == 0 and tracker.run_id:
            out_dir.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text(tracker.run_id)
        return tracker

    with stage_tracker(None, start) as tracker:
        result = train(cfg, data_dir, out_dir, resume=resume, tracker=tracker)
    started = result.model_dir / START_FILE
    return Outcome({"run_id": result.run_id, "model_dir": str(result.model_dir), "steps": result.steps,
                    "val": result.best_metrics, "trained_digest": file_digest(result.model_dir / TRAINABLE_FILE, 12),
                    "started_from": json.loads(started.read_text()) if started.is_file() else None},
                   [result.model_dir])


def launch_processes(args: argparse.Namespace, topo: Topology, cfg: Config, out_dir: Path) -> int:
    """Start the deepspeed launcher for several processes or nodes; its workers run ``run`` (--worker)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = out_dir / "launch_config.yaml"  # workers read the resolved config: one source of truth
    dump_config(cfg, resolved)
    code = subprocess.call(launcher_command(args, topo, resolved, out_dir))
    return code if code in exit_codes.TABLE else exit_codes.FAILURE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_from_args(args, "train")

    def work() -> int:
        choose_accelerator()
        cfg = load_config(args.config, args.overrides)
        data_dir = args.data or storage.join(cfg.work_dir, "data")  # a local folder or an object-store URI
        out_dir = Path(args.out or cfg.local_work_dir / "train")  # checkpoints: always on local disk
        topo = None if args.worker else topology(args)
        if topo is not None and topo.multi:
            return launch_processes(args, topo, cfg, out_dir)
        info = run(cfg, data_dir, out_dir, resume=args.resume).info
        if int(os.environ.get("RANK", 0)) == 0:
            best = info["val"] or {}
            log.info(f"best validation macro AUC {best.get('auc_macro')} after {info['steps']} steps; "
                     f"model: {info['model_dir']}")
        return exit_codes.OK

    return exit_codes.run_cli(work, resume_hint="the checkpoints are kept: rerun with --resume to continue")


if __name__ == "__main__":
    sys.exit(main())
