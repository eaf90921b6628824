"""Export from an MLflow run with a validation split: calibration, thresholds, drift reference, registration
under a name and alias that scoring resolves; errors that name the source."""
from __future__ import annotations

import pyarrow.parquet as pq

from serving.export import main
from serving.layout import read_manifest
from serving.scoring_model import resolve_model
from serving_testkit import SCENARIOS, canonical, trained_folder, wdc_raw


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
    for name in ("calibration.json", "reference.json", "config.yaml", "task_map.json"):
        assert (tmp_path / "export" / name).is_file()

    local, version = resolve_model("models:/relevance@champion", uri, tmp_path / "cache")
    assert version == "relevance/1"
    assert read_manifest(local)["model_version"] == manifest["model_version"]
    assert (local / "base" / "config.json").is_file() and (local / "factors.safetensors").is_file()
    assert (tmp_path / "mlartifacts" / "serving-tests").is_dir()  # artifacts beside the database
    # A second export of the same run replaces the folder and becomes version 2.
    assert main(argv) == 0
    assert resolve_model("models:/relevance@champion", uri, tmp_path / "cache")[1] == "relevance/2"
    assert "registered models:/relevance@champion (version 2)" in capsys.readouterr().out


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
