"""The environment refusing is not a bug: a file-size limit (``ulimit -f``) mid-job and an output folder the
user may not write are exit 8 in one line naming the path, with the --resume hint where the work can go on.
(A Ray actor killed mid-job: tests/test_score_ray.py; the error mapping itself: tests/test_exit_codes.py.)"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import stat
import subprocess
import sys

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from serving.scoring.cli import main
from tests.serving_testkit import SCENARIOS, export, trained_folder, wdc_raw
from tests.shared import REPO, log_messages

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("env-model")
    export(trained_folder(root, "cls"), root / "export")
    return root


def as_a_user():
    """preexec_fn: file permissions apply to the child even as root. A root process keeps the capabilities
    of its bounding set across exec; without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH a chmod binds it as it
    binds any user. (Not root: nothing to give up.)"""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def cli(module: str, args: list[str], preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec)


def test_a_file_size_limit_mid_job_is_8_naming_the_file_and_resume_finishes(tmp_path, model):
    # Row groups of 2, 2 and 60 rows: one unit each. The limit lets the small units' files through, not
    # the large one's (its size is measured on an unlimited run first).
    raw = wdc_raw(per_category=22, categories=SCENARIOS)
    with pq.ParquetWriter(tmp_path / "in.parquet", raw.schema) as w:
        for start, n in ((0, 2), (2, 2), (4, 60)):
            w.write_table(raw.slice(start, n))
    args = ["--model", str(model / "export"), "--input", str(tmp_path / "in.parquet"), "--quiet",
            "serving.unit_rows=2"]
    assert main(args + ["--output", str(tmp_path / "free")]) == 0
    sizes = sorted(p.stat().st_size for p in (tmp_path / "free").glob("part-*.parquet"))
    limit = (sizes[1] + sizes[2]) // 2
    assert sizes[1] < limit < sizes[2]

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "scores"
    run = cli("serving.score", args + ["--output", str(out)], preexec=limited)
    assert run.returncode == 8, run.stderr[-3000:]
    lines = [m for m in log_messages(run.stderr) if m.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert lines[0].startswith("error: resource unavailable: file too large (a file-size limit such as ulimit -f) "
                               f"writing {out / 'part-00000-0002-in.parquet'}"), lines[0]
    assert lines[0].endswith("rerun the same command with --resume")
    finished = {p.name: json.loads(p.read_text())["pid"] for p in (out / "_done").glob("*.json")}
    assert sorted(finished) == ["part-00000-0000-in.json", "part-00000-0001-in.json"]
    assert not list(out.rglob(".part-*"))  # the failed unit's temporary is gone
    assert main(args + ["--output", str(out), "--resume"]) == 0
    assert {n: json.loads((out / "_done" / n).read_text())["pid"] for n in finished} == finished  # not redone
    t = ds.dataset(out, format="parquet").to_table()
    assert sorted(t["source_row"].to_pylist()) == list(range(64))


def test_an_output_the_user_may_not_write_is_8_before_any_work(tmp_path, model):
    """A chmod'd read-only folder: scoring and export stop before they load or fetch anything."""
    pq.write_table(wdc_raw(per_category=2), tmp_path / "in.parquet")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        score = cli("serving.score", ["--model", str(model / "export"), "--input", str(tmp_path / "in.parquet"),
                                      "--output", str(locked / "scores")], preexec=as_a_user)
        exported = cli("serving.export", ["--run", str(model / "model"), "--out", str(locked / "export")],
                       preexec=as_a_user)
    finally:
        locked.chmod(0o755)
    for run, flag, path in ((score, "--output", locked / "scores"), (exported, "--out", locked / "export")):
        assert run.returncode == 8, run.stderr[-3000:]
        lines = [m for m in log_messages(run.stderr) if m.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert lines[0].startswith(f"error: resource unavailable: {flag} {path}: permission denied (cannot write "
                                   f"in {locked})"), lines[0]
    assert not list(locked.iterdir())
    assert "--resume" in score.stderr and "--resume" not in exported.stderr  # export has no resume

