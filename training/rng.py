"""The random state a resumed run must restore: Python's, NumPy's and torch's CPU generators.

    seed_everything(cfg.train.seed)       # a fresh run
    state = rng_state()                   # saved with each checkpoint (one per rank)
    set_rng_state(state)                  # a resumed run continues the same random stream
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
