"""The one shape of every stage: ``run(cfg, <paths...>, *, <options>) -> Outcome`` behind ``main(argv)``.

    # pipeline/ingest.py, training/launch.py, serving/export/cli.py, serving/scoring/cli.py, monitoring/...
    def run(cfg: Config, source, out, *, tracker=None) -> Outcome: ...      # the work; the job calls this
    def main(argv: list[str] | None = None) -> int:                          # parses, loads the config, calls run
        args = build_parser().parse_intermixed_args(argv)
        return run_cli(lambda: report(run(load_config(args.config, args.overrides), args.input, args.out)))

``run`` takes the typed config first, then the paths it reads and writes, then keyword options; it never
sees an ``argparse.Namespace`` and prints nothing a caller must parse. ``main`` only parses and reports.
The job (``job.steps``) calls the same ``run`` functions that the command lines call.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kernel import exit_codes


@dataclass
class Outcome:
    """What a stage did.

    info: a JSON-serialisable summary (counts, metrics, versions); the job records it in its step state.
    outputs: the files or folders (local paths or object-store URIs) the stage wrote.
    exit_code: the code from kernel.exit_codes that this outcome means (a failed gate is a result, not an
        error: the stage returns it and ``main`` exits with it).
    """

    info: dict = field(default_factory=dict)
    outputs: list[Path | str] = field(default_factory=list)
    exit_code: int = exit_codes.OK


@contextmanager
def stage_tracker(tracker, start: Callable[[], object] | None) -> Iterator[object]:
    """The tracker a stage logs to: the caller's (the job's run for the stage; the caller ends it), else the
    run that ``start()`` returns started (None: no tracking), ended FINISHED when the block succeeds and FAILED
    when it raises."""
    if tracker is not None or start is None:
        yield tracker
        return
    own = start()
    try:
        yield own
    except BaseException:
        own.end("FAILED")
        raise
    own.end()
