"""What this machine runs fast, for choices that follow the hardware (training's and serving's precision).

    fast_bf16()   # CUDA, or a CPU with oneDNN's bf16 path (AVX-512 BF16 / AMX); elsewhere bf16 is emulated
"""
from __future__ import annotations

import torch


def fast_bf16() -> bool:
    """Whether torch runs bf16 matmuls fast here: CUDA, or oneDNN's bf16 path (AVX-512 / AVX512-BF16 / AMX).
    On other CPUs (e.g. AVX2-only) a bf16 training step was measured about 50x slower than fp32."""
    if torch.cuda.is_available():
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_precision(wanted: str) -> str:
    """``train.precision`` as it runs: auto is bf16 where bf16 is fast (fast_bf16), fp32 elsewhere."""
    if wanted != "auto":
        return wanted
    return "bf16" if fast_bf16() else "fp32"
