"""Scale-out on Ray: a local Ray instance bound to 127.0.0.1 (Ray Data map_batches, one model per actor)
gives exactly the single-process scores. Skipped only when Ray is not installed (pip install '.[ray]')."""
from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from serving.export import export_model
from serving.score import main
from tests.serving_testkit import SCENARIOS, trained_folder, wdc_raw

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' to run the Ray engine test")


def scores(out):
    return ds.dataset(out, format="parquet").to_table().sort_by([("source_file", "ascending"),
                                                                  ("source_row", "ascending")])


def test_ray_engine_matches_single_process(tmp_path):
    model_dir = trained_folder(tmp_path, "mean")
    export_model(str(model_dir), tmp_path / "export")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, cat in enumerate(SCENARIOS + ["watches"]):
        pq.write_table(wdc_raw(per_category=15, categories=[cat]), inputs / f"{cat}.parquet")
    args = ["--model", str(tmp_path / "export"), "--input", str(inputs), "--quiet",
            "serving.unknown_scenario=fallback", "serving.fallback_scenario=shoes"]
    assert main(args + ["--output", str(tmp_path / "single")]) == 0
    try:
        assert main(args + ["--output", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]) == 0
        assert ray.is_initialized()
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        ray.shutdown()
    single, on_ray = scores(tmp_path / "single"), scores(tmp_path / "ray")
    assert on_ray.num_rows == 60 and sum(on_ray["fallback"].to_pylist()) == 15
    assert single.drop_columns(["score"]).equals(on_ray.drop_columns(["score"]))
    np.testing.assert_allclose(single["score"].to_numpy(), on_ray["score"].to_numpy(), atol=1e-6, rtol=0)
    # Resume on Ray: every shard is finished, nothing is rescored.
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "ray" / "_done").glob("*.json"))
    assert main(args + ["--output", str(tmp_path / "ray"), "--engine", "ray", "--resume"]) == 0
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "ray" / "_done").glob("*.json")) == stamps
