"""Batch scoring: stream Parquet files through an exported model, one scored Parquet per unit of work.

    run(cfg, export_dir, ["traffic/"], "scores/", model_version="ads-relevance/3") -> Outcome   # the stage

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
scenario's merged weights (serving.scoring.scorer). Output layout and ``--resume`` semantics:
serving.scoring.outputs.
The output columns are listed at the end of ``--help`` (serving.scoring.outputs.OUTPUT_COLUMNS). A label
value that is present but unusable (e.g. "yes" or 7 for a 0/1 label) becomes null with label_invalid true;
such rows are scored, never quarantined over their label. Quarantined rows (``_quarantine/``) have
ingestion's quarantine schema: raw values as strings, reason, column (the user's column that failed),
source_file, source_row.

Every input is opened and checked before the output folder is created, and every problem of every file
(missing, unreadable footer, missing column, wrong type) is reported in one error; the output location must
be writable (exit 8 otherwise). A run that fails before writing any unit removes an output folder it
created itself (never one that existed before). A row group whose data cannot be read is quarantined
(reason ``unreadable``, one row per unread row) and reported, and the rest of its file is scored.

The output folder holds the scores of the inputs as listed now: each unit's marker records its input's
path, size, modification time and rows, and a run (resumed or not) removes the outputs of units whose input
is gone, changed or planned otherwise, and prints which (serving.scoring.outputs.reconcile).

Quarantine gate: when quarantined / rows in of the whole job (every unit, resumed ones included) exceeds
``serving.max_quarantine_rate`` (a rate equal to it passes), the scores and the quarantine are still
written, and the job exits 6 (QuarantineRateExceeded). Workers started by hand with ``--rank/--world-size``
judge their own units.

Where a row goes: ``main`` (parse; the model's folder and config) -> ``run`` (plan the units, serving.scoring.plan)
-> serving.scoring.engines (this process, worker processes or Ray actors) -> serving.scoring.worker (a unit's
rows, chunk by chunk) -> serving.scoring.scorer.BatchScorer (route, tokenize, batches of
``serving.batch_size``) -> serving.scoring.model.ScoringModel (merged weights, the forward) -> the unit's
output (serving.scoring.outputs).

Units are spread over workers round robin (the job's unit i goes to worker i % N), so one large file is
scored in parallel too; ``--rank/--world-size`` run one worker by hand (e.g. one per machine). The summary's
``shards`` counts units (``files``: input files). Exit codes (kernel.exit_codes): 0 done, 2 bad input or
configuration, 5 the MLflow registry did not answer, 6 quarantine rate over serving.max_quarantine_rate,
8 resource unavailable (no space, a file-size limit, an unwritable output, a dead worker or Ray actor: the
message names it; rerun with --resume to keep the finished units).
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

from kernel import exit_codes, storage
from kernel.config import Config, add_config_args, load_config
from kernel.environment import check_writable
from kernel.errors import DataError, QuarantineRateExceeded
from kernel.exit_codes import run_cli
from kernel.logs import add_logging_args, setup_from_args
from kernel.stage import Outcome
from serving.registry.cache import folder_version, node_reference, resolve_model
from serving.scoring import outputs
from serving.scoring.engines import run_units
from serving.scoring.plan import Inputs, Unit, units_for_rank
from serving.scoring.worker import Job

log = logging.getLogger(__name__)


RESUME_HINT = "the finished units are kept: rerun the same command with --resume"


def run(cfg: Config, model: str | Path, inputs: list[str | Path], output: str | Path, *,
        model_version: str | None = None, resume: bool = False, engine: str = "local", workers: int = 1,
        ray_address: str = "local", ray_threads: int = 1, rank: int = 0, world_size: int = 1,
        quiet: bool = False, model_ref: str = "", tracking_uri: str | None = None) -> Outcome:
    """Score ``inputs`` into ``output`` (a local folder or an object-store URI) with the local export folder
    ``model``; scores carry ``model_version`` (default: the folder's own, serving.registry.cache).
    ``model_ref`` (+ ``tracking_uri``): where other machines resolve the same model (``models:/<name>/<N>``
    or an object-store URI; serving.registry.cache.node_reference): Ray actors load it from there on their
    own node; without it they load ``model``'s absolute path, which must then be on shared storage.

    Outcome.info: the job's summary (``summarize``) plus ``max_quarantine_rate`` and ``quarantine_breach``
    (the gate's message, or None). exit_code: DATA_GATE when the units judged (the whole job; a rank started
    by hand: its own) quarantined more than serving.max_quarantine_rate of their rows, else OK.
    """
    require_inputs(inputs)
    check_writable(output, "--output")  # a read-only or unwritable output fails here, before any work
    plan = Inputs(cfg, [str(i) for i in inputs])  # fails fast on bad values, inputs or columns: no folder yet
    out = output if storage.is_uri(output) else Path(output)
    job = Job(cfg, [str(i) for i in inputs], Path(model), model_version or folder_version(Path(model)), out,
              resume, quiet, model_ref, tracking_uri)
    created = not storage.exists(out)
    if not storage.is_uri(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        mine = plan.units if world_size == 1 else units_for_rank(plan.units, rank, world_size)
        removed = {"units": 0, "inputs": {}}
        if world_size == 1:  # the process that plans the whole job; hand-started ranks leave this alone
            # Leftovers that would break "one score per row, of the inputs given": killed writers'
            # temporaries, and units of inputs that are gone or changed or of an earlier plan.
            outputs.remove_stale_temporaries(out)
            removed = outputs.reconcile(out, plan.units, plan.roots)
        skipped = len(mine) - len(job.todo(mine))
        t0 = time.time()
        run_units(job, plan, engine=engine, workers=workers, ray_address=ray_address, ray_threads=ray_threads,
                  rank=rank, world=world_size)
    except BaseException:
        if created and not outputs.holds_results(out):  # failed before writing anything: leave no trace
            storage.delete(out)
        raise
    summary = summarize(out, mine, time.time() - t0, skipped)
    summary["removed"] = removed
    summary["max_quarantine_rate"] = cfg.serving.max_quarantine_rate
    summary["quarantine_breach"] = quarantine_breach(summary, out)
    code = exit_codes.DATA_GATE if summary["quarantine_breach"] else exit_codes.OK
    return Outcome(summary, [out], code)


def require_inputs(inputs: list) -> None:
    if not inputs:
        raise DataError("--input: no Parquet file or directory given")


def summarize(out: Path | str, units: list[Unit], seconds: float, skipped: int) -> dict:
    """Totals over every unit's marker (this run's and earlier resumed ones). ``shards*`` count units
    (the printed line's "shards"); ``files`` the input files they come from."""
    total = Counter()
    reasons = Counter()
    done, unreadable = 0, []
    for u in units:
        if outputs.is_done(out, u):
            m = outputs.read_marker(out, u)
            total.update({k: m[k] for k in ("rows_in", "scored", "fallback", "quarantined")})
            reasons.update(m.get("by_reason", {}))
            unreadable += [{"file": str(u.path), **lost} for lost in m.get("unreadable", [])]
            done += 1
    return {**{k: total[k] for k in ("rows_in", "scored", "fallback", "quarantined")}, "by_reason": dict(reasons),
            "unreadable": unreadable,
            "shards": len(units), "shards_done": done, "shards_skipped": skipped,
            "files": len({u.shard.index for u in units}), "seconds": round(seconds, 2),
            "rows_per_s": round(total["rows_in"] / seconds, 1) if seconds > 0 else None}


def notes(summary: dict) -> list[str]:
    """One line each: the outputs removed because their input is gone or changed, the unreadable row groups."""
    lines = []
    removed = summary.get("removed") or {}
    if removed.get("units"):
        inputs = ", ".join(f"{path} ({why})" for path, why in sorted(removed["inputs"].items())) or "unmarked parts"
        lines.append(f"removed the outputs of {removed['units']} units whose input is gone, changed or planned "
                     f"otherwise: {inputs}")
    for lost in summary.get("unreadable") or []:
        lines.append(f"quarantined unreadable data: {lost['file']} row group {lost['row_group']} (rows "
                     f"{lost['rows'][0]}-{lost['rows'][1] - 1}): {lost['error']}")
    return lines


def quarantine_breach(summary: dict, out: Path | str) -> str | None:
    """What the quarantine gate says when quarantined / rows_in > serving.max_quarantine_rate (equal passes)."""
    n, q, limit = summary["rows_in"], summary["quarantined"], summary["max_quarantine_rate"]
    if not n or q / n <= limit:
        return None
    top = ", ".join(f"{r} {c}" for r, c in Counter(summary["by_reason"]).most_common(5))
    hint = ""
    if summary["by_reason"].get("unknown_scenario"):
        hint = (" Rows of scenarios the model does not know can be scored as another one with "
                "serving.unknown_scenario=fallback serving.fallback_scenario=<scenario>.")
    return (f"quarantine rate {q / n:.2%} ({q} of {n} rows) exceeds serving.max_quarantine_rate={limit:.2%}; "
            f"top reasons: {top}. The {summary['scored']} scored rows are in {out}, the quarantined ones in "
            f"{storage.join(out, outputs.QUARANTINE_DIR)}.{hint}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1] + "\n\nOutput columns, in order:\n"
                                + outputs.describe_columns())
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
    p.add_argument("--model-version", help=argparse.SUPPRESS)  # the version the scores carry, if not the model's
    p.add_argument("--no-gate", action="store_true", help=argparse.SUPPRESS)  # a rank whose job is judged elsewhere
    add_logging_args(p)
    add_config_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_from_args(args, "score")
    # "--input a.parquet serving.batch_size=32": nargs="+" takes the override too; give it back (a hive
    # path such as data/market=us exists on disk and stays an input).
    moved = [i for i in args.input if "=" in i and not storage.is_uri(i) and not Path(i).exists()
             and "." in i.split("=", 1)[0]]
    args.input = [i for i in args.input if i not in moved]
    args.overrides = moved + list(args.overrides)
    # errors -> one line on stderr and kernel.exit_codes' code
    return run_cli(lambda: _work(args), resume_hint=RESUME_HINT)


def _work(args: argparse.Namespace) -> int:
    """The model's folder (a registry reference or URI resolved once) and its config (or --config), then run."""
    require_inputs(args.input)
    check_writable(args.output, "--output")  # before the model is fetched
    export_dir, version = resolve_model(args.model, args.tracking_uri, args.cache_dir)
    ref, tracking_uri = node_reference(args.model, version, args.tracking_uri)  # what Ray actors resolve
    cfg = load_config(args.config or export_dir / "config.yaml", args.overrides)
    outcome = run(cfg, export_dir, args.input, args.output, model_version=args.model_version or version,
                  resume=args.resume, engine=args.engine, workers=args.workers, ray_address=args.ray_address,
                  ray_threads=args.ray_threads, rank=args.rank, world_size=args.world_size, quiet=args.quiet,
                  model_ref=ref, tracking_uri=tracking_uri)
    summary = outcome.info
    if args.rank == 0 or args.world_size == 1:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_reason"].items())) or "none"
        log.info(f"scored {summary['scored']} of {summary['rows_in']} rows ({summary['fallback']} via fallback, "
                 f"{summary['quarantined']} quarantined: {reasons}) in {summary['shards_done']}/{summary['shards']} "
                 f"shards ({summary['shards_skipped']} resumed), {summary['rows_per_s']} rows/s -> {args.output}",
                 extra={k: summary[k] for k in ("rows_in", "scored", "fallback", "quarantined")})
        for line in notes(summary):
            log.warning(line)
    if outcome.exit_code == exit_codes.DATA_GATE and not args.no_gate:
        raise QuarantineRateExceeded(summary["quarantine_breach"])
    return exit_codes.OK
