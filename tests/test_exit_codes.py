"""One exit-code table (kernel.exit_codes) kept by every entry point: a test per code."""
from __future__ import annotations

import errno
import importlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kernel import exit_codes
from kernel.errors import (
    DataError,
    QuarantineRateExceeded,
    ResourceUnavailable,
    ServiceUnavailable,
    TrainingDiverged,
    WorkerLost,
)
from tests.shared import REPO, TINY_CONFIG, log_messages

TINY = TINY_CONFIG
ENTRY_POINTS = ["job.run", "pipeline.ingest", "training.launch", "serving.export", "serving.score",
                "monitoring.check", "monitoring.promote"]
UNREACHABLE = "http://127.0.0.1:1"  # nothing listens on port 1


def test_the_table_is_what_the_docs_say():
    assert (exit_codes.OK, exit_codes.FAILURE, exit_codes.BAD_INPUT, exit_codes.MONITORING_BREACH,
            exit_codes.GATE_FAILED, exit_codes.SERVICE_UNAVAILABLE, exit_codes.DATA_GATE,
            exit_codes.TRAINING_DIVERGED, exit_codes.RESOURCE_UNAVAILABLE, exit_codes.INTERRUPTED) \
        == (0, 1, 2, 3, 4, 5, 6, 7, 8, 130)
    readme = (REPO / "README.md").read_text()
    for code, meaning in exit_codes.TABLE.items():  # the README's table has every code
        assert code == exit_codes.INTERRUPTED or f"\n| {code} | " in readme, (code, meaning)
    for module in ENTRY_POINTS:  # every entry point documents the table it keeps
        assert "exit_codes" in (importlib.import_module(module).__doc__ or ""), module


@pytest.mark.parametrize("error,code", [
    (RuntimeError("a bug"), exit_codes.FAILURE), (DataError("bad file"), exit_codes.BAD_INPUT),
    (ServiceUnavailable("down"), exit_codes.SERVICE_UNAVAILABLE), (QuarantineRateExceeded("10%"), exit_codes.DATA_GATE),
    (TrainingDiverged("nan"), exit_codes.TRAINING_DIVERGED), (KeyboardInterrupt(), exit_codes.INTERRUPTED),
    (ResourceUnavailable("--output /x: read-only"), exit_codes.RESOURCE_UNAVAILABLE),
])
def test_run_cli_maps_errors_to_codes_with_one_line(error, code, capsys):
    def work():
        raise error

    assert exit_codes.run_cli(work) == code
    err = capsys.readouterr().err
    assert ("Traceback" in err) == (code == exit_codes.FAILURE)  # only a bug gets a traceback


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_bad_configuration_is_2_everywhere(module, tmp_path, capsys):
    main = importlib.import_module(module).main
    required = {"job.run": [], "pipeline.ingest": [], "training.launch": [],
                "serving.export": ["--run", str(tmp_path), "--out", str(tmp_path / "x")],
                "serving.score": ["--model", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path / "o")],
                "monitoring.check": ["--scored", str(tmp_path), "--reference", str(tmp_path / "r"), "--out", str(tmp_path)],
                "monitoring.promote": ["--name", "m", "--candidate", "1"]}[module]
    assert main([*required, "--config", str(TINY), f"work_dir={tmp_path}", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_an_unreachable_mlflow_is_5_from_the_job_scoring_and_promotion(tmp_path, capsys):
    from job.run import main as job
    from monitoring.promote import main as promote
    from serving.score import main as score

    assert job(["--config", str(TINY), f"work_dir={tmp_path}", f"tracking.uri={UNREACHABLE}",
                "tracking.timeout_s=2"]) == 5
    assert score(["--model", "models:/m@champion", "--tracking-uri", UNREACHABLE, "--input", str(TINY),
                  "--output", str(tmp_path / "o")]) == 5
    assert promote(["--name", "m", "--candidate", "1", "--eval", str(TINY), "--tracking-uri", UNREACHABLE]) == 5
    errors = [m for m in log_messages(capsys.readouterr().err) if m.startswith("error:")]
    assert len(errors) == 3 and all(UNREACHABLE in e for e in errors)


def test_a_diverging_training_is_7(tmp_path, capsys):
    from job.run import main

    code = main(["--config", str(TINY), f"work_dir={tmp_path}", "tracking.enabled=false", "train.lr=1e30",
                 "train.grad_clip=0.0", "train.warmup_steps=0", "train.max_steps=30", "--only",
                 "generate,ingest,train"])
    assert code == exit_codes.TRAINING_DIVERGED and "last good checkpoint" in capsys.readouterr().err


def test_a_scoring_quarantine_gate_is_6_from_the_job(tmp_path, capsys):
    from job.run import main

    traffic = tmp_path / "traffic.parquet"
    pq.write_table(pa.table({"query": ["q"] * 10, "title": ["t"] * 10, "scenario": ["us"] * 4 + ["mars"] * 6}), traffic)
    code = main(["--config", str(TINY), f"work_dir={tmp_path}", "tracking.enabled=false", "train.max_steps=2",
                 f"data.score_input={traffic}", "--only", "generate,ingest,train,export,score"])
    assert code == exit_codes.DATA_GATE  # 6 of 10 rows of a scenario the model does not know
    assert "serving.max_quarantine_rate" in capsys.readouterr().err


def _raised(error: BaseException, cause: BaseException | None = None) -> BaseException:
    """``error`` as raised (``from cause``), so that it carries its chain like a real one."""
    try:
        try:
            raise cause if cause is not None else error
        except BaseException as inner:
            if inner is error:
                raise
            raise error from inner
    except BaseException as e:  # noqa: BLE001
        return e


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/scores/part-1.parquet"),
     ["no space left", "/data/scores/part-1.parquet"]),
    (OSError(errno.EFBIG, "File too large", "/data/x.parquet"), ["file too large", "ulimit -f", "/data/x.parquet"]),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), ["read-only file system", "/mnt/ro/out"]),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/export"), ["permission denied", "/srv/export"]),
    # a project error wrapping one: what caused it decides
    (_raised(DataError("/in/a.parquet: cannot read Parquet data"), OSError(errno.EACCES, "Permission denied",
                                                                            "/in/a.parquet")), ["/in/a.parquet"]),
    # libraries that report the errno as text: pyarrow, safetensors (Rust io::ErrorKind)
    (OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"), ["no space"]),
    (RuntimeError('Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem, message: '
                  '"Read-only file system" })'), ["read-only file system"]),
    (WorkerLost("scoring worker 1 (pid 77) was killed by SIGKILL"), ["worker 1", "pid 77"]),
])
def test_environment_failures_are_8_with_one_line_naming_the_path(error, words, capsys):
    def work():
        raise error

    assert exit_codes.run_cli(work, resume_hint="rerun with --resume") == exit_codes.RESOURCE_UNAVAILABLE
    err = capsys.readouterr().err
    (message,) = log_messages(err)  # one log record, one line, no traceback
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message.startswith("error: resource unavailable: ") and message.endswith("rerun with --resume")
    assert all(w in message.lower() for w in (w.lower() for w in words)), message


def test_a_dead_ray_actor_is_8_not_a_bug(capsys):
    """Ray's own error class for an actor that died (not a stand-in): the mapping knows it by its class."""
    from ray.exceptions import ActorDiedError

    assert exit_codes.code_for(ActorDiedError()) == exit_codes.RESOURCE_UNAVAILABLE
    assert exit_codes.code_for(_raised(RuntimeError("scoring failed"), ActorDiedError())) \
        == exit_codes.RESOURCE_UNAVAILABLE
    assert exit_codes.code_for(OSError(errno.ENOENT, "No such file", "/x")) == exit_codes.FAILURE  # not the env
