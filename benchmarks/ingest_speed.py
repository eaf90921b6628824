"""Ingest throughput on one core, peak RSS as the input grows, tokenisation pairs/s.

    python -m benchmarks.ingest_speed                                   # 5M generated rows, ~2-4 minutes
    python -m benchmarks.ingest_speed --rows 1000000 --repeats 1 --tokenize-rows 5000   # a quick look
    python -m benchmarks.ingest_speed --tokenizer /path/to/model_dir    # any local fast tokenizer

The data are the synthetic demo markets (``pipeline.synthetic``: query, title, description, url, label,
scenario, request_id, ad_id) with the ids as pass-through keys. The process is pinned to one CPU core and
Arrow to one thread. Each figure is the median of ``--repeats`` runs, each next to a baseline measured in
the same process:

    read      stream the same columns as record batches and nothing else (the floor of any ingest)
    validate  read + column mapping + every row check (pipeline.ingest.read_validated): ingest + validate
    ingest    all of run_ingest: validate, quarantine, cross-file dedupe, hash split, Parquet outputs, stats

The real WDC products data (``<repo>/../shared/data/wdc_products``) are read through the column mapping
(left -> query, right -> ad title, category -> scenario) and timed the same way. Peak RSS of run_ingest is
measured in fresh child processes for N/10 and N rows (ratio should stay
<= 1.3: memory does not grow with the input). Tokenisation compares build_features (tokenise + flatten
into Arrow lists) with the bare tokenizer call on the same pairs.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizer's thread pool: one core, like the rest

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kernel.config import SyntheticConfig, config_from_dict
from pipeline.ingest import read_validated, run_ingest
from pipeline.reader import ParquetSource
from pipeline.synthetic import MARKETS, generate

COLUMNS = ["query", "title", "description", "url", "label", "scenario", "request_id", "ad_id"]
WDC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wdc_products"
WDC_MAPPING = {"query": "left", "title": "right", "description": None, "url": None, "scenario": "category"}


def one_core() -> int:
    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    return core


def bench_cfg():
    return config_from_dict({"data": {"max_reject_rate": 1.0, "columns": {"keys": ["request_id", "ad_id"]}},
                             "tracking": {"enabled": False}})


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_wdc(path: Path, work: Path, repeats: int) -> str:
    """The real WDC products data, read through the column mapping as a user's data would be."""
    if not path.is_dir():
        return f"real data: {path} not found, skipped"
    cfg = config_from_dict({"data": {"columns": WDC_MAPPING}, "tracking": {"enabled": False}})
    t_val, t_ing = [], []
    for r in range(repeats):
        t_val.append(timed(lambda: sum(a.num_rows + q.num_rows for a, q in read_validated(cfg, path))))
        t_ing.append(timed(lambda: run_ingest(cfg, path, work / f"wdc{r}")))
    report = run_ingest(cfg, path, work / "wdc")
    n = report.rows_in
    return (f"real data ({path.name}, {n:,} rows, {len(report.scenarios)} scenarios): validate "
            f"{n / statistics.median(t_val):,.0f} rows/s, ingest {n / statistics.median(t_ing):,.0f} rows/s; "
            f"{report.rows_accepted:,} accepted, quarantined {report.by_reason}")


def read_only(path: Path) -> int:
    n = 0
    for part in ParquetSource.open(path).parts():
        for batch, _ in part.batches(COLUMNS):
            n += batch.num_rows
    return n


def validate_only(path: Path) -> int:
    return sum(a.num_rows + q.num_rows for a, q in read_validated(bench_cfg(), path))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child_ingest(path: str, out: str) -> None:
    """Run in a fresh interpreter: print the peak RSS of one run_ingest as JSON."""
    one_core()
    base = rss_mb()
    start = time.perf_counter()
    report = run_ingest(bench_cfg(), Path(path), Path(out))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": report.rows_in, "peak_rss_mb": peak, "base_rss_mb": base, "seconds": wall}))


def peak_rss(path: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.ingest_speed", "--child", str(path), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_tokenize(train: Path, tokenizer_path: str, rows: int, repeats: int) -> dict:
    from transformers import AutoTokenizer

    from features.tokenize import ad_text, build_features
    from kernel.task_map import TaskMap
    from modeling.base import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_path))
    table = pq.read_table(train).slice(0, rows)
    tasks = TaskMap(list(MARKETS))
    queries, ads = table["query"].to_pylist(), ad_text(table).to_pylist()

    def bare() -> None:
        for s in range(0, len(queries), 1000):
            tok(queries[s : s + 1000], ads[s : s + 1000], truncation=True, max_length=128)

    t_bare, t_ours = [], []
    for _ in range(repeats):
        t_bare.append(timed(bare))
        t_ours.append(timed(lambda: build_features(table, tok, tasks, max_length=128, batch_size=1000)))
    n = table.num_rows
    return {"pairs": n, "bare_pairs_per_s": n / statistics.median(t_bare),
            "build_features_pairs_per_s": n / statistics.median(t_ours),
            "ratio_vs_bare": statistics.median(t_ours) / statistics.median(t_bare)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest_speed", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows of the large input (default 5M)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenize-rows", type=int, default=20_000)
    parser.add_argument("--tokenizer", default="minilm", help="local model dir with a fast tokenizer, or 'minilm'")
    parser.add_argument("--wdc", default=str(WDC), help="the WDC products folder (default: <repo>/../shared/data)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--child", nargs=2, metavar=("INPUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_ingest(*args.child)
        return 0
    core = one_core()
    work = Path(args.work or tempfile.mkdtemp(prefix="ingest-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        big, small = work / "big.parquet", work / "small.parquet"
        t_gen = timed(lambda: generate(big, SyntheticConfig(rows_per_scenario=args.rows // len(MARKETS), seed=1)))
        generate(small, SyntheticConfig(rows_per_scenario=args.rows // 10 // len(MARKETS), seed=2))
        n = pq.read_metadata(big).num_rows
        print(f"core {core}; generated {n:,} rows in {t_gen:.1f} s ({n / t_gen:,.0f} rows/s); "
              f"{big.stat().st_size / 2**20:.0f} MiB Parquet", flush=True)
        times: dict[str, list[float]] = {"read": [], "validate": [], "ingest": []}
        for r in range(args.repeats):
            times["read"].append(timed(lambda: read_only(big)))
            times["validate"].append(timed(lambda: validate_only(big)))
            out = work / f"out{r}"
            times["ingest"].append(timed(lambda: run_ingest(bench_cfg(), big, out)))
            if r < args.repeats - 1:
                shutil.rmtree(out)
            print(f"  run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nthroughput on one core, median of {args.repeats} ({n:,} rows):")
        for k in times:
            print(f"  {k:9s} {n / med[k] / 1e6:6.2f} M rows/s   {med[k]:7.2f} s   x{med[k] / med['read']:.2f} of read")
        print("\n" + bench_wdc(Path(args.wdc), work, args.repeats))
        rss_small = peak_rss(small, work / "rss-small")
        rss_big = peak_rss(big, work / "rss-big")
        ratio = rss_big["peak_rss_mb"] / rss_small["peak_rss_mb"]
        print(f"\npeak RSS of run_ingest (fresh process each): {rss_small['rows']:,} rows "
              f"{rss_small['peak_rss_mb']:.0f} MiB; {rss_big['rows']:,} rows {rss_big['peak_rss_mb']:.0f} MiB; "
              f"ratio {ratio:.2f} (after imports: {rss_small['base_rss_mb']:.0f} / {rss_big['base_rss_mb']:.0f} MiB)")
        tok = bench_tokenize(work / f"out{args.repeats - 1}" / "train.parquet", args.tokenizer, args.tokenize_rows,
                             args.repeats)
        print(f"\ntokenisation (max_length 128, batches of 1000, one core), {tok['pairs']:,} pairs: "
              f"build_features {tok['build_features_pairs_per_s']:,.0f} pairs/s; bare tokenizer "
              f"{tok['bare_pairs_per_s']:,.0f} pairs/s; x{tok['ratio_vs_bare']:.2f} of bare")
        summary = {"rows": n, "rows_per_s": {k: n / v for k, v in med.items()}, "rss_small": rss_small,
                   "rss_big": rss_big, "rss_ratio": ratio, "tokenize": tok}
        print("\n" + json.dumps(summary))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
