"""Per-scenario statistics of an ingest run, accumulated batch by batch in fixed memory.

    stats = IngestStats(max_chars=1000)
    stats.add_quarantined(quarantined_batch)          # reason codes, per scenario
    stats.add_accepted(accepted_table, split_codes)   # rows, positives, splits, text-length histograms
    stats.to_dict()   # -> stats.json; text-length quantiles are exact (from integer histograms)

Text lengths are counted in characters and never exceed ``max_chars`` once validated, so a histogram of
``max_chars + 1`` bins per scenario and field gives exact quantiles without keeping any rows.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernel.metric_names import SOURCE, metric_name
from pipeline.split import SPLITS

LENGTH_FIELDS = ("query", "title", "description")
QUANTILES = (0.05, 0.5, 0.95, 0.99)
NULL_SCENARIO = "(null)"
MAX_EXAMPLES = 10


class _Scenario:
    def __init__(self, max_chars: int):
        self.rows = 0
        self.positives = 0
        self.truncated = 0
        self.splits = np.zeros(len(SPLITS), dtype=np.int64)
        self.lengths = {f: np.zeros(max_chars + 1, dtype=np.int64) for f in LENGTH_FIELDS}
        self.quarantined: Counter[str] = Counter()


def _dictionary(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """(index per row, distinct values); nulls become NULL_SCENARIO."""
    arr = pc.fill_null(values, NULL_SCENARIO)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    enc = pc.dictionary_encode(arr)
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()


def _quantiles(hist: np.ndarray) -> dict[str, float]:
    total = int(hist.sum())
    if total == 0:
        return {}
    cdf = np.cumsum(hist)
    out = {f"p{round(q * 100):02d}": int(np.searchsorted(cdf, q * total)) for q in QUANTILES}
    out["max"] = int(np.flatnonzero(hist)[-1])
    out["mean"] = round(float((hist * np.arange(len(hist))).sum() / total), 2)
    return out


class IngestStats:
    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.rows_in = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: list[dict] = []
        self._scenarios: dict[str, _Scenario] = {}

    def _scenario(self, name: str) -> _Scenario:
        if name not in self._scenarios:
            self._scenarios[name] = _Scenario(self.max_chars)
        return self._scenarios[name]

    def add_quarantined(self, q: pa.RecordBatch | pa.Table) -> None:
        if q.num_rows == 0:
            return
        if len(self.examples) < MAX_EXAMPLES:  # {file, row, reason, column}: column "" when no single one
            cols = [c for c in ("source_file", "source_row", "reason", "column") if c in q.schema.names]
            head = q.slice(0, MAX_EXAMPLES - len(self.examples)).select(cols)
            self.examples += [{"file": r["source_file"], "row": r["source_row"], "reason": r["reason"],
                               "column": r.get("column") or ""} for r in head.to_pylist()]
        idx, names = _dictionary(q.column("scenario"))
        r_idx, reasons = _dictionary(q.column("reason"))
        counts = np.bincount(idx * len(reasons) + r_idx, minlength=len(names) * len(reasons))
        for (i, j) in zip(*np.nonzero(counts.reshape(len(names), len(reasons)))):
            n = int(counts[i * len(reasons) + j])
            self._scenario(names[i]).quarantined[reasons[j]] += n
            self.by_reason[reasons[j]] += n

    def add_accepted(self, t: pa.Table, split_codes: np.ndarray) -> None:
        """``t``: accepted canonical rows; ``split_codes``: int8 per row (0 train, 1 valid, 2 test)."""
        if t.num_rows == 0:
            return
        idx, names = _dictionary(t.column("scenario"))
        k, width = len(names), self.max_chars + 1
        rows = np.bincount(idx, minlength=k)
        label = pc.fill_null(t.column("label"), 0).to_numpy().astype(np.int64)
        positives = np.bincount(idx, weights=label, minlength=k)
        truncated = np.bincount(idx, weights=t.column("truncated").to_numpy().astype(np.int64), minlength=k)
        splits = np.bincount(idx * len(SPLITS) + split_codes, minlength=k * len(SPLITS)).reshape(k, len(SPLITS))
        hists = {}
        for f in LENGTH_FIELDS:
            lengths = np.minimum(pc.utf8_length(t.column(f)).to_numpy().astype(np.int64), self.max_chars)
            hists[f] = np.bincount(idx * width + lengths, minlength=k * width).reshape(k, width)
        for i, name in enumerate(names):
            s = self._scenario(name)
            s.rows += int(rows[i])
            s.positives += int(positives[i])
            s.truncated += int(truncated[i])
            s.splits += splits[i]
            for f in LENGTH_FIELDS:
                s.lengths[f] += hists[f][i]

    def to_dict(self) -> dict:
        by_scenario = {}
        for name in sorted(self._scenarios):
            s = self._scenarios[name]
            by_scenario[name] = {
                "rows": s.rows,
                "positives": s.positives,
                "positive_rate": round(s.positives / s.rows, 6) if s.rows else None,
                "splits": dict(zip(SPLITS, map(int, s.splits))),
                "truncated": s.truncated,
                "quarantined": sum(s.quarantined.values()),
                "quarantined_by_reason": dict(sorted(s.quarantined.items())),
                "text_chars": {f: _quantiles(s.lengths[f]) for f in LENGTH_FIELDS},
            }
        accepted = sum(s["rows"] for s in by_scenario.values())
        quarantined = sum(self.by_reason.values())
        return {
            "rows_in": self.rows_in,
            "rows_accepted": accepted,
            "rows_quarantined": quarantined,
            "reject_rate": round(quarantined / self.rows_in, 6) if self.rows_in else 0.0,
            "by_reason": dict(sorted(self.by_reason.items())),
            "splits": {sp: sum(s["splits"][sp] for s in by_scenario.values()) for sp in SPLITS},
            "truncated_rows": sum(s["truncated"] for s in by_scenario.values()),
            "by_scenario": by_scenario,
            "quarantine_examples": self.examples,
        }

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a tracker, named by their data (kernel.metric_names): ``source/rows_in``,
        ``source/positive_rate/us``, ..."""
        d = self.to_dict()
        out = {metric_name(SOURCE, k): float(d[k]) for k in ("rows_in", "rows_accepted", "rows_quarantined",
                                                              "reject_rate")}
        for name, s in d["by_scenario"].items():
            out[metric_name(SOURCE, "rows", name)] = float(s["rows"])
            out[metric_name(SOURCE, "quarantined", name)] = float(s["quarantined"])
            if s["positive_rate"] is not None:
                out[metric_name(SOURCE, "positive_rate", name)] = float(s["positive_rate"])
        return out
