"""A scoring job killed with SIGKILL and resumed yields exactly one score per input row, equal to an
uninterrupted run; shards finished before the kill are not redone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from serving.export import export_model
from serving.score import main
from tests.serving_testkit import SCENARIOS, trained_folder, wdc_raw
from tests.shared import REPO

SHARDS = 6


def scores(out: Path):
    t = ds.dataset(out, format="parquet").to_table()
    return t.sort_by([("source_file", "ascending"), ("source_row", "ascending")])


def test_sigkill_then_resume_scores_each_row_exactly_once(tmp_path):
    model_dir = trained_folder(tmp_path, "cls")
    export_dir = tmp_path / "export"
    export_model(str(model_dir), export_dir)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(SHARDS):
        pq.write_table(wdc_raw(per_category=20, categories=SCENARIOS, offset=20 * i), inputs / f"h{i}.parquet")
    rows_in = SHARDS * 20 * len(SCENARIOS)
    args = ["--model", str(export_dir), "--input", str(inputs), "--quiet", "serving.chunk_rows=8",
            "serving.batch_size=4"]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "serving.score", *args, "--output", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((out / "_done").glob("*.json"))) < 1:
        time.sleep(0.01)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    finished = sorted((out / "_done").glob("*.json"))
    assert 1 <= len(finished) < SHARDS
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}

    assert main(args + ["--output", str(out), "--resume"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in finished} == stamps  # finished shards were skipped
    assert not list(out.rglob(".part-*"))  # no temporary left behind
    resumed = scores(out)
    keys = list(zip(resumed["source_file"].to_pylist(), resumed["source_row"].to_pylist()))
    assert len(keys) == len(set(keys)) == rows_in

    assert main(args + ["--output", str(tmp_path / "clean")]) == 0
    clean = scores(tmp_path / "clean")
    assert clean.drop_columns(["score"]).equals(resumed.drop_columns(["score"]))
    np.testing.assert_allclose(clean["score"].to_numpy(), resumed["score"].to_numpy(), atol=1e-6, rtol=0)
