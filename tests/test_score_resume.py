"""A scoring job killed with SIGKILL in the middle of a file (some of its units done, others not) and resumed
yields exactly one score per input row, equal to an uninterrupted run; units finished before the kill are not
redone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from serving.scoring.cli import main
from tests.serving_testkit import SCENARIOS, export, trained_folder, wdc_raw
from tests.shared import REPO

FILES = 2
GROUP_ROWS = 6  # rows per row group
UNITS_PER_FILE = 10  # 60 rows per file, serving.unit_rows=6: one row group per unit


def scores(out: Path):
    t = ds.dataset(out, format="parquet").to_table()
    return t.sort_by([("source_file", "ascending"), ("source_row", "ascending")])


def test_sigkill_then_resume_scores_each_row_exactly_once(tmp_path):
    model_dir = trained_folder(tmp_path, "cls")
    export_dir = tmp_path / "export"
    export(model_dir, export_dir)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(FILES):
        pq.write_table(wdc_raw(per_category=20, categories=SCENARIOS, offset=20 * i), inputs / f"h{i}.parquet",
                       row_group_size=GROUP_ROWS)
    rows_in = FILES * 20 * len(SCENARIOS)
    args = ["--model", str(export_dir), "--input", str(inputs), "--quiet", "serving.chunk_rows=8",
            "serving.batch_size=4", f"serving.unit_rows={GROUP_ROWS}"]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "serving.score", *args, "--output", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((out / "_done").glob("*.json"))) < 2:
        time.sleep(0.01)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    finished = sorted((out / "_done").glob("*.json"))
    done = [json.loads(p.read_text()) for p in finished]
    # Killed mid-file: the first file has finished units and unfinished ones.
    assert {m["file"] for m in done} == {0} and 2 <= len(done) < UNITS_PER_FILE, [p.name for p in finished]
    outputs = [out / f"part-00000-{m['unit']:04d}-h0.parquet" for m in done]
    stamps = {p.name: p.stat().st_mtime_ns for p in finished + outputs}

    assert main(args + ["--output", str(out), "--resume"]) == 0
    # Finished units were skipped: their markers and outputs are the ones written before the kill.
    assert {p.name: p.stat().st_mtime_ns for p in finished + outputs} == stamps
    assert {json.loads(p.read_text())["pid"] for p in finished} == {proc.pid}
    assert len(list((out / "_done").glob("*.json"))) == FILES * UNITS_PER_FILE
    assert not list(out.rglob(".part-*"))  # no temporary left behind
    resumed = scores(out)
    keys = list(zip(resumed["source_file"].to_pylist(), resumed["source_row"].to_pylist()))
    assert len(keys) == len(set(keys)) == rows_in

    assert main(args + ["--output", str(tmp_path / "clean")]) == 0
    clean = scores(tmp_path / "clean")
    assert clean.drop_columns(["score"]).equals(resumed.drop_columns(["score"]))
    np.testing.assert_allclose(clean["score"].to_numpy(), resumed["score"].to_numpy(), atol=1e-6, rtol=0)
