"""The registered model is a real MLflow model: it loads with mlflow.pyfunc in a fresh process and through
`mlflow models serve`, reads the same columns as serving.score (the export's data.columns) and scores exactly
as it does, unknown scenarios and rejected rows included."""
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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.scoring.cli import main as score_main
from tests.mlflow_testkit import free_port
from tests.serving_testkit import canonical, registered_champion, wdc_raw


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny mean-pooling model exported with calibration and registered as relevance@champion (sqlite)."""
    root = tmp_path_factory.mktemp("pyfunc")
    # Scored on ONNX Runtime (serving.engine=auto on CPU), one int8 candidate gated on the validation rows. The
    # served precision is pinned to fp32: dynamic int8 scales activations per batch, so its scores depend on
    # which rows share a batch (within the gate's tolerance), and these tests compare paths that batch rows
    # differently to 1e-6.
    # The engine is named: auto would follow the speeds the gate measured, which may favour torch for this model.
    uri = registered_champion(root, ["serving.calibrate=true", "serving.onnx.export=true", "serving.engine=onnxruntime",
                                     "serving.onnx.candidates=[int8_dynamic]", "serving.precision=fp32"])
    raw = wdc_raw("test", per_category=7, categories=["cameras", "computers", "shoes", "watches"])
    traffic = root / "traffic.parquet"
    pq.write_table(raw, traffic)  # the user's own columns, mapped by the export's data.columns
    rows = canonical(raw)
    out = root / "scores"
    assert score_main(["--model", "models:/relevance@champion", "--tracking-uri", uri, "--input", str(traffic),
                       "--output", str(out), "--quiet", "serving.unknown_scenario=fallback",
                       "serving.fallback_scenario=shoes"]) == 0
    reference = pq.read_table(out).to_pandas().sort_values("source_row").reset_index(drop=True)
    return {"root": root, "uri": uri, "rows": rows.to_pandas(), "raw": raw.to_pandas(), "reference": reference}


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
        assert metrics[f"val/gate_int8_dynamic_max_abs_dp/{scenario}"] == pytest.approx(got["max_abs_dp"])
        assert metrics[f"val/gate_int8_dynamic_auc_change/{scenario}"] == pytest.approx(got["auc_change"])
        assert metrics[f"val/gate_int8_dynamic_passed/{scenario}"] == float(got["passed"])


def _env(uri: str) -> dict:
    """As a user with the virtualenv active: its bin/ on PATH (mlflow models serve execs uvicorn from there)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PATH=path)


def test_pyfunc_in_a_fresh_process_takes_the_mapped_columns_and_says_why_a_row_has_no_score(registered, tmp_path):
    """The user's own columns (left, right, category: the export's data.columns), a scenario the model does not
    know (watches; this export has no fallback) and a row with an empty query: every row comes back, in order."""
    frame = registered["raw"][["left", "right", "category"]].copy()  # what serving.score read, label aside
    frame.loc[1, "left"] = "  "  # fails ingestion's check empty_query
    frame.to_parquet(tmp_path / "in.parquet")
    code = ("import mlflow, pandas as pd, sys; m = mlflow.pyfunc.load_model('models:/relevance@champion'); "
            "m.predict(pd.read_parquet(sys.argv[1])).to_parquet(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet")],
                   env=_env(registered["uri"]), cwd=tmp_path, check=True, timeout=240)
    got = pd.read_parquet(tmp_path / "out.parquet")
    assert list(got.columns) == ["score", "score_raw", "score_calibrated", "decision", "scored_as", "fallback",
                                 "status", "reason", "model_version"]
    assert len(got) == len(frame) and set(got["model_version"]) == {"relevance/1"}
    unknown = (frame["category"] == "watches").to_numpy()
    assert got["status"][unknown].eq("quarantined").all() and got["reason"][unknown].eq("unknown_scenario").all()
    assert got["score"][unknown].isna().all() and got["decision"][unknown].isna().all()
    assert (got.loc[1, "status"], got.loc[1, "reason"]) == ("quarantined", "empty_query")
    assert np.isnan(got.loc[1, "score"])
    known = ~unknown & (np.arange(len(frame)) != 1)
    assert got["status"][known].eq("scored").all() and got["reason"][known].isna().all()
    ref = registered["reference"].iloc[np.flatnonzero(known)]  # serving.score of the same rows
    for col in ("score", "score_raw", "score_calibrated"):
        np.testing.assert_allclose(got[col][known].to_numpy(), ref[col].to_numpy(), atol=1e-6, rtol=0)
    assert (got["decision"][known].to_numpy() == ref["decision"].to_numpy()).all()
    assert set(ref["status"]) == {"scored"} and set(ref["model_version"]) == {"relevance/1"}
    assert not (got["score"][known] == got["score_raw"][known]).all()  # calibration is on in the export's config


def test_each_registered_version_scores_under_its_own_name_even_when_one_folder_is_registered_twice(registered):
    """The export folder registered again (version 2) already holds version 1's registration record; each
    version, loaded through the registry, must still stamp its rows with its own name/version (and nothing in
    MLflow >= 3.18 tells the model which registered version it was loaded as)."""
    import mlflow

    from kernel.mlflow_client import fluent_uri
    from serving.registry.register import register_export

    again = register_export(registered["root"] / "export", registered["uri"], "serving-tests", "relevance")
    assert again["version"] != "1"
    rows = registered["raw"][["left", "right", "category"]].head(4)  # cameras: a scenario the model knows
    with fluent_uri(registered["uri"]):
        for version in ("1", again["version"]):
            got = mlflow.pyfunc.load_model(f"models:/relevance/{version}").predict(rows)
            assert set(got["status"]) == {"scored"} and set(got["model_version"]) == {f"relevance/{version}"}


def test_the_pyfunc_routes_unknown_scenarios_to_the_configured_fallback_like_serving_score(registered):
    """With serving.unknown_scenario=fallback (what the fixture's serving.score ran with), the rows of
    watches score as shoes, flagged, exactly as in the batch output."""
    from kernel.config import load_config
    from serving.scoring.scorer import BatchScorer
    from serving.scoring.table import score_user_rows

    export = registered["root"] / "export"
    cfg = load_config(export / "config.yaml", ["serving.unknown_scenario=fallback", "serving.fallback_scenario=shoes"])
    scorer = BatchScorer(export, cfg.serving, "relevance/1")
    got = score_user_rows(scorer, cfg.data, pa.Table.from_pandas(registered["raw"]), 16).to_pandas()
    ref = registered["reference"]
    assert (got["status"] == ref["status"]).all() and set(got["status"]) == {"scored", "fallback"}
    assert (got["scored_as"] == ref["scored_as"]).all() and (got["fallback"] == ref["fallback"]).all()
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), atol=1e-6, rtol=0)


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
        rows = registered["raw"].head(12)[["left", "right", "category"]]  # the export's data.columns
        body = json.dumps({"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        served = pd.DataFrame(answer)
        ref = registered["reference"].head(12)
        known = ref["scenario"] != "watches"  # the served model has no fallback: unknown scenarios get no score
        np.testing.assert_allclose(served["score"][known.to_numpy()].astype(float), ref["score"][known].astype(float),
                                   atol=1e-6, rtol=0)
        assert served["score"][~known.to_numpy()].isna().all()
        assert set(served["reason"][~known.to_numpy()]) <= {"unknown_scenario"}
    finally:
        os.killpg(server.pid, 9)
        server.wait()
        log.close()
