"""Export: every artifact reproduces the training-time model's scores, per scenario and pooling.

Properties checked (fp32, |Δlogit| ≤ 1e-5; bf16 scoring: |Δprobability| ≤ 2e-2):
  plain per-scenario checkpoint (transformers only)  == training model with that scenario's task id
  base + PEFT adapter                                 == training model
  ScoringModel switching scenarios in any order       == training model
and the scenarios really differ (the deltas are not trivially zero).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from kernel.config import ServingConfig, load_config
from kernel.task_map import TASK_MAP_FILE
from serving.layout import read_manifest
from serving.scoring.model import ScoringModel
from serving.scoring.scorer import BatchScorer
from tests.serving_testkit import SCENARIOS, canonical, export, sigmoid, trained_folder, training_logits, wdc_raw

ATOL = 1e-5


def usual_load(folder, pooling: str):
    """How a consumer loads a checkpoint: the Auto class (mean pooling ships its code: trust it)."""
    return AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=pooling == "mean").eval()


def plain_logits(folder, pooling: str, queries: list[str], titles: list[str], max_length: int) -> np.ndarray:
    """Score with transformers classes only, as a consumer of the checkpoint would."""
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=pooling == "mean")
    enc = tok(queries, titles, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return usual_load(folder, pooling)(**enc).logits[:, 0].numpy()


@pytest.mark.parametrize("pooling,arch", [("cls", "bert"), ("mean", "bert"), ("last", "llama")])
def test_exported_artifacts_reproduce_training_scores(tmp_path, pooling, arch):
    model_dir = trained_folder(tmp_path, pooling, arch)
    out = tmp_path / "export"
    manifest = export(model_dir, out)
    assert read_manifest(out) == json.loads((out / "manifest.json").read_text())
    assert json.loads((out / TASK_MAP_FILE).read_text())["scenarios"] == SCENARIOS
    assert (out / TASK_MAP_FILE).read_bytes() == (model_dir / TASK_MAP_FILE).read_bytes()  # one file, copied
    assert manifest["pooling"] == pooling and load_config(out / "config.yaml").model.pooling == pooling

    table = canonical(wdc_raw(per_category=6))
    ref = training_logits(model_dir, table)
    scenario = np.asarray(table["scenario"].to_pylist())
    queries, titles = table["query"].to_pylist(), table["title"].to_pylist()
    sm = ScoringModel.load(out)
    tok = AutoTokenizer.from_pretrained(out / "base", trust_remote_code=pooling == "mean")
    enc = tok(queries, titles, truncation=True, max_length=manifest["max_length"], padding=True, return_tensors="pt")
    base = usual_load(out / "base", pooling)
    as_each = {}
    for name in SCENARIOS + SCENARIOS[:1]:  # switch back to the first: no drift from repeated merges
        entry = manifest["scenarios"][name]
        rows = scenario == name
        sub_q = [q for q, r in zip(queries, rows) if r]
        sub_t = [t for t, r in zip(titles, rows) if r]
        plain = plain_logits(out / entry["merged"], pooling, sub_q, sub_t, manifest["max_length"])
        np.testing.assert_allclose(plain, ref[rows], atol=ATOL, rtol=0)

        sm.use(name)
        as_each[name] = sm.logits(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")).numpy()
        np.testing.assert_allclose(as_each[name][rows], ref[rows], atol=ATOL, rtol=0)

        peft = PeftModel.from_pretrained(base, out / entry["adapter"]).eval()
        with torch.no_grad():
            got = peft(**enc).logits[:, 0].numpy()
        base = peft.unload()  # the same base module, adapters removed, for the next scenario
        np.testing.assert_allclose(got[rows], ref[rows], atol=ATOL, rtol=0)
    # Each scenario's delta changes the scores: the equalities above are not trivially true.
    assert np.abs(as_each["cameras"] - as_each["computers"]).max() > 1e-3


def test_mean_pooling_checkpoint_never_loads_with_a_random_head(tmp_path):
    """The usual AutoModelForSequenceClassification load refuses without trust_remote_code (a plain BERT class
    would load the encoder and a freshly initialised classifier, with only a warning)."""
    out = tmp_path / "export"
    manifest = export(trained_folder(tmp_path, "mean"), out)
    for folder in (out / "base", out / manifest["scenarios"]["shoes"]["merged"]):
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForSequenceClassification.from_pretrained(folder)
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModel.from_pretrained(folder)
        assert (folder / "modeling_ads_relevance.py").is_file() and not (folder / "head.safetensors").exists()


def test_bf16_scoring_within_stated_tolerance(tmp_path):
    model_dir = trained_folder(tmp_path, "mean")
    export(model_dir, tmp_path / "export")
    table = canonical(wdc_raw(per_category=8))
    ref = sigmoid(training_logits(model_dir, table))
    for dtype, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
        scorer = BatchScorer(tmp_path / "export", ServingConfig(precision=dtype, batch_size=4), "test")
        scored, unknown = scorer.score(table)
        assert unknown.num_rows == 0
        np.testing.assert_allclose(scored["score"].to_numpy(), ref, atol=tol, rtol=0)


def test_exported_and_trained_files_follow_the_umask(tmp_path):
    """safetensors (and transformers through it) create files 0600 whatever the umask, so another service
    account could not read a shared export. Every file the trainer and the export write follows the umask."""
    import os
    import stat

    old = os.umask(0o002)  # a group-shared deployment
    try:
        model_dir = trained_folder(tmp_path, "cls", "bert")
        out = tmp_path / "export"
        export(model_dir, out)
    finally:
        os.umask(old)
    files = [p for root in (model_dir, out) for p in root.rglob("*") if p.is_file()]
    assert sum(p.suffix == ".safetensors" for p in files) >= 5
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {m for m in modes.values()} == {"0o664"}, {p: m for p, m in modes.items() if m != "0o664"}
