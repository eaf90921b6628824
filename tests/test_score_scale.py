"""The 10M-row scale check (benchmarks.score_scale) at a size CI runs: real ``serving.score`` processes, a
SIGKILL of the whole job mid-run, ``--resume``, and both outputs checked row by row against the inputs."""
from __future__ import annotations

import json

from benchmarks.score_scale import main


def test_killed_and_resumed_scoring_equals_the_uninterrupted_run_row_for_row(tmp_path):
    work = tmp_path / "scale"
    assert main(["--rows", "2000", "--file-rows", "500", "--work", str(work)]) == 0
    res = json.loads((work / "results.json").read_text())
    run, kill, compare = res["run-2000"], res["kill-2000"], res["compare-2000"]
    assert run["rc"] == 0 and run["peak_rss_mib"] > 0
    assert kill["units"] == 4 and kill["units_done_at_kill"] < kill["units"]  # killed before the end
    assert compare["rows"] == 2000 and compare["quarantined"] == 0
    assert compare["equal"] and compare["clean_digest"] == compare["resumed_digest"]
