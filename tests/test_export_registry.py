"""Export from an MLflow run with a validation split: calibration, thresholds, drift reference, registration
under a name and alias that scoring resolves; errors that name the source."""
from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from kernel.errors import ConfigError
from kernel.task_map import TASK_MAP_FILE
from serving.export.cli import main
from serving.layout import read_manifest
from serving.registry.cache import resolve_model
from tests.serving_testkit import SCENARIOS, canonical, export, trained_folder, wdc_raw


def test_export_from_run_id_with_validation_registers_a_resolvable_model(tmp_path, capsys):
    import mlflow

    model_dir = trained_folder(tmp_path, "cls")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("train", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp, tags={"data_fingerprint": "abc123"})
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    valid = tmp_path / "valid.parquet"
    pq.write_table(canonical(wdc_raw("valid", per_category=30)), valid)

    argv = ["--run", run.info.run_id, "--out", str(tmp_path / "export"), "--valid", str(valid),
            "--name", "relevance", "--alias", "champion", "--tracking-uri", uri]
    assert main(argv) == 0
    manifest = read_manifest(tmp_path / "export")
    assert manifest["source"]["run_id"] == run.info.run_id
    assert manifest["data_fingerprint"] == "abc123"
    assert manifest["calibration"]["file"] == "calibration.json"
    assert set(manifest["thresholds"]["f1_max_calibrated"]) <= set(SCENARIOS)
    for name in ("calibration.json", "reference.json", "config.yaml", TASK_MAP_FILE):
        assert (tmp_path / "export" / name).is_file()

    local, version = resolve_model("models:/relevance@champion", uri, tmp_path / "cache")
    assert version == "relevance/1"
    assert read_manifest(local)["model_version"] == manifest["model_version"]
    assert (local / "base" / "config.json").is_file() and (local / "factors.safetensors").is_file()
    # The registered version is a pyfunc logged into the training run: the UI links the version to it.
    mv = client.get_model_version("relevance", "1")
    assert mv.run_id == run.info.run_id and mv.tags["training_run_id"] == run.info.run_id
    assert client.get_run(mv.tags["export_run_id"]).data.tags["stage"] == "export"
    assert json.loads((tmp_path / "export" / "registered.json").read_text())["version"] == "1"
    # A second export of the same run replaces the folder and becomes version 2.
    assert main(argv) == 0
    assert resolve_model("models:/relevance@champion", uri, tmp_path / "cache")[1] == "relevance/2"
    assert "registered models:/relevance@champion (version 2)" in capsys.readouterr().err


def test_export_errors_name_the_source(tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    assert main(["--run", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert str(empty) in capsys.readouterr().err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["--run", "0123456789abcdef0123456789abcdef", "--out", str(tmp_path / "x"),
                 "--tracking-uri", uri]) == 2
    assert "0123456789abcdef0123456789abcdef" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_two_registries_with_the_same_name_and_version_never_share_a_cached_model(tmp_path):
    """Two work dirs, each with its own sqlite registry holding `relevance` version 1 of a different model:
    scoring models:/relevance/1 from each registry returns that registry's model, through one shared cache."""
    import numpy as np

    from serving.scoring.table import score_table

    cache = tmp_path / "shared-cache"
    table = canonical(wdc_raw(per_category=5))
    scores, versions = {}, {}
    for name in ("a", "b"):
        work = tmp_path / name
        uri = f"sqlite:///{work / 'mlflow.db'}"
        folder = trained_folder(work, "cls" if name == "a" else "mean")  # two different models
        manifest = export(folder, work / "export", tracking_uri=uri, name="relevance")
        assert manifest["registered"]["version"] == "1"
        local, version = resolve_model("models:/relevance/1", uri, cache)
        assert version == "relevance/1" and read_manifest(local)["model_version"] == manifest["model_version"]
        versions[name] = manifest["model_version"]
        direct = score_table(work / "export", table)["score"].to_numpy()
        via_registry = score_table(local, table)["score"].to_numpy()
        np.testing.assert_allclose(via_registry, direct, atol=1e-6, rtol=0)
        scores[name] = via_registry
    assert versions["a"] != versions["b"] and np.abs(scores["a"] - scores["b"]).max() > 1e-3
    # Both registries resolved again: each still gets its own copy.
    for name in ("a", "b"):
        local, _ = resolve_model("models:/relevance/1", f"sqlite:///{tmp_path / name / 'mlflow.db'}", cache)
        assert read_manifest(local)["model_version"] == versions[name]


def test_a_damaged_cached_copy_is_downloaded_again(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    manifest = export(trained_folder(tmp_path, "cls"), tmp_path / "export", tracking_uri=uri, name="m")
    local, _ = resolve_model("models:/m/1", uri, tmp_path / "cache")
    (local / "factors.safetensors").write_bytes(b"not the factors")
    again, _ = resolve_model("models:/m/1", uri, tmp_path / "cache")
    assert again == local and read_manifest(again)["model_version"] == manifest["model_version"]
    # The version names the factors' content: recomputed here independently of serving.layout.factors_digest.
    assert f"export-{hashlib.sha256((again / 'factors.safetensors').read_bytes()).hexdigest()[:12]}" == \
        manifest["model_version"]


def test_a_copy_another_process_published_first_is_kept_not_replaced(tmp_path, monkeypatch):
    """Two processes on one machine (two Ray actors) download the same model into one cache: the one that
    finishes second keeps the first one's folder instead of renaming it away while the first one reads it."""
    import serving.registry.cache as cache

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    export(trained_folder(tmp_path, "cls"), tmp_path / "export", tracking_uri=uri, name="m")
    real_publish, first = cache.publish_dir, {}

    def the_other_process_finishes_first(stage, final, replace=True):
        if not first:  # this process found no copy and downloaded one; meanwhile the other one published its own
            first["racing"] = True  # set before the nested resolve, which publishes through this hook too
            first["dir"], _ = resolve_model("models:/m/1", uri, tmp_path / "cache")
            first["inode"] = first["dir"].stat().st_ino
        return real_publish(stage, final, replace)

    monkeypatch.setattr(cache, "publish_dir", the_other_process_finishes_first)
    local, version = resolve_model("models:/m/1", uri, tmp_path / "cache")
    assert local == first["dir"] and version == "m/1"
    assert local.stat().st_ino == first["inode"]  # the first copy is still the one in place
    assert read_manifest(local)["model_version"].startswith("export-")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [local.name]  # no staging or set-aside folder left


def test_a_registry_model_needs_an_explicit_registry(tmp_path, monkeypatch):
    import pytest

    from kernel.errors import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--tracking-uri"):
        resolve_model("models:/m@champion", None, tmp_path / "cache")
    assert not (tmp_path / "mlflow.db").exists()  # nothing implicit was created


def test_an_export_keeps_the_sections_its_weights_were_trained_with(tmp_path, capsys):
    """The command line refuses an override of a trained section; the stage refuses a config that changed one."""
    from serving.export import run
    from serving.export.source import export_config

    folder = trained_folder(tmp_path, "cls")
    assert main(["--run", str(folder), "--out", str(tmp_path / "export"), "adapter.r=8"]) == 2
    assert "adapter.r" in capsys.readouterr().err
    cfg = export_config(folder, overrides=["serving.batch_size=3"])  # a deployment section: allowed
    assert cfg.serving.batch_size == 3 and cfg.adapter.r == 4
    cfg.adapter.r = 8
    with pytest.raises(ConfigError, match="adapter"):
        run(cfg, folder, tmp_path / "export")
    assert not (tmp_path / "export").exists()
