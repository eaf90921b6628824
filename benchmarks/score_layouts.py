"""Why the export writes one merged graph per scenario: its forward against a graph that applies the LoRA factors.

    compare_layouts(export_dir, traffic_path, threads=1, repeats=3)     # used by score_engines.py --layouts

    merged     onnx/<s>/fp32.onnx: W0 + U_s A_s folded into constant weights (what the export writes)
    factors    one graph for every scenario: each adapted layer computes x·W0ᵀ + (x·A_sᵀ)·U_sᵀ at run time.
               Here A_s, U_s are the graph's constants; taking them as inputs instead adds no arithmetic but
               keeps them out of constant folding, so this is the factor layout's best case.
Both run on ONNX Runtime, fp32, on the same tokenized batches (the real traffic, as the scorer batches it).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


class FactoredLinear(nn.Module):
    """y = x·W0ᵀ + b + (x·Aᵀ)·Uᵀ: a LoRA layer left unmerged."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, u: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("a", a.float())
        self.register_buffer("u", u.float())

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.u.T


def factored_graph(export_dir: Path, scenario: str, path: Path) -> None:
    """The scenario's model with its factors applied at run time, exported as ONNX like the merged graphs."""
    from serving.export.onnx_graphs import LogitsGraph, _eager_attention
    from serving.scoring.model import ScoringModel

    sm = ScoringModel.load(export_dir, dtype=torch.float32, device="cpu")
    _eager_attention(sm.backbone)
    for layer, (a, u) in sm._pairs[scenario].items():
        parent_name, _, child = layer.rpartition(".")
        parent = sm.backbone.get_submodule(parent_name)
        setattr(parent, child, FactoredLinear(getattr(parent, child), a, u))
    sm.current = scenario
    ids = torch.tensor([[3, 7, 11, 13, 5], [3, 29, 31, 5, 0]])
    mask = (ids != 0).long()
    args, names = (ids, mask, torch.zeros_like(ids)), ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "length"} for n in names} | {"logits": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(LogitsGraph(sm).eval(), args, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)


def compare_layouts(export_dir: Path, traffic_path: Path, threads: int, repeats: int) -> dict:
    """Forward-only rows/s of one scenario's rows through both layouts (medians of interleaved repeats)."""
    import numpy as np

    from benchmarks.score_engines import Trial
    from kernel.config import load_config
    from serving.scoring.onnx_model import open_session
    from serving.scoring.plan import Inputs

    torch.set_num_threads(threads)
    cfg = load_config(export_dir / "config.yaml")
    trial = Trial(export_dir, cfg, "onnxruntime", "fp32", threads, Inputs(cfg, [str(traffic_path)]))
    scenario = trial.scorer.scenarios[0]
    merged_path = export_dir / trial.scorer.model.graphs[scenario]
    feeds = []
    for s, feats in trial.batches:
        if s == scenario:
            b = feats.collate(np.arange(len(feats)), trial.scorer.tokenizer.pad_token_id)
            feeds.append({k: b[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids") if k in b})
    rows = sum(len(f["input_ids"]) for f in feeds)
    with tempfile.TemporaryDirectory(prefix="layouts-") as tmp:
        factored_path = Path(tmp) / "factored.onnx"
        factored_graph(export_dir, scenario, factored_path)
        sessions = {"merged": open_session(merged_path, threads), "factors": open_session(factored_path, threads)}
        first = next(iter(feeds))
        ref, got = (s.run(["logits"], first)[0] for s in sessions.values())
        times = {k: [] for k in sessions}
        for r in range(repeats):
            for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                t0 = time.perf_counter()
                for f in feeds:
                    sessions[k].run(["logits"], f)
                times[k].append(time.perf_counter() - t0)
        sizes = {"merged": merged_path.stat().st_size, "factors": factored_path.stat().st_size}
    med = {k: rows / statistics.median(v) for k, v in times.items()}
    print(f"\ngraph layout, scenario {scenario!r}, {rows} rows, {threads} thread(s), ONNX Runtime fp32 forward: "
          f"merged {med['merged']:.1f} rows/s, factors at run time {med['factors']:.1f} rows/s "
          f"(merged / factors {med['merged'] / med['factors']:.2f}x; max |dlogit| {np.abs(ref - got).max():.1e}; "
          f"graph sizes {sizes['merged'] / 2**20:.1f} / {sizes['factors'] / 2**20:.1f} MiB)", flush=True)
    return {"rows_per_s": med, "bytes": sizes, "scenario": scenario}
