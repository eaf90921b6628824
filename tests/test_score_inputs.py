"""Scoring when the inputs change under it or cannot be read: a resume after files were removed or rewritten
keeps only the current inputs' scores; a corrupt data page is quarantined, not a failure of every rerun;
every file's problems are reported at once, before any work (ingest too)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from kernel.config import load_config
from pipeline.ingest import main as ingest_main
from serving.scoring.cli import main
from tests.serving_testkit import SCENARIOS, export, trained_folder, wdc_raw
from tests.shared import TINY_CONFIG

GROUP = 10  # rows per row group; serving.unit_rows=10: one unit per row group


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    export(trained_folder(root, "cls"), root / "export")
    return root / "export"


def write(path, rows_per_category: int, offset: int) -> pa.Table:
    raw = wdc_raw(per_category=rows_per_category, categories=SCENARIOS, offset=offset)
    pq.write_table(raw, path, row_group_size=GROUP)
    return raw


def scored_keys(out) -> list[tuple[str, int]]:
    t = ds.dataset(out, format="parquet").to_table(columns=["source_file", "source_row"])
    return sorted(zip(t["source_file"].to_pylist(), t["source_row"].to_pylist()))


def corrupt_row_group(path, row_group: int) -> None:
    """Overwrite the first data page header of one row group's first column (the footer stays intact)."""
    meta = pq.read_metadata(path)
    col = meta.row_group(row_group).column(0)
    offset = col.dictionary_page_offset or col.data_page_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 24)


def test_a_resume_after_inputs_were_removed_or_rewritten_keeps_only_the_current_inputs(tmp_path, export_dir,
                                                                                         capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate("abc"):
        write(folder / f"{name}.parquet", 10, 10 * i)  # 30 rows each, 3 units
    args = ["--model", str(export_dir), "--input", str(folder), "--quiet", f"serving.unit_rows={GROUP}"]
    out = tmp_path / "scores"
    assert main(args + ["--output", str(out)]) == 0
    assert len(scored_keys(out)) == 90
    capsys.readouterr()
    shutil.move(folder / "b.parquet", tmp_path / "b.parquet")  # b is gone; c moves up in the file order
    write(folder / "a.parquet", 5, 40)  # a is rewritten: other rows, 15 of them
    assert main(args + ["--output", str(out), "--resume"]) == 0
    printed = capsys.readouterr().err  # the result and the notes are log records
    keys = scored_keys(out)
    assert len(keys) == len(set(keys)) == 15 + 30  # rows out == rows in: nothing of b, nothing of the old a
    assert {f.rsplit("/", 1)[-1] for f, _ in keys} == {"a.parquet", "c.parquet"}
    assert f"{folder / 'b.parquet'} (gone)" in printed and f"{folder / 'a.parquet'} (changed)" in printed
    assert "scored 45 of 45 rows" in printed
    assert main(args + ["--output", str(tmp_path / "clean")]) == 0
    clean = ds.dataset(tmp_path / "clean", format="parquet").to_table().sort_by([("source_file", "ascending"),
                                                                                  ("source_row", "ascending")])
    resumed = ds.dataset(out, format="parquet").to_table().sort_by([("source_file", "ascending"),
                                                                   ("source_row", "ascending")])
    assert resumed.drop_columns(["score", "score_raw"]).equals(clean.drop_columns(["score", "score_raw"]))
    np.testing.assert_allclose(resumed["score"].to_numpy(), clean["score"].to_numpy(), atol=1e-6, rtol=0)
    # Markers of another job's input in the same folder (outside this job's inputs) are left alone.
    other = json.loads(next((out / "_done").glob("*.json")).read_text())
    other.update(input=str(tmp_path / "elsewhere" / "z.parquet"))
    (out / "_done" / "part-00007-0000-z.json").write_text(json.dumps(other))
    assert main(args + ["--output", str(out), "--resume"]) == 0
    assert (out / "_done" / "part-00007-0000-z.json").is_file()
    assert "removed" not in capsys.readouterr().err


def test_a_corrupt_data_page_is_quarantined_and_the_rest_of_the_file_scored(tmp_path, export_dir, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate("abc"):
        write(folder / f"{name}.parquet", 20, 20 * i)  # 60 rows each: row groups 0..5
    corrupt_row_group(folder / "b.parquet", 2)  # rows 20..29 of b
    args = ["--model", str(export_dir), "--input", str(folder), "--quiet", f"serving.unit_rows={GROUP}"]
    out = tmp_path / "scores"
    assert main(args + ["--output", str(out), "serving.max_quarantine_rate=0.1"]) == 0  # 10 of 180 rows
    printed = capsys.readouterr().err  # the result and the notes are log records
    keys = scored_keys(out)
    bad = str(folder / "b.parquet")
    assert len(keys) == 170 and [r for f, r in keys if f == bad] == [*range(20), *range(30, 60)]
    quarantine = ds.dataset(out / "_quarantine", format="parquet").to_table()
    assert quarantine["reason"].to_pylist() == ["unreadable"] * 10
    assert quarantine["source_file"].to_pylist() == [bad] * 10 and quarantine["source_row"].to_pylist() == [
        *range(20, 30)]
    assert "scored 170 of 180 rows" in printed and "quarantined: unreadable 10" in printed
    assert f"quarantined unreadable data: {bad} row group 2 (rows 20-29)" in printed
    # A rerun is not a failure either (it resumes: nothing to redo); past the gate it is exit 6.
    assert main(args + ["--output", str(out), "--resume", "serving.max_quarantine_rate=0.1"]) == 0
    assert main(args + ["--output", str(tmp_path / "strict")]) == 6  # default gate: 5%
    assert "serving.max_quarantine_rate" in capsys.readouterr().err


def bad_inputs(folder) -> dict[str, str]:
    """A folder of one good file and three bad ones: a corrupt footer, an int64 query, no title column."""
    folder.mkdir()
    good = wdc_raw(per_category=4)
    pq.write_table(good, folder / "good.parquet")
    (folder / "footer.parquet").write_bytes((folder / "good.parquet").read_bytes()[:-12] + b"\0" * 12)
    pq.write_table(good.set_column(0, "left", pa.array(np.arange(good.num_rows))), folder / "int_query.parquet")
    pq.write_table(good.drop_columns(["right"]), folder / "no_title.parquet")
    return {"footer.parquet": "not a readable Parquet file", "int_query.parquet": "'left' (mapped to query) has type int64",
            "no_title.parquet": "column 'right'"}


def test_every_files_problems_are_reported_at_once(tmp_path, export_dir, capsys):
    expected = bad_inputs(tmp_path / "in")
    out = tmp_path / "scores"
    assert main(["--model", str(export_dir), "--input", str(tmp_path / "in"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "Traceback" not in err
    for name, words in expected.items():
        line = next(x for x in err.splitlines() if name in x)
        assert words in line, (name, err)
    assert not out.exists()  # before any work
    # Ingest, with the same data in its own columns.
    cfg = load_config(TINY_CONFIG, [])
    columns = ["data.columns.query=left", "data.columns.title=right", "data.columns.description=null",
               "data.columns.url=null", "data.columns.scenario=category", f"data.scenarios={list(SCENARIOS)}"]
    assert cfg.data.columns.query != "left"  # the overrides matter
    assert ingest_main(["--config", str(TINY_CONFIG), "--input", str(tmp_path / "in"), "--out",
                        str(tmp_path / "data"), f"work_dir={tmp_path}", "tracking.enabled=false", *columns]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err
    for name, words in expected.items():
        assert any(name in x and words in x for x in err.splitlines()), (name, err)
