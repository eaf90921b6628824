"""Scoring engines side by side on a fine-tuned MiniLM: end-to-end and forward-only rows/s, the GEMM ceiling, RSS.

    python benchmarks/score_engines.py --layouts            # the documented run (about 30 min on 2 cores)
    python benchmarks/score_engines.py --threads 1 --rows 512 --repeats 1 --skip-rss    # a quick look

The model is all-MiniLM-L6-v2 fine-tuned on real WDC product pairs by the project's own training and exported
with its precision gate (benchmarks/score_engines_model.py; cached under --work). The traffic is real WDC test
pairs in their own columns. For each thread count (--threads) and each configuration

    torch fp32                today's path (the baseline of every ratio)
    onnxruntime fp32          the export's merged graphs
    onnxruntime int8_*        the int8 candidates (dynamic, static-calibrated, partial), gate passed or not
    torch bf16                torch autocast-free bf16 weights and activations
    auto auto                 what serving.engine=auto, serving.precision=auto serve: per scenario the
                              fastest precision that passed the gate

it measures, in interleaved trials (the order rotates every repeat; medians of --repeats):
    end to end     serving.score's per-unit code (serving.scoring.worker.score_unit): read and validate the
                   Parquet, tokenize, group and batch, forward, write the scored Parquet and the marker
    forward only   the same batches, already tokenized: model.use + model.logits alone
and prints rows/s, the ratio to torch fp32 end to end, end-to-end / forward-only, and the forward's achieved
GFLOP/s (matmul FLOPs of the batch shapes actually run, benchmarks/gemm_peak.py) against this machine's GEMM
peak for the dtype and against the highest peak. Then the gate's figures per scenario and candidate, the
peak RSS of ``python -m serving.score`` (default engine) on --rss-rows and 10x as many rows, each in its own
process, and (--layouts) the merged-graph layout against a graph that applies the LoRA factors at run time.
Targets: ONNX fp32 >= 1.8x torch fp32; the gate-passing default >= 3x; end to end >= 0.85x forward only;
RSS at 10x the rows <= 1.3x.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gemm_peak import cpu_flags, cpu_model, encoder_flops, gemm_peaks  # noqa: E402
from benchmarks.score_engines_model import fine_tuned_export, traffic  # noqa: E402

CONFIGS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8_dynamic"),
           ("onnxruntime", "int8_static"), ("onnxruntime", "int8_partial"), ("torch", "bf16"), ("auto", "auto")]
DTYPE_OF = {"fp32": "fp32", "bf16": "bf16", "int8_dynamic": "int8", "int8_static": "int8", "int8_partial": "int8"}


def name_of(engine: str, precision: str) -> str:
    return f"{engine} {precision}"


class Trial:
    """One configuration's scorer, its tokenized chunks (forward only) and its timings."""

    def __init__(self, export_dir: Path, cfg, engine: str, precision: str, threads: int, plan):
        from serving.scoring.scorer import BatchScorer, route_scenarios

        self.serving = dataclasses.replace(cfg.serving, engine=engine, precision=precision, threads=threads)
        self.scorer = BatchScorer(export_dir, self.serving, "bench")
        self.batches = []  # (scenario, tokenized batch), as the scorer plans the chunks that score_unit cuts
        for unit in plan.units:
            import pyarrow as pa

            accepted = [a for a, _, _ in plan.batches(unit) if a.num_rows]
            table = pa.Table.from_batches(accepted).combine_chunks()
            for start in range(0, table.num_rows, self.serving.chunk_rows):
                part = table.slice(start, self.serving.chunk_rows)
                scored_as, _, _ = route_scenarios(part.column("scenario"), self.scorer.scenarios, self.serving)
                self.batches += [(s, self.scorer.tokenize(part, s, rows)) for s, rows in self.scorer.batches(part, scored_as)]
        self.rows = sum(len(f) for _, f in self.batches)
        self.shapes = [(len(f), int(f.lengths.max())) for _, f in self.batches]
        self.e2e, self.fwd = [], []

    def forward_only(self) -> float:
        t0 = time.perf_counter()
        for scenario, feats in self.batches:
            self.scorer.forward(scenario, feats)
        return time.perf_counter() - t0

    def end_to_end(self, plan, out: Path) -> float:
        from serving.scoring.worker import score_unit

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        for unit in plan.units:
            score_unit(self.scorer, plan, unit, out)
        return time.perf_counter() - t0


def measure(export_dir: Path, path: Path, threads: int, repeats: int, work: Path, configs) -> dict:
    import torch

    from kernel.config import load_config
    from serving.scoring.plan import Inputs

    torch.set_num_threads(threads)
    cfg = load_config(export_dir / "config.yaml")
    plan = Inputs(cfg, [str(path)])
    trials = {name_of(*c): Trial(export_dir, cfg, *c, threads, plan) for c in configs}
    for t in trials.values():  # warm-up: every scenario's session or weights, kernels, allocator
        for scenario in t.scorer.scenarios:
            t.scorer.forward(scenario, next(f for s, f in t.batches if s == scenario))
    names = list(trials)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            trials[n].e2e.append(trials[n].end_to_end(plan, work / "out"))
            trials[n].fwd.append(trials[n].forward_only())
        print(f"  threads {threads}: repeat {r + 1}/{repeats} done", flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    raw = json.loads((export_dir / "base" / "config.json").read_text())
    config = argparse.Namespace(**raw.get("encoder", raw))  # mean pooling wraps the encoder's config
    out = {}
    for n, t in trials.items():
        e2e, fwd = statistics.median(t.e2e), statistics.median(t.fwd)
        out[n] = {"rows": t.rows, "e2e_rows_per_s": t.rows / e2e, "fwd_rows_per_s": t.rows / fwd,
                  "gflop": encoder_flops(config, t.shapes) / 1e9,
                  "plan": sorted({f"{e}/{p}" for e, p in t.scorer.plan.values()}), "e2e_s": t.e2e, "fwd_s": t.fwd}
        out[n]["gflops"] = out[n]["gflop"] / fwd
    return out


def report(results: dict, peaks: dict, threads: int) -> None:
    base = results[name_of("torch", "fp32")]["e2e_rows_per_s"]
    best_peak = max(peaks.values())
    print(f"\nthreads {threads}: rows/s (median), ratio to torch fp32 end to end; GEMM peaks GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print(f"  {'configuration':26} {'e2e rows/s':>10} {'vs torch':>8} {'fwd rows/s':>10} {'e2e/fwd':>7} "
          f"{'GFLOP/s':>8} {'of dtype peak':>13} {'of top peak':>11}  served as")
    for n, r in results.items():
        precision = n.split()[1]
        dtype = DTYPE_OF.get(precision, "fp32")
        peak = max(v for k, v in peaks.items() if k.startswith(dtype)) if precision != "auto" else best_peak
        print(f"  {n:26} {r['e2e_rows_per_s']:10.1f} {r['e2e_rows_per_s'] / base:7.2f}x {r['fwd_rows_per_s']:10.1f} "
              f"{r['e2e_rows_per_s'] / r['fwd_rows_per_s']:7.2f} {r['gflops']:8.1f} {r['gflops'] / peak:12.1%} "
              f"{r['gflops'] / best_peak:10.1%}  {', '.join(r['plan'])}")
    ort, auto = results[name_of("onnxruntime", "fp32")], results[name_of("auto", "auto")]
    checks = [("onnxruntime fp32 / torch fp32 >= 1.8", ort["e2e_rows_per_s"] / base, 1.8),
              ("auto (gate-passing) / torch fp32 >= 3", auto["e2e_rows_per_s"] / base, 3.0)]
    checks += [(f"{n} e2e / forward >= 0.85", r["e2e_rows_per_s"] / r["fwd_rows_per_s"], 0.85) for n, r in results.items()]
    for label, value, target in checks:
        print(f"  {label:50} {value:6.2f}  {'met' if value >= target else 'MISSED'}")


def report_gate(export_dir: Path) -> dict:
    from serving.layout import read_manifest

    onnx = read_manifest(export_dir)["onnx"]
    gate = onnx["gate"]
    print(f"\nprecision gate (export, validation rows; limits max |dp| {gate['max_abs_dp']}, |AUC change| "
          f"{gate['max_auc_change']}); rows/s measured by the export: {gate['rows_per_s']}")
    for s, res in gate["scenarios"].items():
        print(f"  {s:10} {res['rows']:5} rows, AUC fp32 {res['auc_fp32']:.4f}; served: {onnx['serve'][s]}")
        for c, r in res["candidates"].items():
            if r["max_abs_dp"] is None or r["auc_change"] is None:
                print(f"      {c:13} {r['why']}")
                continue
            print(f"      {c:13} max |dp| {r['max_abs_dp']:.4f}  AUC change {r['auc_change']:+.4f}  "
                  f"{'passed' if r['passed'] else 'FAILED'}")
    return gate


def bf16_probe(export_dir: Path, path: Path, threads: int, rows: int = 64) -> dict:
    """Where bf16 is emulated (no fast kernels), a short look instead of full trials: forward-only rows/s and
    max |dp| against fp32 on the first ``rows`` traffic rows."""
    import pyarrow.parquet as pq
    import torch

    from kernel.config import load_config
    from serving.scoring.plan import Inputs

    torch.set_num_threads(threads)
    cfg = load_config(export_dir / "config.yaml")
    small = path.with_name(f"{path.stem}-first{rows}.parquet")
    pq.write_table(pq.read_table(path).slice(0, rows), small)
    plan = Inputs(cfg, [str(small)])
    out = {}
    for precision in ("fp32", "bf16"):
        t = Trial(export_dir, cfg, "torch", precision, threads, plan)
        t.forward_only()
        seconds = t.forward_only()
        logits = np.concatenate([t.scorer.forward(s, f) for s, f in t.batches])
        out[precision] = {"rows_per_s": t.rows / seconds, "p": 1 / (1 + np.exp(-logits.astype(np.float64)))}
    dp = float(np.abs(out["bf16"]["p"] - out["fp32"]["p"]).max())
    print(f"  torch bf16 (emulated here, {rows} rows, forward only): {out['bf16']['rows_per_s']:.1f} rows/s vs fp32 "
          f"{out['fp32']['rows_per_s']:.1f} ({out['bf16']['rows_per_s'] / out['fp32']['rows_per_s']:.2f}x); "
          f"max |dp| {dp:.4f}", flush=True)
    return {"bf16_rows_per_s": out["bf16"]["rows_per_s"], "fp32_rows_per_s": out["fp32"]["rows_per_s"], "max_abs_dp": dp}


def rss(export_dir: Path, work: Path, rows: int, threads: int) -> dict:
    """Peak RSS (MiB) of ``python -m serving.score`` (default engine and precision) on rows and 10x rows."""
    code = ("import resource, sys; from serving.scoring.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = {}
    for n in (rows, 10 * rows):
        path = traffic(work, n, seed=1)
        dest = work / f"rss-out-{n}"
        shutil.rmtree(dest, ignore_errors=True)
        res = subprocess.run([sys.executable, "-c", code, "--model", str(export_dir), "--input", str(path),
                              "--output", str(dest), "--quiet", f"serving.threads={threads}"],
                             cwd=REPO, capture_output=True, text=True, check=True)
        shutil.rmtree(dest, ignore_errors=True)
        peak = int(next(x for x in res.stdout.splitlines() if x.startswith("MAXRSS")).split()[1]) / 1024
        rate = float(next(x for x in res.stderr.splitlines() if "scored " in x and " rows/s" in x)  # a log record
                     .split(" rows/s")[0].rsplit(" ", 1)[1])
        out[n] = {"peak_rss_mib": round(peak, 1), "rows_per_s": rate}
        print(f"  {n:>7} rows: peak RSS {peak:7.1f} MiB, {rate:7.1f} rows/s end to end (with model load)", flush=True)
    ratio = out[10 * rows]["peak_rss_mib"] / out[rows]["peak_rss_mib"]
    print(f"  10x rows / 1x peak RSS {ratio:.3f}  (target <= 1.3: {'met' if ratio <= 1.3 else 'MISSED'})")
    return {"sizes": out, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "score-engines", help="cache of data, model, export")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (batch 32)")
    p.add_argument("--rows", type=int, default=1024, help="traffic rows per timed pass")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss-rows", type=int, default=1000, help="RSS at this many rows and 10x as many")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--layouts", action="store_true", help="also: merged graphs vs LoRA factors at run time")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_model()}; flags: {' '.join(cpu_flags()) or 'none of AVX2/AVX-512/AMX'}", flush=True)
    export_dir = fine_tuned_export(args.work, args.steps)
    path = traffic(args.work, args.rows)
    result = {"cpu": cpu_model(), "flags": cpu_flags(), "export": str(export_dir), "gate": report_gate(export_dir)}
    from serving.export.precision_gate import fast_bf16

    configs = [c for c in CONFIGS if c != ("torch", "bf16") or fast_bf16()]
    for threads in args.threads:
        print(f"\nmeasuring at {threads} thread(s): {len(configs)} configurations x {args.repeats} repeats, "
              f"{args.rows} rows each", flush=True)
        peaks = gemm_peaks(threads)
        result[f"threads_{threads}"] = {"peaks": peaks,
                                        "configs": measure(export_dir, path, threads, args.repeats, args.work, configs)}
        report(result[f"threads_{threads}"]["configs"], peaks, threads)
        if ("torch", "bf16") not in configs:
            result[f"threads_{threads}"]["bf16_probe"] = bf16_probe(export_dir, path, threads)
    if args.layouts:
        from benchmarks.score_layouts import compare_layouts

        result["layouts"] = compare_layouts(export_dir, path, min(args.threads), args.repeats)
    if not args.skip_rss:
        print(f"\npeak RSS of python -m serving.score (serving.engine=auto, precision=auto), {max(args.threads)} "
              "thread(s)", flush=True)
        result["rss"] = rss(export_dir, args.work, args.rss_rows, max(args.threads))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
