"""Scale-out on Ray: a local Ray instance bound to 127.0.0.1 (Ray Data map_batches over the job's units, one
model per actor) gives exactly the single-process scores, spreads one large file over several actors, and
prints none of Ray's per-run noise. Skipped only when Ray is not installed (pip install '.[ray]')."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from serving.scoring.cli import main
from tests.serving_testkit import SCENARIOS, export, trained_folder, wdc_raw
from tests.shared import log_messages

pytestmark = pytest.mark.starts_ray

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' to run the Ray engine test")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-model")
    export(trained_folder(root, "mean"), root / "export")
    return root / "export"


@pytest.fixture(scope="module", autouse=True)
def _one_ray_for_the_module():
    """The first scoring run starts the private Ray (inside the test, so its output is checked); later
    runs join it; it stops after the module."""
    yield
    ray.shutdown()


def scores(out):
    return ds.dataset(out, format="parquet").to_table().sort_by([("source_file", "ascending"),
                                                                  ("source_row", "ascending")])


def markers(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))]


def test_one_large_file_is_scored_by_two_actors_in_parallel_like_the_local_engine(tmp_path, export_dir, capfd):
    # One file of 8 row groups (15 rows each); serving.unit_rows=30 packs two groups per unit: 4 units.
    raw = wdc_raw(per_category=40, categories=SCENARIOS)
    raw = raw.append_column("pair_id", pa.array(np.arange(raw.num_rows), pa.int64())).slice(0, 120)
    pq.write_table(raw, tmp_path / "big.parquet", row_group_size=15)
    assert pq.read_metadata(tmp_path / "big.parquet").num_row_groups == 8
    args = ["--model", str(export_dir), "--input", str(tmp_path / "big.parquet"), "--quiet",
            "data.columns.keys=[pair_id]", "serving.unit_rows=30"]
    assert main(args + ["--output", str(tmp_path / "local")]) == 0
    capfd.readouterr()
    assert main(args + ["--output", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]) == 0
    err = capfd.readouterr().err
    assert ray.is_initialized() and {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    # Ray's noise is gone: the driver's core_worker E-line per actor, the token-auth warning, Ray Data's
    # INFO lines (--quiet).
    for noise in ("core_worker.cc", "Token authentication", "Starting execution", "Total Progress"):
        assert noise not in err, err[-3000:]

    done = markers(tmp_path / "ray")
    assert [(m["unit"], m["row_groups"], m["rows"]) for m in done] == [
        (0, [0, 2], [0, 30]), (1, [2, 4], [30, 60]), (2, [4, 6], [60, 90]), (3, [6, 8], [90, 120])]
    assert len({m["pid"] for m in done}) >= 2, done  # two actors scored units of the one file
    on_ray = scores(tmp_path / "ray")
    assert on_ray["source_row"].to_pylist() == list(range(120))  # exactly one score per input row
    assert on_ray["pair_id"].to_pylist() == list(range(120))
    # Per unit: the same rows, in the same (input) order, and the same scores as the local engine.
    for i in range(4):
        name = f"part-00000-{i:04d}-big.parquet"
        local_part, ray_part = pq.read_table(tmp_path / "local" / name), pq.read_table(tmp_path / "ray" / name)
        assert ray_part["source_row"].to_pylist() == list(range(30 * i, 30 * i + 30))
        assert ray_part.drop_columns(["score", "score_raw"]).equals(local_part.drop_columns(["score", "score_raw"]))
        np.testing.assert_allclose(ray_part["score"].to_numpy(), local_part["score"].to_numpy(), atol=1e-6, rtol=0)


def test_ray_engine_matches_single_process_and_resumes(tmp_path, export_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, cat in enumerate(SCENARIOS + ["watches"]):
        pq.write_table(wdc_raw(per_category=15, categories=[cat]), inputs / f"{cat}.parquet")
    args = ["--model", str(export_dir), "--input", str(inputs), "--quiet",
            "serving.unknown_scenario=fallback", "serving.fallback_scenario=shoes"]
    assert main(args + ["--output", str(tmp_path / "single")]) == 0
    assert main(args + ["--output", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]) == 0
    single, on_ray = scores(tmp_path / "single"), scores(tmp_path / "ray")
    assert on_ray.num_rows == 60 and sum(on_ray["fallback"].to_pylist()) == 15
    assert single.drop_columns(["score"]).equals(on_ray.drop_columns(["score"]))
    np.testing.assert_allclose(single["score"].to_numpy(), on_ray["score"].to_numpy(), atol=1e-6, rtol=0)
    # Resume on Ray: every unit is finished, nothing is rescored (and no actor is started).
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "ray" / "_done").glob("*.json"))
    assert len(stamps) == 4
    assert main(args + ["--output", str(tmp_path / "ray"), "--engine", "ray", "--resume"]) == 0
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "ray" / "_done").glob("*.json")) == stamps


def test_actors_request_a_gpu_where_the_cluster_has_gpus():
    """Without num_gpus Ray hides the GPUs from an actor (CUDA_VISIBLE_DEVICES=""): request one per actor
    when the cluster has any (a local Ray gets the CUDA devices torch sees). No GPU here: a stand-in Ray."""
    from serving.scoring.ray_engine import actor_resources

    class FakeRay:
        def __init__(self, resources):
            self.resources = resources

        def cluster_resources(self):
            return self.resources

    assert actor_resources(FakeRay({"CPU": 16.0, "GPU": 2.0}), threads=1) == {"num_cpus": 1, "num_gpus": 1}
    assert actor_resources(FakeRay({"CPU": 16.0}), threads=4) == {"num_cpus": 4, "num_gpus": 0}


def test_an_actor_killed_mid_job_is_8_in_one_line_naming_it_and_resume_finishes(tmp_path, export_dir, capfd):
    """A real actor process is killed (-9) once it has finished a unit: the driver reports it in one line
    (exit 8, its pid, the --resume hint, no traceback); --resume redoes only the units left."""
    import os
    import signal
    import threading
    import time

    pq.write_table(wdc_raw(per_category=80, categories=SCENARIOS), tmp_path / "in.parquet", row_group_size=10)
    args = ["--model", str(export_dir), "--input", str(tmp_path / "in.parquet"), "--quiet", "serving.unit_rows=10",
            "--output", str(tmp_path / "ray")]
    killed = []

    def kill_the_first_actor():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            done = sorted((tmp_path / "ray" / "_done").glob("*.json"))
            if done:
                pid = json.loads(done[0].read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_the_first_actor)
    watcher.start()
    code = main(args + ["--engine", "ray", "--workers", "1"])
    watcher.join()
    err = capfd.readouterr().err
    assert killed and code == 8, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    (message,) = log_messages(err)
    assert message.startswith("error: resource unavailable: a Ray scoring actor (pid ") and str(killed[0]) in message
    assert message.endswith("rerun the same command with --resume")
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "_done").glob("*.json")}
    assert 1 <= len(finished) < 24
    assert main(args + ["--resume"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "_done").glob("*.json") if p.name in finished} \
        == finished
    keys = list(zip(*(scores(tmp_path / "ray")[c].to_pylist() for c in ("source_file", "source_row"))))
    assert len(keys) == len(set(keys)) == 240
