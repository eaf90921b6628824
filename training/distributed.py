"""The process group for training, bound to the rendezvous address and nothing wider.

    env = init_distributed()          # rank, local rank and world size from the launcher's environment
    env.rank, env.world, env.device

torch's default ``env://`` rendezvous starts its TCP store on every interface (``*:MASTER_PORT``), even for
a one-process run on a laptop. Here rank 0 binds the store's socket to ``MASTER_ADDR`` itself (127.0.0.1
unless a multi-node run names another address) and hands it to the store, and gloo's own sockets use the
loopback interface when the rendezvous address is a loopback one. A one-process world needs no TCP store
at all: it uses an in-memory one.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def loopback_interface() -> str | None:
    """The name of the loopback interface ("lo" on Linux), or None when there is none to name."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo")), None)


def _store(rank: int, world: int, addr: str, port: int, timeout: datetime.timedelta):
    if world == 1:
        return dist.HashStore()
    if rank != 0:
        return dist.TCPStore(addr, port, world, False, timeout=timeout)
    listener = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(max(128, world))
    # The store serves on this socket from now on: Python must not close the fd when the object goes.
    return dist.TCPStore(addr, port, world, True, timeout=timeout, master_listen_fd=listener.detach())


def choose_accelerator() -> None:
    """Tell DeepSpeed its accelerator (``DS_ACCELERATOR``: cuda where torch sees a GPU, else cpu) before it is
    first imported, unless the environment already says: left to guess, it logs a warning of its own format
    on every CPU run. Child processes (the launcher's workers) inherit the choice."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) once, then DeepSpeed on top of it."""
    import deepspeed

    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    on_gpu = torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    os.environ.setdefault("MASTER_ADDR", LOOPBACK)
    if "MASTER_PORT" not in os.environ:  # one in-process rank: any free local port will do
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world)):
        os.environ.setdefault(key, str(value))
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if not dist.is_initialized():
        if is_loopback(addr) and "GLOO_SOCKET_IFNAME" not in os.environ and loopback_interface():
            os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=_store(rank, world, addr, port, timeout), rank=rank,
                                world_size=world, timeout=timeout)
    # Adopts the group initialised above. On CPU it also builds its shared-memory op and print()s that it
    # did ("... built successfully") on stdout: kept off the job's output, at DEBUG.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if printed.getvalue().strip():
        log.debug("deepspeed.init_distributed: %s", printed.getvalue().strip())
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        # Processes sharing a host split its cores: oversubscribed OpenMP threads spin against each other.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistEnv(rank, local_rank, world, device)
