"""Ray across machines: actors load the model from what every node reaches (the registry, an object store),
never from the driver's copy, and serving.gpus_per_actor puts several actors on one GPU.

The driver's own copy is cut down to what the driver reads (config, manifest, task map) and its download
folder deleted before any actor starts: an actor that loaded the driver's path would find no weights and
fail the job. The actors resolve the reference through their node's registry cache (here another folder
of the same machine). Skipped only when Ray is not installed (pip install '.[ray]')."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from kernel import storage
from serving.registry.cache import default_cache_dir, node_reference
from serving.scoring import cli
from tests.serving_testkit import SCENARIOS, export, trained_folder, wdc_raw

pytestmark = pytest.mark.starts_ray

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' to run the Ray engine test")


@pytest.fixture(scope="module")
def ray_with_one_gpu(s3_server):
    """A private Ray on 127.0.0.1 that offers one GPU (a resource Ray hands out; no device is needed to place
    actors on it). Started after the S3 server, so its actors inherit the S3 endpoint's environment."""
    from serving.scoring.ray_engine import init_ray

    ray.shutdown()  # a Ray left by another module would not offer the GPU
    mp = pytest.MonkeyPatch()
    # An earlier Ray driver in this process that had no GPU set CUDA_VISIBLE_DEVICES="" here, and a raylet
    # refuses to offer a GPU that the variable hides.
    mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    init_ray("local", num_gpus=1)
    yield
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def published(tmp_path_factory, s3_server):
    """A tiny model exported, registered as relevance@champion (sqlite), and published to S3; the traffic
    and the local engine's scores of the same export folder."""
    import boto3

    root = tmp_path_factory.mktemp("ray-nodes")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    export(trained_folder(root, "mean"), root / "export", tracking_uri=uri, name="relevance", alias="champion")
    boto3.client("s3").create_bucket(Bucket="ray-nodes")
    storage.upload_dir(root / "export", "s3://ray-nodes/models/relevance")
    pq.write_table(wdc_raw(per_category=16, categories=SCENARIOS), root / "traffic.parquet", row_group_size=12)
    assert cli.main(["--model", str(root / "export"), "--input", str(root / "traffic.parquet"), "--output",
                     str(root / "local"), "--quiet", "serving.unit_rows=12"]) == 0
    return {"root": root, "uri": uri, "local": scores(root / "local")}


def scores(out):
    t = ds.dataset(out, format="parquet").to_table()
    return t.sort_by([("source_file", "ascending"), ("source_row", "ascending")])


def strip_the_drivers_copy(monkeypatch, folder):
    """The driver resolves ``--model`` as usual (into --cache-dir), keeps only what it reads itself in
    ``folder`` (config, manifest, task map) and deletes its download: the weights exist nowhere on the driver's disk."""
    real = cli.resolve_model

    def resolve(model, tracking_uri=None, cache_dir=None):
        export_dir, version = real(model, tracking_uri, cache_dir)
        folder.mkdir()
        for name in ("config.yaml", "manifest.json", "task_map.json"):
            shutil.copy(export_dir / name, folder / name)
        shutil.rmtree(cache_dir)
        return folder, version

    monkeypatch.setattr(cli, "resolve_model", resolve)


@pytest.mark.parametrize("source", ["registry", "s3"])
def test_actors_resolve_the_model_on_their_node_two_actors_share_one_gpu(source, published, ray_with_one_gpu,
                                                                         tmp_path, monkeypatch):
    model = "models:/relevance@champion" if source == "registry" else "s3://ray-nodes/models/relevance"
    strip_the_drivers_copy(monkeypatch, tmp_path / "driver-view")
    out = tmp_path / "scores"
    # Two actors of 0.5 GPU each on a Ray with one GPU: with whole GPUs the pool would not fit.
    assert cli.main(["--model", model, "--tracking-uri", published["uri"], "--cache-dir", str(tmp_path / "driver"),
                     "--input", str(published["root"] / "traffic.parquet"), "--output", str(out), "--quiet",
                     "--engine", "ray", "--workers", "2", "serving.gpus_per_actor=0.5", "serving.unit_rows=12"]) == 0
    assert not (tmp_path / "driver").exists() and not (tmp_path / "driver-view" / "base").exists()
    markers = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    assert len(markers) == 4 and len({m["pid"] for m in markers}) == 2, markers  # both actors scored
    # The actors' own node cache holds the copy they loaded, checked against the registry or the commit marker.
    copies = [json.loads(p.read_text())["identity"] for p in default_cache_dir().glob("*/_registry.json")]
    if source == "registry":
        # (other modules' models named relevance share the session's cache: match this registry's copy)
        wanted = {"registry": published["uri"], "name": "relevance", "version": "1"}.items()
        assert any(wanted <= c.items() for c in copies), copies
    else:
        assert any(c.get("uri") == model for c in copies)
    got, want = scores(out), published["local"]
    keep = [c for c in want.column_names if c not in ("score", "score_raw", "model_version")]
    assert got.select(keep).equals(want.select(keep))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), atol=1e-6, rtol=0)


def test_an_alias_reaches_other_nodes_pinned_to_the_version_the_driver_resolved(published):
    ref, uri = node_reference("models:/relevance@champion", "relevance/1", published["uri"])
    assert (ref, uri) == ("models:/relevance/1", published["uri"])
    assert node_reference("s3://b/models/x", "export-abc") == ("s3://b/models/x", None)
    folder, none = node_reference(published["root"] / "export", "relevance/1")
    assert folder == str((published["root"] / "export").resolve()) and none is None


def test_gpus_per_actor_takes_fractions_and_whole_numbers_only_above_one():
    from kernel.config import config_from_dict
    from kernel.errors import ConfigError
    from serving.scoring.ray_engine import actor_resources

    class Cluster:  # what actor_resources reads of Ray
        def __init__(self, resources):
            self.resources = resources

        def cluster_resources(self):
            return self.resources

    assert actor_resources(Cluster({"CPU": 8.0, "GPU": 1.0}), 1, 0.25) == {"num_cpus": 1, "num_gpus": 0.25}
    assert actor_resources(Cluster({"CPU": 8.0, "GPU": 4.0}), 2, 2.0) == {"num_cpus": 2, "num_gpus": 2.0}
    assert actor_resources(Cluster({"CPU": 8.0}), 1, 0.5) == {"num_cpus": 1, "num_gpus": 0}
    assert config_from_dict({"serving": {"gpus_per_actor": 0.5}}).serving.gpus_per_actor == 0.5
    for bad in (1.5, -0.5):
        with pytest.raises(ConfigError, match="serving.gpus_per_actor"):
            config_from_dict({"serving": {"gpus_per_actor": bad}})
