"""The new-market benchmark's datasets, cut from one prepared WDC folder (``benchmarks.quality_data``).

    base = known_markets(wdc, out, holdout="cameras")                 # train/valid of the other three
    new = new_market(wdc, out, holdout="cameras", k=100, seed=0)      # k labelled rows of cameras, its valid
    full = all_markets(wdc, out, holdout="cameras", k=100, seed=0)    # the three in full + those k rows
    day1, day2 = nightly_days(wdc, out, seed=0)                       # the training rows split into two "days"

Each is an ingested-data folder (train.parquet, valid.parquet, task_map.json) that ``training.trainer``
reads. The k new rows are the first k of a permutation of the held-out market's training rows drawn from the
seed: the k = 100 rows are among the k = 300 rows, which are among the k = 1000 rows, and seeds differ in
which rows they draw (so the spread over seeds includes which rows a market happened to label). A new
market's validation is its own validation split (capped by the trainer like every other); the known
markets' data is not read by a new-market run at all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kernel.atomic import atomic_path
from kernel.task_map import TASK_MAP_FILE, TaskMap


def _scenario(table: pa.Table, names: list[str]) -> pa.Table:
    return table.filter(pc.is_in(table["scenario"], value_set=pa.array(names, pa.string())))


def _write(out: Path, train: pa.Table, valid: pa.Table, names: list[str]) -> Path:
    """An ingested-data folder (written once: a finished folder is reused, its task map written last)."""
    if (out / TASK_MAP_FILE).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for split, table in (("train", train), ("valid", valid)):
        with atomic_path(out / f"{split}.parquet") as tmp:
            pq.write_table(table, tmp)
    TaskMap(names).save(out / TASK_MAP_FILE)
    return out


def scenarios(wdc: Path) -> list[str]:
    return TaskMap.load(wdc / TASK_MAP_FILE).names


def new_rows(wdc: Path, holdout: str, k: int, seed: int) -> pa.Table:
    """The first k rows of a seeded permutation of ``holdout``'s training rows (nested in k)."""
    rows = _scenario(pq.read_table(wdc / "train.parquet"), [holdout])
    if k > rows.num_rows:
        raise ValueError(f"{holdout}: {rows.num_rows} training rows, fewer than k = {k}")
    order = np.random.default_rng([seed, 7919]).permutation(rows.num_rows)
    return rows.take(np.sort(order[:k]))


def known_markets(wdc: Path, out: Path, holdout: str) -> Path:
    """Every market but ``holdout``: its train and valid rows, task map in the prepared order."""
    names = [s for s in scenarios(wdc) if s != holdout]
    return _write(out, _scenario(pq.read_table(wdc / "train.parquet"), names),
                  _scenario(pq.read_table(wdc / "valid.parquet"), names), names)


def new_market(wdc: Path, out: Path, holdout: str, k: int, seed: int) -> Path:
    """Only the new market: its k labelled rows, its validation split."""
    return _write(out, new_rows(wdc, holdout, k, seed), _scenario(pq.read_table(wdc / "valid.parquet"), [holdout]),
                  [holdout])


def all_markets(wdc: Path, out: Path, holdout: str, k: int, seed: int) -> Path:
    """The reference's data: the known markets in full and the new market's k rows; every market's valid."""
    names = scenarios(wdc)
    known = _scenario(pq.read_table(wdc / "train.parquet"), [s for s in names if s != holdout])
    train = pa.concat_tables([known, new_rows(wdc, holdout, k, seed)])
    return _write(out, train, pq.read_table(wdc / "valid.parquet"), names)


def nightly_days(wdc: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """Two "days" of data: every market's training rows split in two halves by a seeded draw; each day
    validates on the whole validation split."""
    train = pq.read_table(wdc / "train.parquet")
    day = np.random.default_rng([seed, 104729]).permutation(train.num_rows) % 2
    names, valid = scenarios(wdc), pq.read_table(wdc / "valid.parquet")
    return tuple(_write(out / f"day{d + 1}", train.filter(pa.array(day == d)), valid, names) for d in (0, 1))
