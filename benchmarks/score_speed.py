"""Scoring speed of the three forward paths, and peak RSS of batch scoring as the input grows.

    python benchmarks/score_speed.py                                    # CPU, MiniLM-shaped model
    python benchmarks/score_speed.py --preset tiny --rows 512 --threads 2
    python benchmarks/score_speed.py --device cuda --dtype bf16 --preset bert-base --rows 8192 \\
        --batch 256 --seq 128 --skip-rss                                # on a GPU machine

Speed (pairs/s, median of --repeats timed passes, paths interleaved so load changes hit all alike):
    base       the plain base model (no adapters): the cost floor
    merged     serving.scoring.model.ScoringModel as serving.scoring.scorer drives it: per chunk of --chunk rows,
               rows grouped by scenario, weights switched to W0 + U_t A_t once per group (switch cost
               included; the scenario still loaded goes first), then the plain forward
    unmerged   the training-time RelevanceModel: one mixed-scenario batch through MTL-LoRA layers
Targets: merged / base throughput >= 0.97; unmerged / base time <= 1.10.
All paths see the same random token ids (--seq tokens, no padding); --tasks scenarios, equally many rows
each, shuffled (the unmerged path's batches mix them). The time of one switch is printed too.

Peak RSS: ``python -m serving.score`` on synthetic Parquet inputs of growing size (--rss-rows), each in
its own process reporting its ru_maxrss; flat means the largest input's peak stays within 10% of the
smallest's (memory is bounded by data.batch_rows and serving.chunk_rows, set small here).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernel.config import ServingConfig  # noqa: E402  (after the path insert: runs from anywhere)

PRESETS = {  # BERT-shaped encoders; vocab of the MiniLM tokenizer
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def build(preset: str, tasks: int, r: int, pooling: str, dtype: torch.dtype, device: str):
    from kernel.config import config_from_dict
    from modeling.model import build_model
    from serving.scoring.model import ScoringModel

    cfg = config_from_dict({
        "model": {"init": "random", "pooling": pooling,
                  "random_config": {"model_type": "bert", "vocab_size": 30522, **PRESETS[preset]}},
        "adapter": {"r": r, "n_up": 3, "dropout": 0.0},
    })
    model = build_model(cfg, tasks)
    with torch.no_grad():  # non-zero B and head: every scenario has a real delta
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith((".A", ".lam", ".w")):
                torch.nn.init.normal_(p, std=0.02)
    model = model.to(device=device, dtype=dtype).eval()
    scenarios = [f"s{t}" for t in range(tasks)]
    merged = ScoringModel.from_trained(model, scenarios, device)  # base weights + factors, as serving loads
    return model, merged, scenarios


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def speed(args) -> dict:
    from modeling.merge import base_backbone
    from modeling.model import pooled_logits

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, merged, scenarios = build(args.preset, args.tasks, args.r, args.pooling, dtype, args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.rows, args.seq), generator=g)
    # Every scenario gets rows / tasks rows, shuffled.
    task = (torch.arange(args.rows) % args.tasks)[torch.randperm(args.rows, generator=g)]
    bs, chunk, dev = args.batch, args.chunk, args.device
    # Batches are built before timing, on the device, for every path alike: the timed region is the
    # forward passes (plus, for merged, the weight switches), not data preparation.
    base_batches = [(ids[s:s + bs].to(dev), torch.ones(min(bs, args.rows - s), args.seq, dtype=torch.long,
                                                          device=dev)) for s in range(0, args.rows, bs)]
    unmerged_batches = [(i, m, task[s:s + bs].to(dev)) for (i, m), s in zip(base_batches, range(0, args.rows, bs))]
    chunks = []  # per chunk: {task: [(ids, mask), ...]}, rows grouped by scenario as serving.scoring.scorer does
    for c in range(0, args.rows, chunk):
        t_chunk, groups = task[c:c + chunk], {}
        for t in sorted(set(t_chunk.tolist())):
            rows = c + torch.nonzero(t_chunk == t).flatten()
            groups[t] = [(ids[rows[s:s + bs]].to(dev), torch.ones(len(rows[s:s + bs]), args.seq, dtype=torch.long,
                                                                 device=dev)) for s in range(0, len(rows), bs)]
        chunks.append(groups)
    plain = base_backbone(model)  # the base model without adapters, for the base path

    def base():
        for i, m in base_batches:
            pooled_logits(plain, merged.pooling, merged.head, i, m)

    def merged_path():
        # The scenario still loaded goes first, one weight switch per further group; the loaded scenario
        # carries over between chunks and passes, as in serving.scoring.scorer.
        for groups in chunks:
            order = sorted(groups, key=lambda t: scenarios[t] != merged.current)
            for t in order:
                merged.use(scenarios[t])
                for i, m in groups[t]:
                    merged.logits(i, m)

    def unmerged():
        for i, m, t in unmerged_batches:
            model(i, m, t)

    def switch_ms() -> float:
        sync(args.device)
        t0 = time.perf_counter()
        for i in range(20):
            merged.use(scenarios[i % len(scenarios)] if merged.current != scenarios[i % len(scenarios)]
                       else scenarios[(i + 1) % len(scenarios)])
        sync(args.device)
        return (time.perf_counter() - t0) / 20 * 1000

    paths = {"base": base, "merged": merged_path, "unmerged": unmerged}
    times = {k: [] for k in paths}
    for fn in paths.values():  # warm-up (allocator, kernels)
        fn()
    for i in range(args.repeats):
        for k in list(paths)[i % 3:] + list(paths)[:i % 3]:  # rotate the order every repeat
            sync(args.device)
            t0 = time.perf_counter()
            paths[k]()
            sync(args.device)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"pairs_per_s": {k: args.rows / v for k, v in med.items()}, "median_s": med,
            "switch_ms": statistics.median(switch_ms() for _ in range(3)),
            "merged_vs_base_throughput": med["base"] / med["merged"],
            "unmerged_vs_base_time": med["unmerged"] / med["base"]}


def rss(args) -> dict:
    """Peak RSS (MiB) and rows/s of ``python -m serving.score`` per input size, each in a fresh process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kernel.config import config_from_dict
    from kernel.task_map import TaskMap
    from modeling.artifact import save_trained
    from modeling.model import build_model
    from serving.export.cli import run as export
    from serving.export.source import export_config

    words = np.array("camera lens zoom laptop ssd ram shoe leather size watch strap steel black red blue "
                     "pro max mini ultra 4k usb wifi sport men women kids case kit".split())
    work = Path(tempfile.mkdtemp(prefix="score-rss-"))
    cfg = config_from_dict({
        "model": {"init": "random", "pooling": "mean", "tokenizer": "minilm",
                  "random_config": {"model_type": "bert", "vocab_size": 30522, **PRESETS["tiny"]}},
        "adapter": {"r": 4, "n_up": 2, "dropout": 0.0},
        "features": {"max_length": 64},
        "data": {"batch_rows": 1024},
        "serving": {"chunk_rows": 1024, "batch_size": 64},
    })
    tm = TaskMap(["a", "b", "c"])
    save_trained(build_model(cfg, len(tm)), cfg, tm, {}, work / "model")
    export(export_config(work / "model"), work / "model", work / "export")
    rng = np.random.default_rng(0)
    out = {}
    for n in args.rss_rows:
        path = work / f"in-{n}.parquet"
        with pq.ParquetWriter(path, pa.schema([("query", pa.string()), ("title", pa.string()),
                                               ("scenario", pa.string())])) as w:
            for s in range(0, n, 4096):
                k = min(4096, n - s)
                text = lambda m: [" ".join(x) for x in words[rng.integers(0, len(words), (k, m))]]  # noqa: E731
                w.write_table(pa.table({"query": text(4), "title": text(12),
                                        "scenario": rng.choice(["a", "b", "c"], k).tolist()}))
        code = ("import resource, sys, psutil; from serving.scoring.cli import main; rc = main(sys.argv[1:]); "
                "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
                "print('ENDRSS', psutil.Process().memory_info().rss // 1024); sys.exit(rc)")
        cmd = [sys.executable, "-c", code, "--model", str(work / "export"), "--input", str(path), "--output",
               str(work / f"out-{n}"), "--quiet", "data.columns.description=null", "data.columns.url=null"]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
        lines = res.stdout.strip().splitlines()
        peak = int(next(x for x in lines if x.startswith("MAXRSS")).split()[1]) / 1024
        end = int(next(x for x in lines if x.startswith("ENDRSS")).split()[1]) / 1024
        rate = next(x for x in res.stderr.splitlines() if "scored " in x and " rows/s" in x  # a log record
                    ).split(" rows/s")[0].rsplit(" ", 1)[1]
        out[n] = {"peak_rss_mib": round(peak, 1), "end_rss_mib": round(end, 1), "rows_per_s": float(rate)}
        print(f"  {n:>8} rows: peak RSS {peak:7.1f} MiB (at exit {end:7.1f} MiB), {float(rate):8.1f} rows/s "
              "end to end", flush=True)
    peaks = [v["peak_rss_mib"] for v in out.values()]
    return {"sizes": out, "largest_vs_smallest_rss": peaks[-1] / peaks[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="minilm")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rows", type=int, default=1024, help="pairs per timed pass")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--chunk", type=int, default=ServingConfig().chunk_rows,
                   help="rows grouped by scenario together (serving.chunk_rows)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--rss-rows", type=int, nargs="+", default=[4000, 16000, 64000])
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {}
    if not args.skip_speed:
        print(f"speed: {args.preset} {args.pooling} {args.dtype} on {args.device}, {args.rows} pairs x {args.seq} "
              f"tokens, batch {args.batch}, {args.tasks} scenarios, r={args.r}, {args.repeats} repeats", flush=True)
        result["speed"] = speed(args)
        report_speed(result["speed"], args)
    if not args.skip_rss:
        print(f"peak RSS of python -m serving.score as the input grows: {args.rss_rows}", flush=True)
        result["rss"] = rss(args)
        ratio = result["rss"]["largest_vs_smallest_rss"]
        print(f"  largest / smallest peak RSS {ratio:.3f}  (flat: <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def report_speed(s: dict, args) -> None:
    for k, v in s["pairs_per_s"].items():
        print(f"  {k:>9}: {v:10.1f} pairs/s   (median {s['median_s'][k] * 1000:8.1f} ms)")
    print(f"  one weight switch (all adapted layers) {s['switch_ms']:.2f} ms; chunk {args.chunk} rows")
    ok_m, ok_u = s["merged_vs_base_throughput"] >= 0.97, s["unmerged_vs_base_time"] <= 1.10
    print(f"  merged / base throughput  {s['merged_vs_base_throughput']:.3f}  (target >= 0.97: "
          f"{'met' if ok_m else 'MISSED'})")
    print(f"  unmerged / base time      {s['unmerged_vs_base_time']:.3f}  (target <= 1.10: "
          f"{'met' if ok_u else 'MISSED'})")


if __name__ == "__main__":
    sys.exit(main())
