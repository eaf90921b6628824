"""The job's step state: fingerprints that change with what decides a step's output, and resumption."""
from __future__ import annotations

import os

from job.state import Fingerprint, JobState, listing


def fp(**changes) -> Fingerprint:
    base = {"config": {"train.max_steps": 300, "train.lr": 1e-3}, "inputs": {"source": [["a.parquet", 10, 1]]},
            "upstream": {"ingest": "u1"}, "code": "c1"}
    base.update(changes)
    return Fingerprint(**base)


def test_each_part_of_a_fingerprint_changes_it_and_is_named():
    old = fp()
    assert fp().digest == old.digest
    cases = {
        "config train.max_steps": fp(config={"train.max_steps": 500, "train.lr": 1e-3}),
        "input data": fp(inputs={"source": [["a.parquet", 10, 1], ["b.parquet", 5, 2]]}),
        "upstream ingest": fp(upstream={"ingest": "u2"}),
        "code version": fp(code="c2"),
    }
    for reason, new in cases.items():
        assert new.digest != old.digest
        assert new.changes_since(old.parts()) == [reason]


def test_an_interrupted_step_resumes_only_with_unchanged_inputs(tmp_path):
    state = JobState(tmp_path / "state")
    assert state.read("train") is None
    assert state.begin("train", fp()) is False  # nothing to resume the first time
    assert state.begin("train", fp()) is True  # killed, started again with the same inputs: resume
    assert state.begin("train", fp(code="c2")) is False  # killed, then the code changed: start over
    out = tmp_path / "train"
    out.mkdir()
    (out / "w.bin").write_bytes(b"x")
    rec = state.finish("train", fp(code="c2"), [out], {"run_id": "r1", "steps": 3}, exit_code=4)
    again = state.read("train")
    assert again.fingerprint == fp(code="c2").digest and again.exit_code == 4 and again.info["steps"] == 3
    assert not (tmp_path / "state" / "train.running.json").exists()
    # The output digest follows what the step wrote (a downstream fingerprint includes it).
    (out / "w.bin").write_bytes(b"xy")
    assert state.finish("train", fp(code="c2"), [out], {"run_id": "r1"}, 0).output != rec.output


def test_listing_sees_new_changed_and_removed_files_but_not_temporaries(tmp_path):
    (tmp_path / "market=us").mkdir()
    (tmp_path / "market=us" / "part-0.parquet").write_bytes(b"1")
    first = listing(tmp_path)
    (tmp_path / ".part-1.parquet.tmp").write_bytes(b"partial")
    assert listing(tmp_path) == first
    (tmp_path / "market=us" / "part-1.parquet").write_bytes(b"2")
    assert len(listing(tmp_path)) == 2
    os.utime(tmp_path / "market=us" / "part-0.parquet", ns=(1, 1))
    assert listing(tmp_path)[0] != first[0]
    assert listing(tmp_path / "absent") == []


def test_the_summary_reads_the_champion_from_the_registry_not_an_old_promote_record(tmp_path, capsys):
    """An earlier run promoted version 1 (its record stays in the state); the aliases are gone since. A run with
    --skip promote must say there is no champion, not repeat the old record."""
    from job.run import run_job
    from job.steps import STEPS, JobPaths
    from kernel.config import load_config
    from serving.registry import aliases as registry
    from tests.shared import TINY_CONFIG

    cfg = load_config(TINY_CONFIG, [f"work_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    client = registry.registry_client(cfg.tracking_uri)
    client.create_registered_model(cfg.tracking.registered_model)  # registered, no alias
    JobState(JobPaths(cfg).state).finish("promote", fp(), [], {"passed": True, "reasons": [],
                                                             "candidate_version": "1"}, exit_code=0)
    assert run_job(cfg, skip=STEPS) == 0
    out = capsys.readouterr().out
    assert f"registry: models:/{cfg.tracking.registered_model} has no champion" in out
    assert "is version 1" not in out and "promoted" not in out
    client.create_model_version(cfg.tracking.registered_model, str(tmp_path), description="v1")
    client.set_registered_model_alias(cfg.tracking.registered_model, registry.CHAMPION, "1")
    assert run_job(cfg, skip=STEPS) == 0
    assert f"registry champion: models:/{cfg.tracking.registered_model}@champion is version 1" in \
        capsys.readouterr().out
