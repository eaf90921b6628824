"""The quality benchmark's datasets (``benchmarks.quality``): each prepared once into train/valid/test Parquet.

``wdc`` is ``<repo root>/../shared/data/wdc_products`` (four product categories, each a scenario), read through
the ingestion column mapping (left -> query, right -> title, category -> scenario) with its own
train/valid/test files kept as the splits; valid/test pairs that also occur in train are dropped, so no
evaluated pair was trained on. ``synthetic`` is the demo generator's four markets (``data.synthetic``),
ingested with the config's hash split. A grid cell ``synthetic-c<conflict>-i<imbalance>`` is the generator
with those two dials (``pipeline.synthetic``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from kernel.atomic import atomic_path, write_json_atomic
from kernel.config import Config, load_config
from kernel.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WDC_ROOT = ROOT.parent / "shared" / "data" / "wdc_products"
DATASETS = ("wdc", "synthetic")
WDC_COLUMNS = ["data.columns.query=left", "data.columns.title=right", "data.columns.description=null",
               "data.columns.url=null", "data.columns.scenario=category", "data.columns.label=label"]


def prepare_wdc(cfg: Config, root: Path, out: Path) -> dict:
    """Ingest each of root's train/valid/test splits (all categories together) through the column mapping.

    Each split is its own ingest with split fractions 0, so every accepted row stays in its given split;
    each split is then put in a stable pseudo-random order (by a hash of the pair).
    Returns the counts per split: rows in, accepted, quarantined, and pairs dropped as seen in train.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from kernel.hashing import stable_hash
    from kernel.task_map import TASK_MAP_FILE, TaskMap
    from pipeline.ingest import run_ingest
    from pipeline.split import SPLITS

    files = {s: sorted(root.glob(f"*/{s}.parquet")) for s in SPLITS}
    if not all(files.values()):
        raise ConfigError(f"{root}: expected <category>/{{train,valid,test}}.parquet files")
    single = load_config(None, [*WDC_COLUMNS, "data.split.valid_fraction=0", "data.split.test_fraction=0"])
    single.data.scenarios = list(cfg.data.scenarios)
    tables, info = {}, {}
    for split in SPLITS:
        with tempfile.TemporaryDirectory(prefix=f"wdc-{split}-") as tmp:
            src = Path(tmp) / "src"
            src.mkdir()
            for f in files[split]:  # <category>.parquet links, so one ingest dedupes across categories
                (src / f"{f.parent.name}.parquet").symlink_to(f.resolve())
            report = run_ingest(single, src, Path(tmp) / "ingested")
            table = pq.read_table(Path(tmp) / "ingested" / "train.parquet")
        real = [str(root / Path(p).stem / f"{split}.parquet") for p in table["source_file"].to_pylist()]
        tables[split] = table.set_column(table.schema.get_field_index("source_file"), "source_file",
                                         pa.array(real, type=table.schema.field("source_file").type))
        info[split] = {"rows_in": report.rows_in, "accepted": report.rows_accepted,
                       "quarantined": report.rows_quarantined, "by_reason": report.by_reason}
    seen = pair_keys(tables["train"])
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        table = tables[split]
        if split != "train":
            keep = pc.invert(pc.is_in(pair_keys(table), value_set=seen))
            info[split]["dropped_seen_in_train"] = table.num_rows - pc.sum(keep.cast("int64")).as_py()
            table = table.filter(keep)
        # Categories arrive one after another; a stable shuffle lets a capped validation see all of them.
        table = table.take(np.argsort(stable_hash(pair_keys(table)), kind="stable"))
        with atomic_path(out / f"{split}.parquet") as tmp:
            pq.write_table(table, tmp)
        info[split]["rows"] = table.num_rows
    TaskMap(list(cfg.data.scenarios)).save(out / TASK_MAP_FILE)  # what ingestion writes beside the splits
    return info


def pair_keys(table):
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(table["query"], table["title"], "\x1f")


def prepare_synthetic(cfg: Config, out: Path) -> dict:
    """The demo generator's markets (cfg.data.synthetic), ingested with the config's hash split."""
    from pipeline.ingest import run_ingest
    from pipeline.synthetic import generate

    raw = generate(out.parent / "raw.parquet", cfg.data.synthetic)
    report = run_ingest(cfg, raw, out)
    return {"rows_in": report.rows_in, "accepted": report.rows_accepted, "splits": report.splits}


def grid_cell(conflict: float, imbalance: float) -> str:
    """The dataset name of one cell of the synthetic dials: synthetic-c0.5-i10."""
    return f"synthetic-c{conflict:g}-i{imbalance:g}"


def parse_grid_cell(dataset: str) -> tuple[float, float] | None:
    """(conflict, imbalance) of a grid-cell dataset name, None for any other dataset."""
    if not dataset.startswith("synthetic-c") or "-i" not in dataset:
        return None
    c, i = dataset[len("synthetic-c"):].split("-i", 1)
    return float(c), float(i)


def dataset_overrides(dataset: str) -> list[str]:
    if dataset == "wdc":
        scenarios = sorted(p.name for p in WDC_ROOT.iterdir() if p.is_dir()) if WDC_ROOT.is_dir() else []
        if not scenarios:
            raise ConfigError(f"dataset wdc: no category folders under {WDC_ROOT}")
        return [*WDC_COLUMNS, f"data.scenarios=[{', '.join(scenarios)}]"]
    cell = parse_grid_cell(dataset)
    if cell is not None:
        return [f"data.synthetic.conflict={cell[0]!r}", f"data.synthetic.imbalance={cell[1]!r}"]
    return []


def prepare(dataset: str, cfg: Config, work: Path) -> Path:
    """The dataset's train/valid/test folder under ``work`` (built once; prepared.json marks it done)."""
    data_dir = work / "data"
    if not (data_dir / "prepared.json").is_file():
        info = prepare_wdc(cfg, WDC_ROOT, data_dir) if dataset == "wdc" else prepare_synthetic(cfg, data_dir)
        write_json_atomic(data_dir / "prepared.json", info)
    return data_dir


def train_rows(data_dir: Path) -> dict[str, int]:
    """Training rows per scenario (after ingestion and the split)."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for s in pq.read_table(data_dir / "train.parquet", columns=["scenario"])["scenario"].to_pylist():
        counts[s] = counts.get(s, 0) + 1
    return dict(sorted(counts.items()))
