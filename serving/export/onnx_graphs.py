"""ONNX graphs of an export: each scenario's merged model in fp32, and its lower-precision candidates.

    graphs = write_fp32_graphs(stage, tokenizer, opset=17)          # {"cameras": {"fp32": "onnx/cameras/fp32.onnx"}}
    write_int8(stage, graphs, ["int8_dynamic", "int8_static"], calibration_feeds)

Why one graph per scenario (rather than one graph taking the scenario's factors as inputs): with ΔW_s
folded into the weights, the weights are constants, so ONNX Runtime pre-packs them once per session and
int8 quantization is done offline with per-channel scales; a graph taking A_s, U_s as inputs must compute
x·W0ᵀ + (x·A_sᵀ)·U_sᵀ at every call (two more small GEMMs per adapted layer, unfused) and cannot quantize
the merged weight. benchmarks/score_engines.py measures both (``--layouts``); the README has the figures.
The price is disk: one graph per scenario (fp32 ≈ the base model's size, int8 about a quarter of it).

BERT-family graphs are rewritten with ONNX Runtime's transformer fusions (``fuse_encoder``: an Attention op
per layer, fused layer norms). Graph signature: inputs ``input_ids``, ``attention_mask`` (int64, (batch, length), dynamic) and, for
tokenizers that make them, ``token_type_ids``; output ``logits`` (batch,) float32, the same pooling and head
as training (modeling.model.pooled_logits).

Candidates (all ONNX Runtime's own quantization tool; weights int8 per output channel):
    int8_dynamic   activations quantized per tensor at run time (uint8), every MatMul with a weight (ONNX
                   Runtime's dynamic quantizer leaves the attention products, activation x activation, in fp32)
    int8_static    activation scales calibrated on validation rows (QDQ format, on the graph before fusion),
                   the encoder's MatMuls with a weight (not the head)
    int8_partial   as int8_dynamic, except the sensitive MatMuls: the last encoder layer, the head and the FFN
                   down-projections (their input follows the GELU, whose activations have the widest range)
On CPUs without VNNI, u8·s8 products are summed in int16 and can saturate: weights then use 7 bits
(``reduce_range``), as ONNX Runtime advises; the manifest records it.
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeling.model import pooled_logits
from serving.layout import read_task_map, scenario_dirname
from serving.scoring.model import ScoringModel

ONNX_DIR = "onnx"
INT8_VARIANTS = ("int8_dynamic", "int8_static", "int8_partial")


class LogitsGraph(nn.Module):
    """What the graph computes: (input_ids, attention_mask[, token_type_ids]) -> logits (batch,) float32."""

    def __init__(self, model: ScoringModel):
        super().__init__()
        self.backbone, self.head, self.pooling = model.backbone, model.head, model.pooling

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return pooled_logits(self.backbone, self.pooling, self.head, input_ids, attention_mask, token_type_ids)


def graph_path(task_map, scenario: str, precision: str) -> str:
    """``onnx/<scenario dir>/<precision>.onnx``, relative to the export folder."""
    return f"{ONNX_DIR}/{scenario_dirname(scenario, task_map.id_of(scenario))}/{precision}.onnx"


def write_fp32_graphs(export_dir: Path, tokenizer, opset: int, keep_unfused: bool = False) -> dict[str, dict[str, str]]:
    """Export every scenario's merged model (loaded from the staged base/ + factors) as ONNX fp32.
    ``keep_unfused``: also keep the graph as exported, before the fusions (``<scenario>/fp32.unfused.onnx``,
    what static int8 calibrates and quantizes; write_int8 removes it)."""
    model = ScoringModel.load(export_dir, dtype=torch.float32, device="cpu")
    task_map = read_task_map(export_dir)
    _eager_attention(model.backbone)
    with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    ids = torch.tensor([[3, 7, 11, 13, 17, 19, 23, 5], [3, 29, 31, 37, 5, 0, 0, 0]], dtype=torch.long)
    ids = ids.clamp(max=model.backbone.config.vocab_size - 1)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.long)
    args = (ids, mask, torch.zeros_like(ids)) if with_types else (ids, mask)
    names = ["input_ids", "attention_mask", "token_type_ids"][: len(args)]
    axes = {n: {0: "batch", 1: "length"} for n in names} | {"logits": {0: "batch"}}
    graphs = {}
    for name in task_map.names:
        model.use(name)
        rel = graph_path(task_map, name, "fp32")
        (export_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(LogitsGraph(model).eval(), args, str(export_dir / rel), input_names=names,
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
            if keep_unfused:
                shutil.copyfile(export_dir / rel, export_dir / unfused_path(rel))
            fuse_encoder(export_dir / rel, model.backbone.config)
        graphs[name] = {"fp32": rel}
    return graphs


def unfused_path(rel: str) -> str:
    return rel.replace("/fp32.onnx", "/fp32.unfused.onnx")


def fuse_encoder(path: Path, config) -> bool:
    """Rewrite a BERT-family graph with ONNX Runtime's transformer fusions (one Attention op per layer, the
    embeddings' and the residuals' layer norms fused): fewer, faster kernels, and quantizable attention
    projections. Hardware-neutral (opt_level 0: no runtime-specific rewrites). Other families stay as
    exported. Returns whether the graph was rewritten."""
    if getattr(config, "model_type", None) not in ("bert", "roberta", "xlm-roberta", "distilbert", "electra"):
        return False
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, opt_level=0)
    fused.save_model_to_file(str(path))
    return True


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies u8·s8 into int32 without saturation (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags))


# Shape inference stops at the fused (com.microsoft) ops: their outputs are float.
FUSED_TYPES = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT
WEIGHT_OPS = ("MatMul", "Gemm", "Attention")  # Attention: the fused op, its QKV projection is a weight
_LAYER = re.compile(r"layers?[./_](\d+)[./_]|^Attention_(\d+)$")


def weight_matmuls(path: str | Path) -> list[str]:
    """Names of the MatMul/Gemm/Attention nodes of a graph whose second input is a constant (a weight)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in consts]


def _layer(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1) or m.group(2)) if m else None


def sensitive_nodes(names: list[str]) -> list[str]:
    """The weight MatMuls int8_partial keeps in fp32: the last encoder layer, the head, the FFN down-projections."""
    layers = [i for n in names if (i := _layer(n)) is not None]
    last = max(layers) if layers else None
    keep = []
    for n in names:
        layer = _layer(n)
        in_last = layer is not None and layer == last
        ffn_down = bool(re.search(r"(/output/dense|down_proj)", n)) and "attention" not in n
        head = layer is None  # outside the encoder layers: pooler, classifier, score, the mean-pool head
        if in_last or ffn_down or head:
            keep.append(n)
    return keep


def write_int8(export_dir: Path, graphs: dict[str, dict[str, str]], variants: list[str],
               calibration: list[dict[str, np.ndarray]] | None) -> dict:
    """Quantize every scenario's fp32 graph into each int8 ``variant``; adds the paths to ``graphs``.
    ``calibration``: input feeds (validation batches) for int8_static. Returns what the manifest records."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    reduce_range = not cpu_has_vnni()
    for name, files in graphs.items():
        src = export_dir / files["fp32"]
        unfused = export_dir / unfused_path(files["fp32"])
        matmuls = weight_matmuls(src)
        for variant in variants:
            rel = files["fp32"].replace("/fp32.onnx", f"/{variant}.onnx")
            dst = str(export_dir / rel)
            with _quiet_exporter():
                if variant == "int8_static":  # QDQ needs the graph as exported (types known everywhere)
                    if not calibration or not unfused.is_file():
                        continue
                    plain = [m for m in weight_matmuls(unfused) if _layer(m) is not None]  # not the head
                    quantize_static(str(unfused), dst, _Feeds(calibration), quant_format=QuantFormat.QDQ,
                                    per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                                    weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                                    nodes_to_quantize=plain, calibrate_method=CalibrationMethod.MinMax)
                else:  # int8_partial: the weight MatMuls less the sensitive ones
                    keep = set(sensitive_nodes(matmuls))
                    only = [m for m in matmuls if m not in keep] if variant == "int8_partial" else None
                    quantize_dynamic(str(src), dst, per_channel=True, reduce_range=reduce_range,
                                     weight_type=QuantType.QInt8, op_types_to_quantize=list(WEIGHT_OPS),
                                     nodes_to_quantize=only, extra_options=FUSED_TYPES)
            files[variant] = rel
        unfused.unlink(missing_ok=True)
    return {"weights": "int8 per output channel", "reduce_range": reduce_range,
            "activations": {"int8_dynamic": "uint8 per tensor, scaled at run time (MatMuls with a weight)",
                            "int8_static": "uint8 per tensor, MinMax-calibrated on validation rows (QDQ)",
                            "int8_partial": "as int8_dynamic; last layer, head and FFN down-projections fp32"}}


class _Feeds:
    """ONNX Runtime's CalibrationDataReader protocol over a list of input feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _eager_attention(backbone: nn.Module) -> None:
    """Trace the plain attention maths (transformers' sdpa/flex paths are for torch kernels, not graphs)."""
    for m in backbone.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            with contextlib.suppress(Exception):
                cfg._attn_implementation = "eager"


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' advisory warnings (tracer, deprecations, quantization pre-processing hints) are noise."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
