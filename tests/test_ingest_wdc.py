"""The real WDC products data read as a user's data: left -> query, right -> ad title, category -> scenario."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kernel.config import config_from_dict
from pipeline.ingest import read_validated, run_ingest
from pipeline.split import SPLITS
from tests.shared import WDC

MAPPING = {"query": "left", "title": "right", "description": None, "url": None, "scenario": "category"}


def wdc_cfg(**data):
    return config_from_dict({"data": {"columns": MAPPING, **data}})


def test_wdc_products_ingest_through_the_column_mapping(tmp_path):
    files = sorted(WDC.glob("*/*.parquet"))
    assert len(files) == 12, f"expected the WDC products data under {WDC}"
    raw = pa.concat_tables([pq.read_table(f) for f in files])
    report = run_ingest(wdc_cfg(), WDC, tmp_path / "out")

    assert report.rows_in == raw.num_rows
    assert report.rows_accepted + report.rows_quarantined == report.rows_in
    assert report.scenarios == sorted(set(raw["category"].to_pylist()))
    assert set(report.by_reason) <= {"duplicate", "conflicting_label"}  # the data itself is clean
    splits = {s: pq.read_table(tmp_path / "out" / f"{s}.parquet") for s in SPLITS}
    seen: dict[str, str] = {}
    for name, table in splits.items():
        for q in set(table["query"].to_pylist()):
            assert seen.setdefault(q, name) == name  # the original WDC split shares queries; ours does not
    accepted = pa.concat_tables(splits.values())
    assert accepted.num_rows == report.rows_accepted
    for scenario, s in report.by_scenario.items():
        rows = accepted.filter(pc.equal(accepted["scenario"], scenario))
        assert s["rows"] == rows.num_rows
        assert abs(s["positive_rate"] - float(np.mean(rows["label"].to_numpy()))) < 1e-6
        assert 0.1 < s["positive_rate"] < 0.4
    # Each accepted row is the raw row it came from: text and label carried over unchanged.
    sample = accepted.slice(0, 200).to_pylist()
    tables = {str(f.resolve()): pq.read_table(f) for f in files}  # source_file: the resolved path
    for row in sample:
        src = tables[row["source_file"]].slice(row["source_row"], 1).to_pylist()[0]
        assert (src["left"], src["right"], src["label"], src["category"]) == (
            row["query"], row["title"], row["label"], row["scenario"])


def test_wdc_products_stream_for_scoring_with_a_scenario_list(tmp_path):
    cameras = WDC / "cameras" / "test.parquet"
    n = pq.read_metadata(cameras).num_rows
    pairs = list(read_validated(wdc_cfg(batch_rows=256), cameras, scenarios=["cameras"]))
    assert len(pairs) > 1  # streamed in several batches
    assert sum(a.num_rows for a, _ in pairs) == n and sum(q.num_rows for _, q in pairs) == 0
    pairs = list(read_validated(wdc_cfg(), cameras, scenarios=["shoes"]))
    quarantined = pa.Table.from_batches([q for _, q in pairs])
    assert quarantined.num_rows == n and set(quarantined["reason"].to_pylist()) == {"unknown_scenario"}
