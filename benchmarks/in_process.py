"""What the benchmarks that train in their own process share: the device, one DeepSpeed world of size 1, and
how their ``main`` ends."""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

from kernel.errors import ConfigError, RelevanceError


def set_device(device: str) -> None:
    """``cpu`` hides every GPU; ``cuda`` needs one. Then one in-process DeepSpeed "world" of size 1 for every
    run, on a free port of 127.0.0.1."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def exit_code(work: Callable[[], None]) -> int:
    """0 when ``work`` returns; the project's errors become one ``error:`` line on stderr and exit code 2."""
    try:
        work()
    except RelevanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
