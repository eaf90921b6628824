"""The registered model is a real MLflow model: it loads with mlflow.pyfunc in a fresh process and through
`mlflow models serve`, and scores exactly as serving.score does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from serving.scoring.cli import main as score_main
from tests.mlflow_testkit import free_port
from tests.serving_testkit import canonical, export, trained_folder, wdc_raw


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny mean-pooling model exported with calibration and registered as relevance@champion (sqlite)."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    valid = root / "valid.parquet"
    pq.write_table(canonical(wdc_raw("valid", per_category=30)), valid)
    # Scored on ONNX Runtime (serving.engine=auto on CPU), one int8 candidate gated on the validation rows.
    export(trained_folder(root, "mean"), root / "export", valid=valid, tracking_uri=uri, name="relevance",
           alias="champion", overrides=["serving.calibrate=true", "serving.onnx.export=true",
                                        "serving.onnx.candidates=[int8_dynamic]"])
    raw = wdc_raw("test", per_category=7, categories=["cameras", "computers", "shoes", "watches"])
    traffic = root / "traffic.parquet"
    pq.write_table(raw, traffic)  # the user's own columns, mapped by the export's data.columns
    rows = canonical(raw)
    out = root / "scores"
    assert score_main(["--model", "models:/relevance@champion", "--tracking-uri", uri, "--input", str(traffic),
                       "--output", str(out), "--quiet", "serving.unknown_scenario=fallback",
                       "serving.fallback_scenario=shoes"]) == 0
    reference = pq.read_table(out).to_pandas().sort_values("source_row").reset_index(drop=True)
    return {"root": root, "uri": uri, "rows": rows.to_pandas(), "reference": reference}


def test_the_registered_export_scores_on_onnx_runtime_and_logs_its_gate(registered):
    from mlflow import MlflowClient

    from kernel.config import load_config
    from serving.layout import read_manifest
    from serving.scoring.runtime import choose_engine

    export_dir = registered["root"] / "export"
    manifest = read_manifest(export_dir)
    assert choose_engine(load_config(export_dir / "config.yaml").serving, manifest, "cpu") == "onnxruntime"
    run_id = json.loads((export_dir / "registered.json").read_text())["export_run_id"]
    metrics = MlflowClient(registered["uri"]).get_run(run_id).data.metrics
    for scenario, res in manifest["onnx"]["gate"]["scenarios"].items():
        got = res["candidates"]["int8_dynamic"]
        assert metrics[f"gate.{scenario}.int8_dynamic.max_abs_dp"] == pytest.approx(got["max_abs_dp"])
        assert metrics[f"gate.{scenario}.int8_dynamic.auc_change"] == pytest.approx(got["auc_change"])
        assert metrics[f"gate.{scenario}.int8_dynamic.passed"] == float(got["passed"])


def _env(uri: str) -> dict:
    """As a user with the virtualenv active: its bin/ on PATH (mlflow models serve execs uvicorn from there)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PATH=path)


def test_pyfunc_in_a_fresh_process_scores_like_serving_score(registered, tmp_path):
    frame = registered["rows"].query("scenario != 'watches'")[["query", "title", "scenario"]]  # known scenarios
    frame.to_parquet(tmp_path / "in.parquet")
    code = ("import mlflow, pandas as pd, sys; m = mlflow.pyfunc.load_model('models:/relevance@champion'); "
            "m.predict(pd.read_parquet(sys.argv[1])).to_parquet(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet")],
                   env=_env(registered["uri"]), cwd=tmp_path, check=True, timeout=240)
    got = pd.read_parquet(tmp_path / "out.parquet")
    ref = registered["reference"].iloc[frame.index.to_numpy()]
    assert list(got.columns) == ["score", "score_raw", "score_calibrated", "decision", "scored_as", "fallback",
                                 "model_version"]
    for col in ("score", "score_raw", "score_calibrated"):
        np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), atol=1e-6, rtol=0)
    assert (got["decision"].to_numpy() == ref["decision"].to_numpy()).all()
    assert set(got["model_version"]) == {"relevance/1"} == set(ref["model_version"])
    assert not (got["score"] == got["score_raw"]).all()  # calibration is on in the export's config


def test_mlflow_models_serve_answers_a_real_request(registered, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/relevance/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env=_env(registered["uri"]), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        rows = registered["rows"].head(12)[["query", "title", "scenario"]]
        body = json.dumps({"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        served = pd.DataFrame(answer)
        ref = registered["reference"].head(12)
        known = ref["scenario"] != "watches"  # the served model has no fallback: unknown scenarios are null
        np.testing.assert_allclose(served["score"][known.to_numpy()].astype(float), ref["score"][known].astype(float),
                                   atol=1e-6, rtol=0)
        assert served["score"][~known.to_numpy()].isna().all()
    finally:
        os.killpg(server.pid, 9)
        server.wait()
        log.close()
