"""Batch scoring: stream Parquet files through an exported model, one scored Parquet per unit of work.

    python -m serving.score --model runs/demo/export --input data/traffic/ --output runs/demo/scores
    python -m serving.score --model models:/ads-relevance@champion --tracking-uri sqlite:///runs/demo/mlflow.db \\
        --input a.parquet b.parquet --output scores/ --resume serving.unknown_scenario=fallback \\
        serving.fallback_scenario=computers
    python -m serving.score ... --workers 4          # 4 local processes (one GPU each when present)
    python -m serving.score ... --engine ray --workers 8 [--ray-address auto]    # pip install '.[ray]'

Inputs are read with ingestion's column mapping and validation (``data.columns``, ``data.filters``; from
``--config`` or, by default, the config the model was trained with, plus ``key=value`` overrides). Each
input file (hive partitions allowed) is planned into units, runs of whole row groups of up to
``serving.unit_rows`` rows, each scored into its own output (a file of one row group is one unit); every
engine scores the same units with the same code. Memory stays bounded by ``data.batch_rows`` and
``serving.chunk_rows`` however large the input. Rows are grouped by scenario per chunk and scored with that
scenario's merged weights (serving.scoring.scorer). Output layout and ``--resume`` semantics: serving.scoring.outputs.
Output columns: pass-through keys, source_file, source_row, scenario, scored_as, fallback, score (float32
probability), label (int8; null when absent, null or unusable), label_invalid (bool: a label value was
present but unusable, e.g. "yes" or 7 for a 0/1 label; such rows are scored, never quarantined over their
label), model_version, query_len, title_len. Quarantined rows (``_quarantine/``) have ingestion's
quarantine schema: raw values as strings, reason, column (the user's column that failed), source_file,
source_row.

Every input is opened and checked before the output folder is created; a run that fails before writing
any unit removes an output folder it created itself (never one that existed before).

Quarantine gate: when quarantined / rows in of the whole job (every unit, resumed ones included) exceeds
``serving.max_quarantine_rate`` (a rate equal to it passes), the scores and the quarantine are still
written, and the job exits 6 (QuarantineRateExceeded). Workers started by hand with ``--rank/--world-size``
judge their own units.

Units are spread over workers round robin (the job's unit i goes to worker i % N), so one large file is
scored in parallel too; ``--rank/--world-size`` run one worker by hand (e.g. one per machine). The summary's
``shards`` counts units (``files``: input files). Exit codes (kernel.exit_codes): 0 done, 2 bad input or
configuration, 5 the MLflow registry did not answer, 6 quarantine rate over serving.max_quarantine_rate.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kernel import storage
from kernel.config import Config, add_config_args, dump_config, load_config
from kernel.errors import DataError, QuarantineRateExceeded
from kernel.exit_codes import run_cli
from serving.scoring import outputs as sh
from serving.scoring.worker import Inputs, run_worker
from serving.scoring.ray_engine import run_on_ray
from serving.registry.cache import resolve_model
from serving.scoring.scorer import check_serving_limits


def _launch_local(req: ScoreRequest, cfg: Config, export_dir: Path, model_version: str, out: Path) -> None:
    """``--workers N``: N child processes of this module, each with --rank i; one GPU each if present."""
    # Children read the resolved config (one source of truth); it is local even when the output is not.
    job = (Path(out) if not storage.is_uri(out) else cfg.local_work_dir) / sh.JOB_DIR
    job.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, job / "config.yaml")
    import torch

    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // req.workers)
    procs = []
    for rank in range(req.workers):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(rank % gpus)
        cmd = [sys.executable, "-m", "serving.score", "--model", str(export_dir), "--model-version", model_version,
               "--output", str(out), "--config", str(job / "config.yaml"), "--rank", str(rank),
               "--world-size", str(req.workers), "--no-gate", "--input", *req.input, "--resume"]
        if req.quiet:
            cmd.append("--quiet")
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise RuntimeError(f"scoring workers {failed} failed (see their messages above); rerun with --resume")


def summarize(out: Path, units: list[sh.Unit], seconds: float, skipped: int) -> dict:
    """Totals over every unit's marker (this run's and earlier resumed ones). ``shards*`` count units
    (the printed line's "shards"); ``files`` the input files they come from."""
    total = Counter()
    reasons = Counter()
    done = 0
    for u in units:
        if sh.is_done(out, u):
            m = sh.read_marker(out, u)
            total.update({k: m[k] for k in ("rows_in", "scored", "fallback", "quarantined")})
            reasons.update(m.get("by_reason", {}))
            done += 1
    return {**{k: total[k] for k in ("rows_in", "scored", "fallback", "quarantined")}, "by_reason": dict(reasons),
            "shards": len(units), "shards_done": done, "shards_skipped": skipped,
            "files": len({u.shard.index for u in units}), "seconds": round(seconds, 2),
            "rows_per_s": round(total["rows_in"] / seconds, 1) if seconds > 0 else None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="export folder, models:/<name>@<alias> or models:/<name>/<version>")
    p.add_argument("--input", required=True, nargs="+", help="Parquet files or directories (hive partitions allowed)")
    p.add_argument("--output", required=True, help="output folder: a local path or an object-store URI (s3://...)")
    p.add_argument("--resume", action="store_true", help="skip units already finished in --output")
    p.add_argument("--workers", type=int, default=1, help="local processes (or Ray actors with --engine ray)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", default="local",
                   help="'local' (default): a private Ray on 127.0.0.1; 'auto' or host:port joins a running cluster")
    p.add_argument("--ray-threads", type=int, default=1,
                   help="torch CPU threads (and CPUs requested) per Ray actor (default 1)")
    p.add_argument("--rank", type=int, default=0, help="this worker's index when started by hand")
    p.add_argument("--world-size", type=int, default=1, help="number of workers started by hand")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--cache-dir", type=Path, help="where registry downloads are cached")
    p.add_argument("--model-version", help=argparse.SUPPRESS)  # set by the parent for its child workers
    p.add_argument("--no-gate", action="store_true", help=argparse.SUPPRESS)  # children: the parent judges the job
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(p)
    return p


@dataclass
class ScoreRequest:
    """What to score, where, and how: the command line's flags as one typed value (the job builds one)."""

    input: list[str]
    output: str | Path  # a local folder or an object-store URI
    resume: bool = False
    workers: int = 1
    engine: str = "local"
    ray_address: str = "local"
    ray_threads: int = 1  # torch CPU threads per Ray actor; each actor requests that many CPUs
    rank: int = 0
    world_size: int = 1
    quiet: bool = False
    no_gate: bool = False  # set for child workers: the parent judges the whole job's quarantine rate

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ScoreRequest":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run(args: argparse.Namespace) -> dict:
    """The command line: resolve the model (folder or registry), its config (or --config), then score."""
    if not args.input:
        raise DataError("--input: no Parquet file or directory given")
    export_dir, version = resolve_model(args.model, args.tracking_uri, args.cache_dir)
    cfg = load_config(args.config or export_dir / "config.yaml", args.overrides)
    return score_files(ScoreRequest.from_args(args), cfg, export_dir, args.model_version or version)


def score_files(req: ScoreRequest, cfg: Config, export_dir: Path, version: str) -> dict:
    """Score ``req.input`` into ``req.output`` with the export in ``export_dir``; the job's summary."""
    check_serving_limits(cfg.serving)
    data = Inputs(cfg, req.input)  # fails fast on a bad input or column mapping, before any folder exists
    out = req.output if storage.is_uri(req.output) else Path(req.output)  # a local folder or an object-store URI
    created = not storage.exists(out)
    if not storage.is_uri(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _score_job(req, cfg, Path(export_dir), version, data, out)
    except BaseException:
        if created and not sh.holds_results(out):  # failed before writing anything: leave no trace
            storage.delete(out)
        raise


def _score_job(req: ScoreRequest, cfg: Config, export_dir: Path, version: str, data: Inputs, out: Path) -> dict:
    mine = data.units if req.world_size == 1 else sh.units_for_rank(data.units, req.rank, req.world_size)
    if req.world_size == 1:  # the process that plans the whole job; hand-started ranks leave this alone
        # Leftovers that would break "one score per row": killed writers' temporaries, and parts of an
        # earlier plan of these files (another serving.unit_rows, or the one-file-per-input layout).
        sh.remove_stale_temporaries(out)
        sh.remove_foreign_parts(out, data.units)
    skipped = sum(sh.is_done(out, u, version) for u in mine) if req.resume else 0
    t0 = time.time()
    if req.engine == "ray":
        run_on_ray(cfg, export_dir, version, req.input, out, req.resume, req.workers, req.ray_address,
                   threads=req.ray_threads, quiet=req.quiet)
    elif req.workers > 1:
        _launch_local(req, cfg, export_dir, version, out)
    else:
        run_worker(cfg, export_dir, version, req.input, out, req.resume, req.rank, req.world_size, req.quiet)
    summary = summarize(out, mine, time.time() - t0, skipped)
    summary["max_quarantine_rate"] = cfg.serving.max_quarantine_rate
    return summary


def check_quarantine_rate(summary: dict, out: Path) -> None:
    """QuarantineRateExceeded when quarantined / rows_in > serving.max_quarantine_rate (equal passes)."""
    n, q, limit = summary["rows_in"], summary["quarantined"], summary["max_quarantine_rate"]
    if not n or q / n <= limit:
        return
    top = ", ".join(f"{r} {c}" for r, c in Counter(summary["by_reason"]).most_common(5))
    hint = ""
    if summary["by_reason"].get("unknown_scenario"):
        hint = (" Rows of scenarios the model does not know can be scored as another one with "
                "serving.unknown_scenario=fallback serving.fallback_scenario=<scenario>.")
    raise QuarantineRateExceeded(
        f"quarantine rate {q / n:.2%} ({q} of {n} rows) exceeds serving.max_quarantine_rate={limit:.2%}; "
        f"top reasons: {top}. The {summary['scored']} scored rows are in {out}, the quarantined ones in "
        f"{storage.join(out, sh.QUARANTINE_DIR)}.{hint}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    # "--input a.parquet serving.batch_size=32": nargs="+" takes the override too; give it back (a hive
    # path such as data/market=us exists on disk and stays an input).
    moved = [i for i in args.input if "=" in i and not storage.is_uri(i) and not Path(i).exists()
             and "." in i.split("=", 1)[0]]
    args.input = [i for i in args.input if i not in moved]
    args.overrides = moved + list(args.overrides)
    return run_cli(lambda: _work(args))  # errors -> one line on stderr and kernel.exit_codes' code


def _work(args: argparse.Namespace) -> int:
    summary = run(args)
    if args.rank == 0 or args.world_size == 1:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_reason"].items())) or "none"
        print(f"scored {summary['scored']} of {summary['rows_in']} rows ({summary['fallback']} via fallback, "
              f"{summary['quarantined']} quarantined: {reasons}) in {summary['shards_done']}/{summary['shards']} "
              f"shards ({summary['shards_skipped']} resumed), {summary['rows_per_s']} rows/s -> {args.output}")
    if not args.no_gate:
        check_quarantine_rate(summary, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
