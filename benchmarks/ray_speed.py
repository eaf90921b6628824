"""Batch-scoring throughput of the engines: the local one-process engine, Ray with 1 actor, Ray with 2 actors.

    python benchmarks/ray_speed.py                        # CPU, 2 cores: about 12 minutes
    python benchmarks/ray_speed.py --rows 6144 --unit-rows 768 --row-group 256 --repeats 3   # many tiny units

Two inputs of the same --rows rows, scored by ``serving.scoring.cli.run`` (what the CLI and the job run):
    large   one file of --row-group rows per row group, serving.unit_rows=--unit-rows: several units of
            one file (the case Ray could not split before units existed)
    small   --files files of one row group each: one unit per file
Every (input, engine) pair runs once per repeat, in an order rotated every repeat, so load changes of the
(shared) machine hit all alike; medians over --repeats are reported.

Timing: ``run`` end to end, into a fresh output folder, with the private Ray already running (as a
cluster would be): the local engine loads its model in this process; Ray starts its actors (a process each,
imports, model load) inside the timed call. "steady" is rows / (last unit's end - first unit's start), from
the units' markers: the scoring rate once the model is loaded, without the fixed start-up; "first unit
after" is that start-up (seconds from the call to the first unit's start). A fixed start-up of s seconds
keeps the end-to-end ratio above 1.15 for jobs shorter than about s / 0.15 seconds.
Threads: one torch thread for the local engine and per actor (--threads), so 2 actors use 2 cores.

Targets (printed with the figures):
    Ray 1 actor / local, time (end to end)    <= 1.15     on both inputs
    Ray 2 actors / Ray 1 actor, rows/s        >= 1.6      on the large file

The model: a random BERT-shaped encoder of --hidden x --layers (default 256 x 4, intermediate 4x) on
pairs of ~20 words cut at --max-length 64 tokens. At that size one row's forward (~0.4 GFLOP) costs
milliseconds on one core, far more than the per-row Python and Arrow work (tokenising, routing, writing)
and the per-unit Ray work (a task, a footer read, three file commits): the time is the model's, which is
what the 2-actor scaling target needs to mean anything. A 32-wide model would measure Python instead.
"""
from __future__ import annotations

import argparse
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

WORDS = np.array([
    "camera", "lens", "zoom", "laptop", "ssd", "ram", "shoe", "leather", "size", "watch", "strap", "steel", "black",
    "red", "blue", "pro", "max", "mini", "ultra", "4k", "usb", "wifi", "sport", "men", "women", "kids", "case", "kit",
    "charger", "battery", "wireless", "bluetooth", "waterproof", "running", "trail", "hiking", "gaming", "keyboard",
    "mouse", "monitor", "tripod", "flash"])
ENGINES = ("local", "ray1", "ray2")


def build_model(work: Path, hidden: int, layers: int, max_length: int) -> Path:
    """A random encoder, exported as serving loads it; returns the export folder."""
    import torch

    from kernel.config import config_from_dict
    from kernel.task_map import TaskMap
    from modeling.artifact import save_trained
    from modeling.model import build_model as build
    from serving.export.cli import run as export
    from serving.export.source import export_config

    cfg = config_from_dict({
        "model": {"init": "random", "pooling": "mean", "tokenizer": "minilm",
                  "random_config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": hidden,
                                    "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
                                    "intermediate_size": 4 * hidden}},
        "adapter": {"r": 8, "n_up": 2, "dropout": 0.0},
        "features": {"max_length": max_length},
        "serving": {"chunk_rows": 1024, "batch_size": 64},
        "tracking": {"enabled": False},
    })
    tm = TaskMap(["a", "b", "c"])
    model = build(cfg, len(tm))
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B and head: every scenario has its own weights
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith((".A", ".lam", ".w")):
                torch.nn.init.normal_(p, std=0.02)
    save_trained(model, cfg, tm, {}, work / "model")
    export(export_config(work / "model"), work / "model", work / "export")
    return work / "export"


def write_inputs(work: Path, rows: int, row_group: int, files: int) -> dict[str, Path]:
    """The same rows twice: one large file of many row groups, and ``files`` small one-group files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)

    def text(n: int, m: int) -> list[str]:
        return [" ".join(x) for x in WORDS[rng.integers(0, len(WORDS), (n, m))]]

    table = pa.table({"query": text(rows, 5), "title": text(rows, 15),
                      "scenario": rng.choice(["a", "b", "c"], rows).tolist()})
    (work / "large").mkdir()
    pq.write_table(table, work / "large" / "big.parquet", row_group_size=row_group)
    (work / "small").mkdir()
    per = -(-rows // files)
    for i in range(files):
        part = table.slice(i * per, per)
        pq.write_table(part, work / "small" / f"f{i:03d}.parquet", row_group_size=max(1, part.num_rows))
    return {"large": work / "large", "small": work / "small"}


def from_markers(out: Path) -> tuple[float, float, int]:
    """(rows / (last unit's end - first unit's start), the first unit's start, processes that scored)."""
    marks = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    start = min(m["started"] for m in marks)
    end = max(m["started"] + m["seconds"] for m in marks)
    return sum(m["rows_in"] for m in marks) / max(end - start, 1e-9), start, len({m["pid"] for m in marks})


def run_one(engine: str, inputs: Path, out: Path, cfg, export: Path, threads: int) -> dict:
    from serving.scoring.cli import run

    actors = {"local": 1, "ray1": 1, "ray2": 2}[engine]
    shutil.rmtree(out, ignore_errors=True)
    wall, t0 = time.time(), time.perf_counter()
    summary = run(cfg, export, [str(inputs)], out, model_version="bench", quiet=True, workers=actors,
                  engine="local" if engine == "local" else "ray", ray_threads=threads).info
    seconds = time.perf_counter() - t0
    assert summary["rows_in"] == summary["scored"], summary
    steady, first_start, pids = from_markers(out)
    return {"seconds": seconds, "rows_per_s": summary["rows_in"] / seconds, "steady_rows_per_s": steady,
            "startup_s": first_start - wall, "units": summary["shards"], "pids": pids}


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # Defaults: units of ~4 s of scoring each (12 per input), a job of ~50 s: what the targets are stated for.
    p.add_argument("--rows", type=int, default=36000, help="rows of each input")
    p.add_argument("--row-group", type=int, default=1024, help="rows per row group of the large file")
    p.add_argument("--unit-rows", type=int, default=3072, help="serving.unit_rows")
    p.add_argument("--files", type=int, default=12, help="files of the small-files input")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the local engine and of each actor")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from kernel.config import load_config
    from serving.scoring.ray_engine import init_ray

    torch.set_num_threads(args.threads)  # the local engine scores in this process
    work = Path(tempfile.mkdtemp(prefix="ray-speed-"))
    try:
        export = build_model(work, args.hidden, args.layers, args.max_length)
        inputs = write_inputs(work, args.rows, args.row_group, args.files)
        cfg = load_config(export / "config.yaml", [f"serving.unit_rows={args.unit_rows}",
                                                  "data.columns.description=null", "data.columns.url=null"])
        ray = init_ray("local")  # once, as a running cluster: the timed runs start actors, not Ray
        print(f"model {args.hidden}x{args.layers} (max_length {args.max_length}); {args.rows} rows per input: "
              f"large = 1 file, {args.rows // args.row_group} row groups, unit_rows {args.unit_rows}; small = "
              f"{args.files} files; {args.threads} thread(s) per engine process; {args.repeats} repeats; "
              f"{os.cpu_count()} CPUs, Ray sees {ray.cluster_resources().get('CPU', 0):g}", flush=True)
        print(f"  before: {load()}", flush=True)
        pairs = [(w, e) for w in inputs for e in ENGINES]
        runs: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
        run_one("local", inputs["small"], work / "warm", cfg, export, args.threads)  # warm-up (imports, caches)
        for r in range(args.repeats):
            k = r % len(pairs)
            for w, e in pairs[k:] + pairs[:k]:  # rotated every repeat
                res = run_one(e, inputs[w], work / f"out-{w}-{e}", cfg, export, args.threads)
                runs[(w, e)].append(res)
                print(f"  repeat {r}  {w:>5} {e:>5}: {res['seconds']:6.2f} s  {res['rows_per_s']:7.1f} rows/s "
                      f"(steady {res['steady_rows_per_s']:7.1f}, first unit after {res['startup_s']:5.2f} s)  "
                      f"{res['units']} units, {res['pids']} process(es)", flush=True)
        print(f"  after:  {load()}", flush=True)
        result = report(runs, args)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def report(runs: dict, args) -> dict:
    keys = ("seconds", "rows_per_s", "steady_rows_per_s", "startup_s")
    med = {f"{w}/{e}": {k: statistics.median(x[k] for x in v) for k in keys} for (w, e), v in runs.items()}
    print("medians: rows/s end to end, rows/s steady, seconds, seconds to the first unit:")
    for key, m in med.items():
        print(f"  {key:>11}: {m['rows_per_s']:8.1f}  {m['steady_rows_per_s']:8.1f}  {m['seconds']:7.2f} s  "
              f"{m['startup_s']:5.2f} s")
    ratios = {}
    for w in ("large", "small"):
        ratios[f"{w}: ray1/local time"] = med[f"{w}/ray1"]["seconds"] / med[f"{w}/local"]["seconds"]
        ratios[f"{w}: ray1/local time, steady"] = (med[f"{w}/local"]["steady_rows_per_s"]
                                                   / med[f"{w}/ray1"]["steady_rows_per_s"])
        ratios[f"{w}: ray2/ray1 rows/s"] = med[f"{w}/ray2"]["rows_per_s"] / med[f"{w}/ray1"]["rows_per_s"]
        ratios[f"{w}: ray2/ray1 rows/s, steady"] = (med[f"{w}/ray2"]["steady_rows_per_s"]
                                                    / med[f"{w}/ray1"]["steady_rows_per_s"])
    targets = {"large: ray1/local time": ("<=", 1.15), "small: ray1/local time": ("<=", 1.15),
               "large: ray2/ray1 rows/s": (">=", 1.6)}
    print("ratios:")
    for key, v in ratios.items():
        goal = targets.get(key)
        verdict = ""
        if goal:
            ok = v <= goal[1] if goal[0] == "<=" else v >= goal[1]
            verdict = f"  (target {goal[0]} {goal[1]}: {'met' if ok else 'MISSED'})"
        print(f"  {key:<32} {v:6.3f}{verdict}")
    return {"medians": med, "ratios": ratios, "runs": {f"{w}/{e}": v for (w, e), v in runs.items()},
            "args": {k: str(v) for k, v in vars(args).items()}}


if __name__ == "__main__":
    sys.exit(main())
