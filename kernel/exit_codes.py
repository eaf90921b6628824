"""The exit codes of every entry point, one table for schedulers.

    code  name                 meaning
    0     OK                   done (the candidate was promoted, or promotion was not asked for)
    1     FAILURE              unexpected failure: a bug; the traceback is logged
    2     BAD_INPUT            bad configuration, arguments or input data; the message names the key, file,
                               column, row or scenario
    3     MONITORING_BREACH    monitoring found drift, unseen scenarios, a quarantine rate or an AUC alert
    4     GATE_FAILED          the promotion gate failed: the candidate stays registered, not champion
    5     SERVICE_UNAVAILABLE  MLflow (tracking or registry) or an object store did not answer within
                               tracking.timeout_s; nothing was lost, rerun when it is back
    6     DATA_GATE            too many rows rejected (ingest, data.max_reject_rate) or quarantined
                               (scoring, serving.max_quarantine_rate); the rejected rows are kept
    7     TRAINING_DIVERGED    the loss became NaN/inf; the last good checkpoint is kept
    8     RESOURCE_UNAVAILABLE the environment refused: no space left, a file-size limit, a read-only or
                               unwritable path, a worker or Ray actor that died, or the promotion lease
                               held by another promoter; one line names the path or the worker, and where
                               the work can continue, says how (--resume)
    130   INTERRUPTED          stopped by Ctrl-C / SIGINT

    return run_cli(lambda: work(args))     # in each main(): maps the project's errors onto the table
    return run_cli(work, resume_hint="rerun with --resume to keep the finished units")
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from kernel.environment import environment_failure
from kernel.errors import DataGateFailed, RelevanceError, ServiceUnavailable, TrainingDiverged
from kernel.logs import ensure_logging

OK = 0
FAILURE = 1
BAD_INPUT = 2
MONITORING_BREACH = 3
GATE_FAILED = 4
SERVICE_UNAVAILABLE = 5
DATA_GATE = 6
TRAINING_DIVERGED = 7
RESOURCE_UNAVAILABLE = 8
INTERRUPTED = 130

log = logging.getLogger(__name__)

TABLE = {OK: "ok", FAILURE: "unexpected failure", BAD_INPUT: "bad configuration or input",
         MONITORING_BREACH: "monitoring breach", GATE_FAILED: "promotion gate failed",
         SERVICE_UNAVAILABLE: "service unavailable", DATA_GATE: "data gate failed",
         TRAINING_DIVERGED: "training diverged", RESOURCE_UNAVAILABLE: "resource unavailable",
         INTERRUPTED: "interrupted"}


def code_for(error: BaseException) -> int:
    """The exit code an error maps to (most specific class first)."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, ServiceUnavailable):
        return SERVICE_UNAVAILABLE
    if environment_failure(error) is not None:
        return RESOURCE_UNAVAILABLE
    if isinstance(error, DataGateFailed):
        return DATA_GATE
    if isinstance(error, TrainingDiverged):
        return TRAINING_DIVERGED
    if isinstance(error, RelevanceError):
        return BAD_INPUT
    return FAILURE


def run_cli(work: Callable[[], int], resume_hint: str | None = None) -> int:
    """Run an entry point's work; the project's errors become one ERROR record (``error: <message>``; a bug
    also gets its traceback) and their code. ``resume_hint``: how to continue after an environment failure
    (the entry points that can resume)."""
    try:
        return work()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every outcome must become a documented code
        code = code_for(e)
        ensure_logging()
        log.error("%s", error_line(e, code, resume_hint), exc_info=code == FAILURE, extra={"exit_code": code})
        return code


def error_line(error: BaseException, code: int, resume_hint: str | None = None) -> str:
    if code == INTERRUPTED:
        return "interrupted"
    if code == RESOURCE_UNAVAILABLE:
        return f"error: resource unavailable: {environment_failure(error)}" + (f"; {resume_hint}" if resume_hint else "")
    return f"error: {error}"
