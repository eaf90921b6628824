"""ScoringModel's interface over ONNX Runtime: one session per scenario, on that scenario's merged graph.

    om = OnnxScoringModel(export_dir, manifest, task_map, {"cameras": "onnx/cameras/int8_dynamic.onnx", ...},
                          threads=2)
    om.use("cameras")                                        # the scenario's session (created on first use)
    logits = om.logits(input_ids, attention_mask, token_type_ids)   # (batch,) float32 torch tensor

The export writes each scenario's merged model as its own graph (serving.export.onnx_graphs): the base
weights with ΔW_s folded in are constants of the graph, so ONNX Runtime fuses and pre-packs them once per
session and quantizes them offline, and a switch of scenario is a dictionary look-up. Sessions are created
the first time a scenario is used and then kept (one per scenario the job meets).

Threads: ``intra_op_num_threads`` is the scorer's thread count (serving.threads, else torch's own count),
one inter-op thread, and no spinning between runs, so local workers and Ray actors that each set their
count do not oversubscribe the cores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kernel.errors import DataError, UnknownScenario
from kernel.task_map import TaskMap


def session_options(threads: int):
    """Sequential execution on ``threads`` intra-op threads, every graph optimisation on, no spin-waiting."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    # Between two runs the scorer tokenizes and writes: idle threads must not spin on the cores meanwhile.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings about unused initializers of quantized graphs are noise
    return so


def open_session(path: str | Path, threads: int):
    """An ONNX Runtime CPU session on ``path``; DataError names the file when it is missing or unreadable."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ONNX graph missing from the export (re-export, or serving.engine=torch)")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for invalid graphs
        raise DataError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from e


class OnnxScoringModel:
    """Per scenario an ONNX Runtime session on its merged graph; ``use`` + ``logits`` as ScoringModel.

    Args:
        export_dir: the export folder the graph paths are relative to.
        manifest: the export's manifest (pooling, max_length, pair format are read from it by the scorer).
        task_map: scenario -> task id of the export.
        graphs: scenario -> graph path relative to ``export_dir`` (the precision chosen for that scenario).
        threads: intra-op threads of every session.
    """

    device = torch.device("cpu")

    def __init__(self, export_dir: str | Path, manifest: dict, task_map: TaskMap, graphs: dict[str, str],
                 threads: int):
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.pooling = manifest["pooling"]
        self.task_map = task_map
        self.graphs = dict(graphs)
        self.threads = threads
        self.current: str | None = None
        self._sessions: dict[str, object] = {}
        self._inputs: dict[str, set[str]] = {}

    @property
    def scenarios(self) -> list[str]:
        return self.task_map.names

    def use(self, scenario: str) -> None:
        if scenario not in self.graphs:
            raise UnknownScenario(f"scenario {scenario!r} is not one of the exported scenarios {self.scenarios}")
        if scenario not in self._sessions:
            session = open_session(self.export_dir / self.graphs[scenario], self.threads)
            self._sessions[scenario] = session
            self._inputs[scenario] = {i.name for i in session.get_inputs()}
        self.current = scenario

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch,) float32 of the current scenario's graph; inputs (batch, length) integer tensors."""
        if self.current is None:
            raise RuntimeError("call use(scenario) before logits()")
        wanted = self._inputs[self.current]
        feed = {"input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask)}
        if "token_type_ids" in wanted:
            feed["token_type_ids"] = (_int64(token_type_ids) if token_type_ids is not None
                                      else np.zeros_like(feed["input_ids"]))
        (out,) = self._sessions[self.current].run(["logits"], feed)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(-1))


def _int64(t) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return a if a.dtype == np.int64 else a.astype(np.int64)
