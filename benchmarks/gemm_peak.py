"""This machine's GEMM peak per dtype, and the matmul FLOPs of an encoder forward: the physical limit of scoring.

    peaks = gemm_peaks(threads=1)          # {"fp32 torch": GFLOP/s, "fp32 onnxruntime": ..., "int8 onnxruntime": ...}
    flops = encoder_flops(config, [(64, 33), (64, 41), ...])    # matmul FLOPs of batches (rows, tokens)

Peaks are square n x n x n products (n = 2048 by default) through the fastest kernels at hand, each the
best of a few runs at the given thread count: torch's BLAS (fp32, bf16 through oneDNN) and ONNX Runtime's
MatMul (fp32) and MatMulInteger (uint8 x int8 -> int32, as its dynamic int8 graphs run). A dtype whose
kernel this CPU lacks in hardware (bf16 without AVX512-BF16/AMX) shows its emulated speed.
"""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_flags() -> list[str]:
    """The SIMD features that decide the kernels: AVX2, AVX-512 (F, VNNI, BF16), AMX."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return [f for f in wanted if re.search(rf"\b{f}\b", text)]


def cpu_model() -> str:
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        return "unknown"
    return m.group(1).strip() if m else "unknown"


def encoder_flops(config, shapes: list[tuple[int, int]]) -> float:
    """Matmul FLOPs (2 per multiply-add) of a BERT-style encoder over batches of (rows, tokens): per token the
    Q, K, V, output and two FFN projections, per row and head the QKᵀ and attention-times-V products."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    total = 0.0
    for rows, tokens in shapes:
        per_layer = 2 * rows * tokens * (4 * d * d + 2 * d * ff) + 2 * 2 * rows * tokens * tokens * d
        total += layers * per_layer + 2 * rows * d  # + the scoring head's dot product
    return total


def _best(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ort_matmul(n: int, threads: int, integer: bool, folder: Path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if integer:
        node = helper.make_node("MatMulInteger", ["a", "b"], ["c"])
        inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
                  helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])]
        out = helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])
    else:
        node = helper.make_node("MatMul", ["a", "b"], ["c"])
        inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"]
        out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    model = helper.make_model(helper.make_graph([node], "gemm", inputs, [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = folder / f"gemm-{'int8' if integer else 'fp32'}.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if integer:
        feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    else:
        feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    return lambda: sess.run(["c"], feed)


def gemm_peaks(threads: int, n: int = 2048, runs: int = 3) -> dict[str, float]:
    """GFLOP/s of an n x n x n product per (dtype, kernel) at ``threads`` threads: the best of ``runs``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    flop = 2.0 * n ** 3
    out = {}
    try:
        a32, b32 = torch.randn(n, n), torch.randn(n, n)
        out["fp32 torch"] = flop / _best(lambda: a32 @ b32, runs) / 1e9
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        out["bf16 torch"] = flop / _best(lambda: a16 @ b16, runs) / 1e9
        with tempfile.TemporaryDirectory(prefix="gemm-") as tmp:
            out["fp32 onnxruntime"] = flop / _best(_ort_matmul(n, threads, False, Path(tmp)), runs) / 1e9
            out["int8 onnxruntime"] = flop / _best(_ort_matmul(n, threads, True, Path(tmp)), runs) / 1e9
    finally:
        torch.set_num_threads(saved)
    return out
