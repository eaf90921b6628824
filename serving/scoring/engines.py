"""Where a scoring job's units run: in this process, in N local worker processes, or on Ray actors.

    run_units(job, plan)                                   # this process: every unit of the plan
    run_units(job, plan, rank=1, world=4)                  # a worker started by hand: units ordinal % 4 == 1
    run_units(job, plan, workers=4)                        # 4 child processes, ranks 0..3
    run_units(job, plan, engine="ray", workers=8, ray_address="auto")

Every engine runs serving.scoring.worker's ``score_unit`` on the same planned units (serving.scoring.plan),
so the scores are the same whichever engine runs them:

    local, 1 worker     this process scores its units with the plan it was given
    local, N workers    N processes ``python -m serving.scoring.worker`` (ranks 0..N-1, one GPU each when
                        present); each plans the same units from the job's inputs and scores ordinal % N == rank
    ray                 serving.scoring.ray_engine: a pool of actors takes the units one at a time
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from kernel import storage
from kernel.config import dump_config
from kernel.errors import ResourceUnavailable, WorkerLost
from kernel.exit_codes import RESOURCE_UNAVAILABLE
from kernel.logs import logging_flags
from serving.scoring.outputs import JOB_DIR
from serving.scoring.plan import Inputs
from serving.scoring.ray_engine import run_on_ray
from serving.scoring.worker import Job, score_units


def run_units(job: Job, plan: Inputs, *, engine: str = "local", workers: int = 1, ray_address: str = "local",
              ray_threads: int = 1, rank: int = 0, world: int = 1) -> None:
    """Score the job's units (skipping finished ones with ``job.resume``) on the chosen engine."""
    if engine == "ray":
        run_on_ray(job, plan, workers, ray_address, threads=ray_threads)
    elif workers > 1:
        run_processes(job, workers)
    else:
        score_units(job, plan, rank, world)


def run_processes(job: Job, workers: int) -> None:
    """``--workers N``: N child processes of serving.scoring.worker, each with --rank i; one GPU each if present."""
    # Children read the resolved config (one source of truth); it is local even when the output is not.
    folder = (Path(job.out) if not storage.is_uri(job.out) else job.cfg.local_work_dir) / JOB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    dump_config(job.cfg, folder / "config.yaml")
    import torch

    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = []
    for rank in range(workers):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(rank % gpus)
        cmd = [sys.executable, "-m", "serving.scoring.worker", "--config", str(folder / "config.yaml"),
               "--model", str(job.model), "--model-version", job.model_version, "--output", str(job.out),
               "--rank", str(rank), "--world-size", str(workers), "--input", *job.inputs]
        cmd += ["--resume"] * job.resume + ["--quiet"] * job.quiet + logging_flags()
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    killed = [f"worker {i} (pid {p.pid}) was killed by {signal.Signals(-c).name}" for i, (p, c) in
              enumerate(zip(procs, codes)) if c < 0]
    if killed:  # out of memory, or stopped from outside: the environment, not a bug
        raise WorkerLost("scoring " + "; ".join(killed))
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed and all(codes[i] == RESOURCE_UNAVAILABLE for i in failed):
        raise ResourceUnavailable(f"scoring workers {failed} stopped: resource unavailable (their messages are above)")
    if failed:
        raise RuntimeError(f"scoring workers {failed} failed (see their messages above); rerun with --resume")
