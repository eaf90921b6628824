"""Which runtime runs each scenario's forward: the engine (torch or ONNX Runtime) and the precision.

    model, plan = load_model(export_dir, cfg.serving)      # plan: {"cameras": ("onnxruntime", "int8_static"), ...}
    model.use("cameras"); model.logits(input_ids, attention_mask, token_type_ids)

Every caller (``python -m serving.score``, its worker processes and Ray actors, the MLflow pyfunc, the
export's own validation fit) scores through serving.scoring.scorer, which loads its model here; so
``serving.engine``, ``serving.precision`` and ``serving.threads`` mean the same everywhere.

serving.engine
    auto          on CPU the engine the export's gate measured faster on the exporting machine (manifest
                  ``onnx.gate.rows_per_s``: ONNX Runtime in the precisions it serves against torch in
                  fp32), ONNX Runtime when there is no measurement (exported without --valid); torch on
                  CUDA, for ``serving.precision=bf16``, or for an export without graphs
    onnxruntime   the export's graphs (fp32, and the int8 graphs the export kept), on the CPU
    torch         the compact artifact (base + factors, serving.scoring.model) in fp32 or bf16
serving.precision
    auto          per scenario the fastest precision the export's accuracy gate passed for this engine
                  (manifest ``onnx.serve``); fp32 where none passed, without a gate (no --valid) or ONNX
    fp32 | bf16 | int8 | int8_<variant>
                  that precision for every scenario, whether the gate passed it or not (an explicit choice:
                  benchmarks, a team that accepts the error); int8 takes per scenario the variant the gate
                  ranked first among the graphs the export kept
serving.threads   intra-op threads of both engines; 0 keeps torch's current count (set by the worker, the
                  Ray actor or OMP_NUM_THREADS), which ONNX Runtime then uses too
"""
from __future__ import annotations

from pathlib import Path

import torch

from kernel.config import ServingConfig
from kernel.errors import ConfigError, DataError
from serving.layout import read_manifest, read_task_map
from serving.scoring.model import ScoringModel
from serving.scoring.onnx_model import OnnxScoringModel

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INT8_VARIANTS = ("int8_dynamic", "int8_static", "int8_partial")
ENGINE_OF = {"fp32": None, "bf16": "torch", **{v: "onnxruntime" for v in INT8_VARIANTS}}


def choose_engine(serving: ServingConfig, manifest: dict, device: str | None = None) -> str:
    """"torch" or "onnxruntime" for this config, export and device (see the module docstring)."""
    has_graphs = bool((manifest.get("onnx") or {}).get("graphs"))
    if serving.engine == "onnxruntime":
        if not has_graphs:
            raise ConfigError("serving.engine=onnxruntime: the export has no ONNX graphs (export with "
                              "serving.onnx.export=true)")
        if serving.precision == "bf16":
            raise ConfigError("serving.precision=bf16 runs on serving.engine=torch (ONNX Runtime's CPU kernels "
                              "have no bf16 MatMul)")
        return "onnxruntime"
    if serving.engine == "torch":
        if serving.precision.startswith("int8"):
            raise ConfigError(f"serving.precision={serving.precision} runs on serving.engine=onnxruntime")
        return "torch"
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda or not has_graphs or serving.precision == "bf16":
        if serving.precision.startswith("int8"):
            raise ConfigError(f"serving.precision={serving.precision} needs ONNX Runtime on CPU, and the "
                              f"{'device is CUDA' if cuda else 'export has no ONNX graphs'}")
        return "torch"
    if serving.precision.startswith("int8"):
        return "onnxruntime"
    return "torch" if measured_faster(manifest) == "torch" else "onnxruntime"


def measured_faster(manifest: dict) -> str | None:
    """The engine that scored the gate's rows faster at export, each in what it serves (per scenario, the
    slowest scenario's precision counts); None without both figures. ONNX Runtime's fp32 kernels beat torch's on
    many CPUs but not on all (on AVX2-only EPYCs torch's BLAS was faster), so auto follows the measurement."""
    onnx = manifest.get("onnx") or {}
    speed, serve = (onnx.get("gate") or {}).get("rows_per_s") or {}, onnx.get("serve") or {}
    rates = {}
    for engine in ("onnxruntime", "torch"):
        per = speed.get(engine) or {}
        served = [(serve.get(s) or {}).get(engine, "fp32") for s in manifest.get("scenarios", {})] or ["fp32"]
        if all(p in per for p in served):
            rates[engine] = min(per[p] for p in served)
    if len(rates) < 2:
        return None
    return max(rates, key=lambda e: (rates[e], e == "onnxruntime"))  # a tie goes to ONNX Runtime


def choose_precisions(serving: ServingConfig, manifest: dict, engine: str) -> dict[str, str]:
    """scenario -> the precision it is scored in (fp32, bf16 or an int8 variant) on ``engine``."""
    scenarios = list(manifest["scenarios"])
    onnx = manifest.get("onnx") or {}
    wanted = serving.precision
    if wanted == "auto":
        serve = onnx.get("serve") or {}
        return {s: (serve.get(s) or {}).get(engine, "fp32") for s in scenarios}
    if wanted in ("fp32", "bf16"):
        return dict.fromkeys(scenarios, wanted)
    graphs = onnx.get("graphs") or {}
    out = {}
    for s in scenarios:
        kept = [v for v in ranked_int8(onnx, s) if v in graphs.get(s, {})]
        pick = wanted if wanted in graphs.get(s, {}) else (kept[0] if wanted == "int8" and kept else None)
        if pick is None:
            raise DataError(f"serving.precision={wanted}: the export kept no such graph for scenario {s!r} (it "
                            "failed the accuracy gate; export with serving.onnx.keep_failed=true to keep it)")
        out[s] = pick
    return out


def ranked_int8(onnx: dict, scenario: str) -> list[str]:
    """The int8 variants of ``scenario``: those that passed the gate first, fastest first; then the rest by error."""
    gate = (onnx.get("gate") or {})
    speed = gate.get("rows_per_s") or {}
    cands = ((gate.get("scenarios") or {}).get(scenario) or {}).get("candidates") or {}
    names = [v for v in INT8_VARIANTS if v in cands] or list(INT8_VARIANTS)
    return sorted(names, key=lambda v: (not (cands.get(v) or {}).get("passed", False), -speed.get(v, 0.0),
                                        (cands.get(v) or {}).get("max_abs_dp", float("inf"))))


class ByPrecision:
    """The torch engine with scenarios in different dtypes: one ScoringModel per dtype, routed per scenario."""

    def __init__(self, models: dict[str, ScoringModel], choice: dict[str, str]):
        self.models, self.choice = models, choice
        first = next(iter(models.values()))
        self.manifest, self.task_map, self.pooling, self.device = first.manifest, first.task_map, first.pooling, first.device
        self.current: str | None = None
        self._active: ScoringModel | None = None

    @property
    def scenarios(self) -> list[str]:
        return self.task_map.names

    def use(self, scenario: str) -> None:
        if scenario not in self.choice:
            self.models[next(iter(self.models))].use(scenario)  # raises UnknownScenario, naming the scenarios
        self._active = self.models[self.choice[scenario]]
        self._active.use(scenario)
        self.current = scenario

    def logits(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        if self._active is None:
            raise RuntimeError("call use(scenario) before logits()")
        return self._active.logits(input_ids, attention_mask, token_type_ids)


def load_model(export_dir: str | Path, serving: ServingConfig, device: str | None = None):
    """(model with ``use``/``logits``/``scenarios``/``task_map``/``manifest``, plan: scenario -> (engine,
    precision)) for the export folder ``export_dir`` under ``serving``."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    if serving.threads > 0:
        torch.set_num_threads(serving.threads)
    engine = choose_engine(serving, manifest, device)
    choice = choose_precisions(serving, manifest, engine)
    plan = {s: (engine, p) for s, p in choice.items()}
    if engine == "onnxruntime":
        graphs = manifest["onnx"]["graphs"]
        files = {s: graphs[s][p] for s, p in choice.items()}
        return OnnxScoringModel(export_dir, manifest, read_task_map(export_dir), files,
                                threads=serving.threads or torch.get_num_threads()), plan
    dtypes = sorted(set(choice.values()))
    models = {d: ScoringModel.load(export_dir, dtype=TORCH_DTYPES[d], device=device) for d in dtypes}
    return (models[dtypes[0]] if len(models) == 1 else ByPrecision(models, choice)), plan
