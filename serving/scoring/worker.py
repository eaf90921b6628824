"""One worker's share of a scoring job: each of its units scored into its own files, then marked done.

    job = Job(cfg, ["traffic/"], export_dir, "ads-relevance/3", out, resume=True)
    score_units(job, plan, rank=0, world=1)          # this worker's units (ordinal % world == rank)
    score_unit(scorer, plan, plan.units[7], out)     # one unit: output + quarantine, then its marker
    python -m serving.scoring.worker --config _job/config.yaml ... --rank 1 --world-size 4   # a child process

A unit's rows go: plan.batches (read, mapped, validated; rejected rows, and the rows of a row group whose data
cannot be read, to the unit's quarantine) -> chunks of
``serving.chunk_rows`` -> BatchScorer.score (serving.scoring.scorer) -> the unit's output file. A unit's
output, its quarantine and its marker are written atomically (serving.scoring.outputs), so every engine (this
process, local worker processes, Ray actors) runs the same ``score_unit`` on the same units, and resumes
exactly.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from kernel import storage
from kernel.config import Config, load_config
from kernel.exit_codes import OK, run_cli
from kernel.logs import add_logging_args, progress_enabled, setup_from_args
from serving.scoring import outputs
from serving.scoring.plan import Inputs, Unit, units_for_rank
from serving.scoring.scorer import BatchScorer


@dataclass(frozen=True)
class Job:
    """What every worker of one scoring job is given; the engines hand it down unchanged.

    inputs: the input paths as given (each process plans the same units from them); model: the local export
    folder; model_version: what the scores carry; out: the output folder (a local path or an object-store
    URI); resume: skip the units this model version already finished. model_ref and tracking_uri: where any
    machine resolves the same model (serving.registry.cache.node_reference: ``models:/<name>/<version>`` with
    the registry's URI, an object-store URI, or a folder); "" when the job was given a folder only. Processes
    on other machines (Ray actors) load the model from there, never from ``model``, a path on this machine.
    """

    cfg: Config
    inputs: list[str]
    model: Path
    model_version: str
    out: Path | str
    resume: bool = False
    quiet: bool = False
    model_ref: str = ""
    tracking_uri: str | None = None

    def todo(self, units: list[Unit]) -> list[Unit]:
        """The units still to score: every one, or with ``resume`` those not finished by this model version."""
        return [u for u in units if not (self.resume and outputs.is_done(self.out, u, self.model_version))]


def score_units(job: Job, plan: Inputs | None = None, rank: int = 0, world: int = 1) -> list[dict]:
    """Score this worker's units (ordinal % world == rank) with one BatchScorer; their markers' summaries.
    ``plan``: the job's plan when this process has it already, else it is planned here from ``job.inputs``."""
    plan = plan or Inputs(job.cfg, job.inputs)
    todo = job.todo(units_for_rank(plan.units, rank, world))
    if not todo:
        return []
    scorer = BatchScorer(job.model, job.cfg.serving, job.model_version)
    with _progress(sum(u.num_rows for u in todo), rank, job.quiet) as bar:
        return [score_unit(scorer, plan, unit, job.out, bar) for unit in todo]


def score_unit(scorer: BatchScorer, inputs: Inputs, unit: Unit, out: Path | str, progress=None) -> dict:
    """Score one unit into its output + quarantine files (atomically), then write its marker; the summary.

    Whatever an earlier attempt left of the unit is removed first, so a unit that is redone (resume, a
    retried Ray task) ends with exactly one score per row. The marker records the process that scored it.
    """
    t0 = time.time()
    outputs.clear_unit(out, unit)
    writer = outputs.PartWriter(outputs.output_path(out, unit), outputs.output_schema(inputs.mapping.key_types))
    quarantine = outputs.PartWriter(outputs.quarantine_path(out, unit), inputs.quarantine_schema)
    counts = Counter()
    reasons = Counter()
    pending: list[pa.RecordBatch] = []

    def flush() -> None:
        table = pa.Table.from_batches(pending).combine_chunks()
        pending.clear()
        for start in range(0, table.num_rows, scorer.serving.chunk_rows):
            scored, unknown = scorer.score(table.slice(start, scorer.serving.chunk_rows))
            writer.write(scored)
            counts["scored"] += scored.num_rows
            counts["fallback"] += int(pc.sum(scored.column("fallback")).as_py() or 0)
            if unknown.num_rows:
                quarantine.write(inputs.to_quarantine(unknown, "unknown_scenario", inputs.mapping.scenario_column))
                reasons["unknown_scenario"] += unknown.num_rows
            if progress is not None:
                progress.update(scored.num_rows + unknown.num_rows)

    unreadable: list = []  # row groups whose data could not be read: quarantined, reported in the marker
    try:
        buffered = 0
        for accepted, rejected, n in inputs.batches(unit, unreadable):
            counts["rows_in"] += n
            if rejected.num_rows:
                quarantine.write(pa.Table.from_batches([rejected]))
                reasons.update(rejected.column("reason").to_pylist())
                if progress is not None:
                    progress.update(rejected.num_rows)
            if accepted.num_rows:
                pending.append(accepted)
                buffered += accepted.num_rows
            if buffered >= scorer.serving.chunk_rows:
                flush()
                buffered = 0
        if pending:
            flush()
    except BaseException:
        writer.abort()
        quarantine.abort()
        raise
    quarantine.commit()
    writer.commit()
    summary = {"rows_in": counts["rows_in"], "scored": counts["scored"], "fallback": counts["fallback"],
               "quarantined": sum(reasons.values()), "by_reason": dict(reasons),
               "model_version": scorer.model_version, "pid": os.getpid(), "host": socket.gethostname(),
               "started": round(t0, 3), "seconds": round(time.time() - t0, 3),
               "unreadable": [{"row_group": u.row_group, "rows": [u.first_row, u.end_row], "error": u.error}
                              for u in unreadable]}
    outputs.mark_done(out, unit, summary)
    return summary


def _progress(total: int, rank: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr, disable=not progress_enabled(quiet),
                position=rank, desc=f"scoring[{rank}]" if rank else "scoring", mininterval=1.0, dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    """A worker process of ``--workers N`` (started by serving.scoring.engines): its share of the units, with
    the config its parent resolved. The parent plans the job, cleans the output folder and judges the job."""
    p = argparse.ArgumentParser(prog="python -m serving.scoring.worker",
                                description="one worker process of python -m serving.score --workers N")
    p.add_argument("--config", required=True, type=Path, help="the resolved config (written by the parent)")
    p.add_argument("--model", required=True, type=Path, help="the local export folder")
    p.add_argument("--model-version", required=True, help="what the scores carry")
    p.add_argument("--output", required=True, help="output folder: a local path or an object-store URI")
    p.add_argument("--input", required=True, nargs="+", help="the job's inputs, as given to the parent")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--resume", action="store_true")
    add_logging_args(p)
    args = p.parse_args(argv)
    setup_from_args(args, "score")

    def work() -> int:
        out = args.output if storage.is_uri(args.output) else Path(args.output)
        job = Job(load_config(args.config), args.input, args.model, args.model_version, out, args.resume, args.quiet)
        score_units(job, rank=args.rank, world=args.world_size)
        return OK

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
