"""The log format every entry point shares (kernel.logs): text lines with a timestamp, a level and the step,
JSON lines for log collectors, other libraries' INFO noise left out, and the flags every command takes."""
from __future__ import annotations

import importlib
import json
import logging
import warnings
from datetime import datetime

import pytest

from kernel.logs import drop_records, log_step, setup_logging
from tests.shared import LOG_LINE

ENTRY_POINTS = ["job.run", "pipeline.ingest", "training.launch", "serving.export.cli", "serving.scoring.cli",
                "monitoring.check", "monitoring.promote"]


@pytest.fixture(autouse=True)
def _restore_logging():
    """Each test sets logging up its own way; the next one starts from what was there."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    setup_logging("INFO", "text")  # what the other tests' entry points leave behind


def test_text_lines_carry_a_timestamp_a_level_and_the_step(capsys):
    setup_logging("INFO", "text", step="ingest")
    log = logging.getLogger("pipeline.ingest")
    log.info("240 rows in")
    with log_step("train"):
        log.warning("two\nlines")
        log.debug("not shown at INFO")
    log.error("back to ingest")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[2] == "  lines"  # a message's next lines are indented: one record each
    parsed = [LOG_LINE.match(line) for line in (lines[0], lines[1], lines[3])]
    assert all(parsed), lines
    assert [(m.group(2), m.group(3), m.group(4)) for m in parsed] == [
        ("INFO", "ingest", "240 rows in"), ("WARNING", "train", "two"), ("ERROR", "ingest", "back to ingest")]
    datetime.strptime(parsed[0].group(1), "%Y-%m-%dT%H:%M:%S.%fZ")  # ISO 8601, UTC


def test_json_lines_parse_and_hold_every_field(capsys):
    setup_logging("DEBUG", "json", step="score")
    log = logging.getLogger("serving.scoring.cli")
    log.info("scored %d rows", 98, extra={"rows_in": 98})
    try:
        raise ValueError("bad row")
    except ValueError:
        log.exception("failed")
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(records) == 2
    for r in records:
        assert {"time", "level", "step", "logger", "message"} <= set(r) and r["step"] == "score"
        assert r["logger"] == "serving.scoring.cli"
    assert records[0]["message"] == "scored 98 rows" and records[0]["rows_in"] == 98
    assert records[1]["level"] == "ERROR" and "ValueError: bad row" in records[1]["exception"]


def test_other_libraries_are_kept_at_warning_and_harmless_lines_are_dropped_by_message(capsys):
    setup_logging("INFO", "text", step="train")
    for name in ("mlflow.store.db.utils", "DeepSpeed", "transformers.modeling_utils", "urllib3.connectionpool"):
        logging.getLogger(name).info("noise from %s", name)
    logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
    drop_records("DeepSpeed", "untested optimizer")
    logging.getLogger("DeepSpeed").warning("**** You are using ZeRO with an untested optimizer, proceed *****")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library's warning", UserWarning)
    err = capsys.readouterr().err
    assert "noise from" not in err and "untested optimizer" not in err
    assert "WARNING [train] DeepSpeed: a real DeepSpeed warning" in err  # real warnings still show, named
    assert "[train] warnings: " in err and "a library's warning" in err  # Python warnings are records too
    setup_logging("DEBUG", "text")  # DEBUG lets every library speak
    logging.getLogger("mlflow.store.db.utils").info("now shown")
    assert "mlflow: now shown" in capsys.readouterr().err


def test_child_processes_inherit_the_settings_through_the_environment(monkeypatch):
    from kernel.logs import ENV_FORMAT, ENV_LEVEL, ENV_STEP, logging_flags

    setup_logging("WARNING", "json", step="train")
    import os

    assert (os.environ[ENV_LEVEL], os.environ[ENV_FORMAT], os.environ[ENV_STEP]) == ("WARNING", "json", "train")
    assert logging_flags() == ["--log-level", "WARNING", "--log-format", "json"]
    with log_step("score"):
        assert os.environ[ENV_STEP] == "score"  # a worker started during the step logs it
    monkeypatch.setenv(ENV_LEVEL, "nonsense")  # a bad inherited value does not stop a job: the default
    setup_logging()
    assert os.environ[ENV_LEVEL] == "INFO"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_takes_the_logging_flags(module):
    options = importlib.import_module(module).build_parser()._option_string_actions
    assert {"--log-level", "--log-format", "--quiet"} <= set(options)
    assert options["--log-level"].type("debug") == "DEBUG" and "json" in options["--log-format"].choices


def test_a_base_without_a_classification_head_is_one_info_line_not_a_load_report(tmp_path, capsys):
    """A sentence encoder under a classification head: the head's weights are missing from the checkpoint by
    design. transformers prints a multi-line LOAD REPORT warning; the model's loader says it in one line."""
    from transformers import BertConfig, BertModel

    from kernel.config import config_from_dict
    from modeling.model import build_model

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=64)).save_pretrained(tmp_path / "encoder")
    setup_logging("INFO", "text")
    capsys.readouterr()
    build_model(config_from_dict({"model": {"path": str(tmp_path / "encoder"), "pooling": "cls"}}), 2)
    lines = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line and line.strip()]
    assert not any("LOAD REPORT" in line or "MISSING" in line for line in lines), lines
    (line,) = [line for line in lines if "newly initialised" in line]
    assert " INFO " in line and "classifier.weight" in line and "classifier.bias" in line


def test_loading_a_trained_model_says_nothing_of_the_base_checkpoint_head_it_replaces(tmp_path, capsys):
    """Export, scoring and a warm start rebuild the base, then load the trained head over it: the base's
    missing head is no news there (DEBUG), and the trained head is what the model holds."""
    import torch
    from transformers import BertConfig, BertModel

    from kernel.config import config_from_dict
    from kernel.task_map import TaskMap
    from modeling.artifact import load_trained, save_trained
    from modeling.model import build_model

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=64)).save_pretrained(tmp_path / "encoder")
    cfg = config_from_dict({"model": {"path": str(tmp_path / "encoder"), "pooling": "cls"}})
    trained = build_model(cfg, 2)
    with torch.no_grad():
        trained.backbone.classifier.weight.fill_(0.25)
    save_trained(trained, cfg, TaskMap(["a", "b"]), {}, tmp_path / "model")
    setup_logging("INFO", "text")
    capsys.readouterr()
    _, _, model = load_trained(tmp_path / "model")
    assert not [line for line in capsys.readouterr().err.splitlines() if "head weights" in line]
    assert torch.equal(model.backbone.classifier.weight, torch.full_like(model.backbone.classifier.weight, 0.25))
    setup_logging("DEBUG", "text")
    load_trained(tmp_path / "model")
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "head weights" in line]
    assert " DEBUG " in line and "classifier.weight" in line
