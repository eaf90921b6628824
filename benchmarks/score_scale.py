"""Ten million rows through ``python -m serving.score``: time, rows/s, peak RSS, and kill -9 + --resume.

    python -m benchmarks.score_scale                                  # 1M and 10M rows (hours on 2 busy cores)
    python -m benchmarks.score_scale --work runs/scale --lock runs/heavy.lock   # resumable, one step at a time
    python -m benchmarks.score_scale --rows 100000 1000000 --file-rows 100000   # a quick look

The model is tiny (a random 1-layer, 32-wide, one-head BERT with the MiniLM tokenizer, 4 scenarios; its
forward is about a quarter of a 2-layer, 4-head one's, whose attention over 4-wide heads alone took most of
the job's time), so that what is measured is the path around the model: reading Parquet, validation, routing, tokenizing, batching, writing
the outputs and markers, and the bookkeeping of units. The input is ``pipeline.synthetic``'s four markets
(query, title, description, url, label, scenario, request_id, ad_id) in files of --file-rows rows whose row
groups are the generator's (262,144 rows, as a Spark or pyarrow writer makes them); the request and ad ids
pass through as keys. The N-row input is the first N / --file-rows of those files (the smaller sizes reuse
the larger one's files through hard links).

Steps, each recorded in ``<work>/results.json`` as it finishes, so a rerun with the same --work goes on
where it stopped (each heavy step takes --lock, when given, for itself only):

    generate      the model (exported as serving loads it) and the input files
    run-<N>       ``python -m serving.score --workers W`` on N rows, uninterrupted, in a fresh process tree:
                  seconds, rows/s, peak RSS (the whole tree sampled every 0.2 s, and its largest process)
    kill-<N>      the same job, SIGKILL to its whole process group at a random point (seeded: a uniform
                  fraction in [0.1, 0.9] of run-<N>'s seconds), then ``--resume`` to the end
    compare-<N>   both outputs checked: exactly one output row per input row (every (source_file,
                  source_row) once, scored or quarantined), and an order-free content digest keyed on
                  (source_file, source_row) over every output column, equal for the two runs

Targets (printed with the figures): one output row per input row at every size; peak RSS of the largest
size within 1.3x of the smallest; the killed and resumed run's digest equal to the uninterrupted run's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.scale_checks import check_outputs  # noqa: E402  (after the path insert: runs from anywhere)

SCENARIOS = ["de", "jp", "uk", "us"]  # pipeline.synthetic's markets, the tiny model's tasks
FILE_GROUP = "file-{:03d}.parquet"


def build_model(work: Path, hidden: int = 32, layers: int = 1, max_length: int = 64, *, heads: int | None = 1,
                intermediate: int | None = None, tokenizer: str = "minilm", overrides: list[str] | None = None) -> Path:
    """A random-init BERT of ``hidden`` x ``layers`` (``heads``, ``intermediate``: default hidden / 8 and
    2 x hidden) with ``tokenizer`` (a name or folder), trained-model folder and export as serving loads it;
    the export's config maps the synthetic markets' columns (ids as keys), plus ``overrides`` of its
    deployment sections (serving.*)."""
    import torch

    from kernel.config import config_from_dict
    from kernel.task_map import TaskMap
    from modeling.artifact import save_trained
    from modeling.model import build_model as build
    from serving.export.cli import run as export
    from serving.export.source import export_config

    cfg = config_from_dict({
        "model": {"init": "random", "pooling": "cls", "tokenizer": tokenizer,
                  "random_config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": hidden,
                                    "num_hidden_layers": layers, "num_attention_heads": heads or max(1, hidden // 8),
                                    "intermediate_size": intermediate or 2 * hidden}},
        "adapter": {"r": 4, "n_up": 2, "dropout": 0.0},
        "features": {"max_length": max_length},
        "data": {"columns": {"keys": ["request_id", "ad_id"]}},
        "tracking": {"enabled": False},
    })
    tm = TaskMap(SCENARIOS)
    model = build(cfg, len(tm))
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B and head: each scenario scores differently
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith((".A", ".lam", ".w")):
                torch.nn.init.normal_(p, std=0.2 if hidden <= 64 else 0.02)
    save_trained(model, cfg, tm, {}, work / "model")
    export(export_config(work / "model", overrides=overrides or []), work / "model", work / "export")
    return work / "export"


def write_inputs(work: Path, sizes: list[int], file_rows: int) -> dict[int, Path]:
    """``<work>/files/file-NNN.parquet`` (``file_rows`` rows each, seed NNN) for the largest size, and per
    size N a folder ``<work>/in-N`` holding hard links to the first N / file_rows of them."""
    from kernel.config import SyntheticConfig
    from pipeline.synthetic import generate

    for n in sizes:
        if n % file_rows or file_rows % len(SCENARIOS):
            raise SystemExit(f"--rows {n}: must be a multiple of --file-rows {file_rows}, itself of "
                             f"{len(SCENARIOS)} (the markets)")
    files = work / "files"
    files.mkdir(parents=True, exist_ok=True)
    for i in range(max(sizes) // file_rows):
        path = files / FILE_GROUP.format(i)
        if not path.is_file():  # generate() publishes atomically: a present file is complete
            generate(path, SyntheticConfig(rows_per_scenario=file_rows // len(SCENARIOS), seed=1000 + i))
    folders = {}
    for n in sizes:
        folder = work / f"in-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for i in range(n // file_rows):
            src, dst = files / FILE_GROUP.format(i), folder / FILE_GROUP.format(i)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        folders[n] = folder
    return folders


def score_command(export: Path, inputs: Path, out: Path, workers: int, resume: bool = False,
                  overrides: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "serving.score", "--model", str(export), "--input", str(inputs), "--output",
           str(out), "--workers", str(workers), "--quiet", *(overrides or [])]
    return cmd + ["--resume"] * resume


def planned_units(export: Path, inputs: Path) -> list:
    """The job's units as serving.score plans them (from the input footers and the export's config)."""
    from kernel.config import load_config
    from serving.scoring.plan import Inputs

    return Inputs(load_config(export / "config.yaml"), [str(inputs)]).units


def run_scoring(cmd: list[str], kill_at_s: float | None = None, kill_when=None, poll_s: float = 0.2) -> dict:
    """Run ``cmd`` (python -m serving.score ...) as its own process group and measure its peak RSS.

    ``peak_process_rss_mib``: the kernel's peak of the largest process of the tree (wait4's ru_maxrss: the
    command and every worker process it waited for); ``peak_rss_mib``: the peak of the whole tree's sum,
    sampled every ``poll_s`` seconds. ``kill_at_s``: SIGKILL the whole group (the command and its worker
    processes, as a lost machine would) that many seconds after the start; ``kill_when``: a callable asked
    at every sample, True kills. Returns seconds, rc, killed, the rows/s the command printed (None when
    killed) and the tail of its output.
    """
    import psutil

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    top = psutil.Process(proc.pid)
    peak_tree, killed = 0, False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            peak_tree = max(peak_tree, sum(p.memory_info().rss for p in [top, *top.children(recursive=True)]))
        except psutil.Error:  # a process ended between listing and reading
            pass
        if not killed and ((kill_at_s is not None and time.perf_counter() - t0 >= kill_at_s)
                           or (kill_when and kill_when())):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(poll_s)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    rate = None
    for line in text.splitlines():
        if "scored " in line and " rows/s" in line:  # the result line (a log record: timestamp, level, step first)
            rate = float(line.split(" rows/s")[0].rsplit(" ", 1)[1])
    return {"seconds": round(seconds, 2), "rc": proc.returncode, "killed": killed, "printed_rows_per_s": rate,
            "peak_rss_mib": round(peak_tree / 2**20, 1), "peak_process_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "tail": text[-1500:]}


class Results:
    """``<work>/results.json``: one entry per finished step, written after each."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, step: str) -> bool:
        return step in self.data

    def __getitem__(self, step: str) -> dict:
        return self.data[step]

    def put(self, step: str, value: dict) -> None:
        self.data[step] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


@contextlib.contextmanager
def heavy(lock: Path | None):
    """Hold ``lock`` (an flock on a shared file) for one heavy step, when given."""
    if lock is None:
        yield
        return
    import fcntl

    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def step_run(res: Results, n: int, args, export: Path, inputs: Path) -> None:
    out = args.work / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    with heavy(args.lock):
        r = run_scoring(score_command(export, inputs, out, args.workers))
    if r["rc"] != 0:
        raise SystemExit(f"run-{n} failed (exit {r['rc']}):\n{r['tail']}")
    r["rows_per_s"] = round(n / r["seconds"], 1)
    res.put(f"run-{n}", r)
    print(f"  run-{n}: {r['seconds']:.1f} s, {r['rows_per_s']:.0f} rows/s end to end (the job's own figure "
          f"{r['printed_rows_per_s']}), peak RSS {r['peak_rss_mib']:.0f} MiB (largest process "
          f"{r['peak_process_rss_mib']:.0f} MiB)", flush=True)


def step_kill(res: Results, n: int, args, export: Path, inputs: Path) -> None:
    out = args.work / f"killed-{n}"
    shutil.rmtree(out, ignore_errors=True)
    if f"run-{n}" not in res:
        raise SystemExit(f"kill-{n} needs run-{n} first (its duration sets the kill point)")
    fraction = random.Random(args.seed * 1_000_003 + n).uniform(0.1, 0.9)
    at = fraction * res[f"run-{n}"]["seconds"]
    units = len(planned_units(export, inputs))

    def about_to_finish() -> bool:  # a slower or faster rerun is still killed mid-job: before its last unit
        return len(list((out / "_done").glob("*.json"))) >= units - 1

    with heavy(args.lock):
        first = run_scoring(score_command(export, inputs, out, args.workers), kill_at_s=at, kill_when=about_to_finish)
        done_at_kill = len(list((out / "_done").glob("*.json")))
        second = run_scoring(score_command(export, inputs, out, args.workers, resume=True))
    if not first["killed"] or second["rc"] != 0:
        raise SystemExit(f"kill-{n}: the job was not killed ({first['rc']}) or its resume failed:\n{second['tail']}")
    entry = {"kill_fraction": round(fraction, 3), "killed_after_s": first["seconds"], "units": units,
             "units_done_at_kill": done_at_kill, "resume_seconds": second["seconds"],
             "resume_peak_rss_mib": second["peak_rss_mib"]}
    res.put(f"kill-{n}", entry)
    print(f"  kill-{n}: SIGKILL after {first['seconds']:.1f} s ({fraction:.0%} of the uninterrupted run; "
          f"{done_at_kill} of {units} units finished), --resume took {second['seconds']:.1f} s", flush=True)


def step_compare(res: Results, n: int, args, inputs: Path) -> None:
    with heavy(args.lock):
        clean = check_outputs(args.work / f"out-{n}", inputs)
        killed = check_outputs(args.work / f"killed-{n}", inputs)
    entry = {"rows": clean["rows"], "clean_digest": clean["digest"], "resumed_digest": killed["digest"],
             "equal": clean["digest"] == killed["digest"], "quarantined": clean["quarantined"]}
    res.put(f"compare-{n}", entry)
    print(f"  compare-{n}: {clean['rows']} input rows, each exactly once in both outputs; digests "
          f"{clean['digest'][:16]} / {killed['digest'][:16]}: {'equal' if entry['equal'] else 'DIFFERENT'}",
          flush=True)


def report(res: Results, sizes: list[int], args) -> None:
    small, large = min(sizes), max(sizes)
    print(f"\nsummary ({os.cpu_count()} CPUs, --workers {args.workers}, tiny model):")
    for n in sizes:
        if f"run-{n}" in res:
            r = res[f"run-{n}"]
            print(f"  {n:>11,} rows: {r['seconds']:9.1f} s  {r['rows_per_s']:9.0f} rows/s  peak RSS "
                  f"{r['peak_rss_mib']:7.0f} MiB (largest process {r['peak_process_rss_mib']:6.0f} MiB)")
    if f"run-{small}" in res and f"run-{large}" in res and small != large:
        for key in ("peak_rss_mib", "peak_process_rss_mib"):
            ratio = res[f"run-{large}"][key] / res[f"run-{small}"][key]
            print(f"  peak RSS {large:,} / {small:,} rows ({key}): {ratio:.3f}  (target <= 1.3: "
                  f"{'met' if ratio <= 1.3 else 'MISSED'})")
        ratio = res[f"run-{large}"]["rows_per_s"] / res[f"run-{small}"]["rows_per_s"]
        print(f"  rows/s {large:,} / {small:,} rows: {ratio:.3f}")
    if f"compare-{large}" in res:
        c, k = res[f"compare-{large}"], res[f"kill-{large}"]
        print(f"  kill -9 at {k['kill_fraction']:.0%} of the {large:,}-row run, then --resume: one row per input "
              f"row, digest {'equal to' if c['equal'] else 'DIFFERENT from'} the uninterrupted run's")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="input sizes; the kill -9 + resume check runs at the largest")
    p.add_argument("--file-rows", type=int, default=500_000, help="rows per input file")
    p.add_argument("--workers", type=int, default=2, help="serving.score --workers (2 cores here)")
    p.add_argument("--work", type=Path, help="working folder, kept (resumable); default: a temporary one, removed")
    p.add_argument("--lock", type=Path, help="a lock file each heavy step holds (flock), on a shared machine")
    p.add_argument("--steps", nargs="+", help="only these steps (generate, run-N, kill-N, compare-N)")
    p.add_argument("--seed", type=int, default=0, help="chooses the kill point")
    args = p.parse_args(argv)
    sizes = sorted(set(args.rows))
    temporary = args.work is None
    args.work = Path(args.work or tempfile.mkdtemp(prefix="score-scale-")).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    res = Results(args.work / "results.json")
    wanted = set(args.steps or ["generate"] + [f"run-{n}" for n in sizes]
                 + [f"{s}-{max(sizes)}" for s in ("kill", "compare")])
    print(f"score_scale: {sizes} rows in files of {args.file_rows}, --workers {args.workers}, work {args.work}",
          flush=True)
    try:
        export = args.work / "export"
        if not (export / "manifest.json").is_file():
            with heavy(args.lock):
                build_model(args.work)
        with heavy(args.lock):
            inputs = write_inputs(args.work, sizes, args.file_rows)
        for n in sizes:
            if f"run-{n}" in wanted and f"run-{n}" not in res:
                step_run(res, n, args, export, inputs[n])
        n = max(sizes)
        if f"kill-{n}" in wanted and f"kill-{n}" not in res:
            step_kill(res, n, args, export, inputs[n])
        if f"compare-{n}" in wanted and f"compare-{n}" not in res:
            step_compare(res, n, args, inputs[n])
        report(res, sizes, args)
    finally:
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
