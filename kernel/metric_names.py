"""MLflow metric names: one scheme for every stage, ``<data>/<metric>`` and ``<data>/<metric>/<scenario>``.

    metric_name(VAL, "auc", "us")             # "val/auc/us"
    metric_name(TRAFFIC, "auc_macro")         # "traffic/auc_macro"

The first part says which rows a figure was measured on, so two AUCs of different data never share a name:

    source      the ingested input (data.source): rows, rejects and positive rates as ingestion read them
    train       the training split while it trains (loss, lr, samples/s)
    val         the ingest's validation split (model selection, early stopping, method comparison)
    test_split  the ingest's held-out test split (the job scores it when data.score_input is empty, and
                promotion gates on it)
    traffic     scored traffic: data.score_input in the job, the scored input of monitoring.check
    eval_set    a pinned evaluation set given to monitoring.promote --eval

Two more groups hold figures that are not measured on data: ``params/`` (parameter counts) and ``diag/``
(training.diagnostics). Scenario names are cleaned (``clean``: characters MLflow refuses become "_").
"""
from __future__ import annotations

import re

SOURCE, TRAIN, VAL, TEST_SPLIT, TRAFFIC, EVAL_SET = "source", "train", "val", "test_split", "traffic", "eval_set"
DATA = (SOURCE, TRAIN, VAL, TEST_SPLIT, TRAFFIC, EVAL_SET)
OTHER_GROUPS = ("params", "diag")


def clean(part: str) -> str:
    """``part`` with the characters MLflow refuses in a metric name replaced by "_"."""
    return re.sub(r"[^A-Za-z0-9_./: -]", "_", str(part))


def metric_name(data: str, metric: str, scenario: str | None = None) -> str:
    """``<data>/<metric>``, or ``<data>/<metric>/<scenario>`` for a figure of one scenario."""
    return f"{data}/{metric}" + (f"/{clean(scenario)}" if scenario is not None else "")
