"""Logs: one format for every entry point and for every process it starts.

    setup_logging("INFO", "text", step="ingest")   # in main(): stderr, a timestamp, a level and the step per line
    log = logging.getLogger(__name__); log.info("scored %d rows", n)
    with log_step("train"): ...                     # the job: lines logged inside carry step "train"
    add_logging_args(parser); setup_from_args(args, "score")   # --log-level, --log-format, --quiet

Text (the default), one line per record:

    2026-12-01T02:00:03.412Z INFO    [train] step 10/300 loss 0.6931 97.1 samples/s
    2026-12-01T02:00:09.020Z WARNING [train] deepspeed: ...     (a record of another library names its logger)

JSON (``--log-format json``, for log collectors): one object per line with ``time`` (ISO 8601, UTC),
``level``, ``step``, ``logger``, ``message``, the record's extra fields (``log.info(..., extra={"rows": n})``)
and ``exception`` (the traceback) when there is one.

Processes started by a stage (DeepSpeed's launcher and its workers, scoring workers, Ray actors) inherit the
settings through the environment (``ADS_RELEVANCE_LOG_LEVEL``, ``_FORMAT``, ``_STEP``), which
``setup_logging`` exports and which its defaults read, so their lines look the same.

Other libraries' loggers (``THIRD_PARTY``) stay at WARNING whatever the level (with DEBUG they follow it);
those that print through handlers of their own (transformers, MLflow, DeepSpeed) are made to print through
this one (``adopt_library_loggers``; call it again after importing such a library late). Python warnings
become log records. Harmless warnings are silenced where they are raised (``drop_records``,
``warnings.filterwarnings`` by message), never by category. Progress bars show only on a terminal
(``progress_enabled``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
ENV_LEVEL, ENV_FORMAT, ENV_STEP = "ADS_RELEVANCE_LOG_LEVEL", "ADS_RELEVANCE_LOG_FORMAT", "ADS_RELEVANCE_LOG_STEP"
# Loggers of the libraries the stages run on; their INFO lines are noise in a scheduled job's log.
THIRD_PARTY = ("mlflow", "alembic", "DeepSpeed", "deepspeed", "torch", "transformers", "huggingface_hub", "peft",
               "urllib3", "botocore", "boto3", "s3transfer", "fsspec", "filelock", "matplotlib", "PIL", "ray",
               "sqlalchemy", "werkzeug", "httpx", "git", "numexpr", "asyncio", "py.warnings")
# Libraries that print through a handler of their own (not propagating to the root logger).
OWN_HANDLERS = {"transformers": "transformers", "mlflow": "mlflow", "deepspeed": "DeepSpeed"}
_PROJECT = {"kernel", "job", "pipeline", "training", "serving", "monitoring", "features", "modeling", "evaluation",
            "benchmarks", "tests", "__main__"}
# LogRecord's own attributes: what is left in a record's __dict__ are the caller's extra fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "step"}

_step = os.environ.get(ENV_STEP, "-")


def current_step() -> str:
    return _step


def _set_step(step: str) -> None:
    global _step
    _step = step
    os.environ[ENV_STEP] = step  # processes started during the step log it too


@contextmanager
def log_step(step: str) -> Iterator[None]:
    """Lines logged inside the block (any thread) carry ``step``; the previous step is restored after."""
    before = _step
    _set_step(step)
    try:
        yield
    finally:
        _set_step(before)


def _utc(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class _StepFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.step = _step
        return True


def _source(record: logging.LogRecord) -> str:
    """"" for the project's own records; else the library that logged ("mlflow: ", "warnings: ")."""
    if record.name == "root" or record.name.split(".")[0] in _PROJECT:
        return ""
    return "warnings: " if record.name == "py.warnings" else f"{record.name.split('.')[0]}: "


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> [<step>] <message>``; the lines of a multi-line message or a traceback follow,
    indented by two spaces, so every line that starts in column 0 is a record."""

    def format(self, record: logging.LogRecord) -> str:
        text = _source(record) + record.getMessage().rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        head = f"{_utc(record.created)} {record.levelname:<7} [{getattr(record, 'step', _step)}] "
        return head + text.replace("\n", "\n  ")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, step, logger, message, the extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _utc(record.created), "level": record.levelname, "step": getattr(record, "step", _step),
               "logger": record.name, "message": record.getMessage().rstrip()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (a test's capture, a redirect)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always reads sys.stderr
        pass


class _MessageFilter(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def drop_records(logger: str, *fragments: str) -> None:
    """Drop the records of ``logger`` whose message holds one of ``fragments``: a known-harmless line,
    silenced where it is raised; every other record of that logger still shows."""
    target = logging.getLogger(logger)
    if not any(isinstance(f, _MessageFilter) and f.fragments == fragments for f in target.filters):
        target.addFilter(_MessageFilter(fragments))


@contextmanager
def records_dropped(logger: str, *fragments: str) -> Iterator[None]:
    """``drop_records`` for the block only: a line that the caller reports in its own words meanwhile."""
    target, keep = logging.getLogger(logger), _MessageFilter(fragments)
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def _resolve(value: str | None, env: str, default: str, allowed: tuple[str, ...]) -> str:
    """The flag's value, else the inherited one from ``env`` when it is one of ``allowed``, else ``default``
    (argparse already refused a bad flag; a bad environment value must not stop a job before it logs)."""
    for candidate in (value, os.environ.get(env)):
        for spelling in ((candidate or "").strip().upper(), (candidate or "").strip().lower()):
            if spelling in allowed:
                return spelling
    return default


def setup_logging(level: str | None = None, fmt: str | None = None, step: str | None = None,
                  quiet: bool = False) -> None:
    """Send every log record to stderr in ``fmt`` ("text" or "json") at ``level`` and above, each line with
    ``step``. None: the inherited setting (``ADS_RELEVANCE_LOG_*``), else INFO, text, and the inherited step.
    Safe to call again (the handler it installed before is replaced). ``quiet``: no progress bars."""
    level = _resolve(level, ENV_LEVEL, "INFO", LEVELS)
    fmt = _resolve(fmt, ENV_FORMAT, "text", FORMATS)
    os.environ[ENV_LEVEL], os.environ[ENV_FORMAT] = level, fmt
    _set_step(step or os.environ.get(ENV_STEP) or _step)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_ads_relevance", False)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler._ads_relevance = True
    handler.addFilter(_StepFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)  # re-arm: something (a test runner, a library) may have put its own hook back
    logging.captureWarnings(True)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(level if level == "DEBUG" else "WARNING")
    if quiet or not sys.stderr.isatty():
        # Read by MLflow and huggingface_hub when they draw: no per-file download bars in a log file.
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    adopt_library_loggers()


def ensure_logging() -> None:
    """Set logging up with the inherited or default settings unless an entry point already did (an error
    reported by ``kernel.exit_codes.run_cli`` always reaches stderr)."""
    if not any(getattr(h, "_ads_relevance", False) for h in logging.getLogger().handlers):
        setup_logging()


def adopt_library_loggers() -> None:
    """Libraries already imported that print through their own console handler (transformers, MLflow,
    DeepSpeed) print through ours instead, at the third-party level: their console handlers are removed and
    their records propagate. Libraries not imported yet are left alone (importing them here would cost
    seconds); a stage that imports one late calls this again."""
    if not any(getattr(h, "_ads_relevance", False) for h in logging.getLogger().handlers):
        return  # logging was not set up by an entry point: a library caller keeps its own configuration
    level = os.environ.get(ENV_LEVEL, "INFO")
    for module, name in OWN_HANDLERS.items():
        if module not in sys.modules:
            continue
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):  # the console's
                lib.removeHandler(h)
        lib.propagate = True
        lib.setLevel(level if level == "DEBUG" else "WARNING")
    if "transformers" in sys.modules and not progress_enabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def progress_enabled(quiet: bool = False) -> bool:
    """Whether to draw a progress bar: not with ``quiet``, and only when stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


def add_logging_args(parser) -> None:
    """--log-level, --log-format and --quiet: the logging flags every entry point shares."""
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS, default=None,
                        help=f"lowest level logged (default: ${ENV_LEVEL} or INFO; other libraries stay at WARNING "
                             "unless DEBUG)")
    parser.add_argument("--log-format", type=str.lower, choices=FORMATS, default=None,
                        help=f"text lines, or one JSON object per line for log collectors (default: ${ENV_FORMAT} "
                             "or text)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (they are drawn only on a terminal anyway)")


def setup_from_args(args, step: str) -> None:
    """``setup_logging`` from the flags of ``add_logging_args``."""
    setup_logging(args.log_level, args.log_format, step, quiet=args.quiet)


def logging_flags() -> list[str]:
    """The flags that give a child process this process's settings (it inherits the environment too)."""
    return ["--log-level", os.environ.get(ENV_LEVEL, "INFO"), "--log-format", os.environ.get(ENV_FORMAT, "text")]
