"""The registered model scores a Spark DataFrame through ``mlflow.pyfunc.spark_udf`` on a real local Spark
(local[2], one session for the module): the scores are serving's, and each Python worker of the executor
reads the weights once for all its tasks and batches, while MLflow loads the pyfunc once per task.

Needs Java 17 (``make system`` installs Debian's openjdk-17-jre-headless) and pyspark (the dev extra)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter

import numpy as np
import pytest

from serving.scoring.table import LOAD_LOG_ENV, score_table
from tests.serving_testkit import canonical, registered_champion, wdc_raw

PARTITIONS = 6
BATCH_ROWS = 8  # spark.sql.execution.arrow.maxRecordsPerBatch: rows per pandas batch handed to the model


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """A local[2] Spark session bound to 127.0.0.1, whose Python workers log every model load to a file."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("the Spark test needs Java 17: make system (apt-get install openjdk-17-jre-headless)")
    from pyspark.sql import SparkSession

    log = tmp_path_factory.mktemp("spark") / "loads.jsonl"
    mp = pytest.MonkeyPatch()
    # The executor's Python workers are started by the JVM with this environment (local mode).
    for key, value in {LOAD_LOG_ENV: str(log), "PYSPARK_PYTHON": sys.executable,
                       "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}.items():
        mp.setenv(key, value)
    session = (SparkSession.builder.master("local[2]").appName("ads-relevance-spark-udf")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.sql.shuffle.partitions", str(PARTITIONS))
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(BATCH_ROWS))
               .config(f"spark.executorEnv.{LOAD_LOG_ENV}", str(log))
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session, log
    session.stop()
    mp.undo()


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny mean-pooling model exported with calibration and registered as relevance@champion (sqlite)."""
    root = tmp_path_factory.mktemp("spark-model")
    return {"root": root, "uri": registered_champion(root, ["serving.calibrate=true"])}


def test_spark_udf_scores_like_serving_and_each_worker_reads_the_weights_once(spark, registered, monkeypatch):
    import mlflow
    from pyspark.sql import functions as F

    session, log = spark
    raw = wdc_raw("test", per_category=24)  # 72 rows of the three known scenarios, in the user's own columns
    # What serving scores for these rows (in this process, before the executors log anything).
    reference = score_table(registered["root"] / "export", canonical(raw)).to_pandas()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    user_columns = ("left", "right", "category")  # the export's data.columns: the model carries its mapping
    frame = raw.select(list(user_columns)).to_pandas()
    frame.insert(0, "row", np.arange(len(frame)))
    df = session.createDataFrame(frame).repartition(PARTITIONS)  # round robin: every partition has rows
    udf = mlflow.pyfunc.spark_udf(session, "models:/relevance@champion", env_manager="local")
    scored = df.withColumn("prediction", udf(*[F.col(c) for c in user_columns]))
    got = scored.select("row", "prediction.*").toPandas().sort_values("row").reset_index(drop=True)

    assert len(got) == len(frame)
    for column in ("score", "score_raw", "score_calibrated"):
        np.testing.assert_allclose(got[column].to_numpy(np.float64), reference[column].to_numpy(np.float64),
                                   atol=1e-6, rtol=0)
    assert (got["decision"].to_numpy() == reference["decision"].to_numpy()).all()
    assert set(got["model_version"]) == {"relevance/1"}

    events = [json.loads(line) for line in log.read_text().splitlines()]
    executor = [e for e in events if e["pid"] != os.getpid()]
    weights = Counter(e["pid"] for e in executor if e["event"] == "model_loaded")
    pyfuncs = [e for e in executor if e["event"] == "pyfunc_loaded"]
    batches = [e for e in executor if e["event"] == "predict"]
    assert sum(e["rows"] for e in batches) == len(frame)
    assert len(batches) >= len(frame) // BATCH_ROWS  # the model saw many Arrow batches ...
    assert len(pyfuncs) >= PARTITIONS  # ... MLflow loaded the pyfunc for every task ...
    # ... and each Python worker (local[2]: at most two) read the weights exactly once.
    assert 1 <= len(weights) <= 2 and set(weights.values()) == {1}, weights
