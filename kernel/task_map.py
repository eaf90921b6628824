"""The scenario -> task-id map. Ingestion writes it once (``<data>/task_map.json``); every later stage
reads that file, and the trained-model folder and the export carry byte-for-byte copies of it.

    tm = TaskMap(["cameras", "computers"]);  tm.id_of("computers") == 1
    tm.ids(pa.array(["cameras", "computers"]))  -> np.array([0, 1])
    tm = TaskMap.load(data_dir / TASK_MAP_FILE);  tm.save(model_dir / TASK_MAP_FILE)   # a copy of that file
    grown = tm.extended(["shoes", "cameras"])   # ["cameras", "computers", "shoes"]: append-only, ids kept
    grown.check_extends(tm, "the trained model")  # DataError if grown reorders or drops tm's scenarios

A model's task map travels with it (trained-model folder, export). A warm-started model extends its starting
model's map: known scenarios keep their ids, new ones are appended in the order given; nothing is ever
reordered or removed, so a scenario id means the same thing in every version of a model.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernel import storage
from kernel.errors import DataError, UnknownScenario

TASK_MAP_FILE = "task_map.json"


class TaskMap:
    def __init__(self, names: Sequence[str], source: str | Path | None = None):
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate scenario names in {list(names)}")
        self.names = list(names)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.source = source  # the file it was read from, if any

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskMap) and other.names == self.names

    def id_of(self, name: str) -> int:
        if name not in self._index:
            raise UnknownScenario(f"scenario {name!r} is not one of the model's scenarios {self.names}")
        return self._index[name]

    def ids(self, scenarios: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
        """Vectorised lookup; raises UnknownScenario naming the first unknown scenarios."""
        arr = scenarios if isinstance(scenarios, (pa.Array, pa.ChunkedArray)) else pa.array(scenarios, pa.string())
        idx = pc.index_in(arr, value_set=pa.array(self.names, pa.string()))
        if idx.null_count:
            unknown = pc.unique(pc.filter(arr, pc.is_null(idx))).to_pylist()
            raise UnknownScenario(f"scenarios {unknown[:10]} are not among the model's scenarios {self.names}")
        return idx.to_numpy(zero_copy_only=False).astype(np.int64)

    def extended(self, names: Sequence[str]) -> "TaskMap":
        """This map with the scenarios of ``names`` it lacks appended (in ``names``' order); ids never move."""
        new = [n for n in dict.fromkeys(names) if n not in self._index]
        return self if not new else TaskMap(self.names + new)

    def check_extends(self, old: "TaskMap", what: str) -> None:
        """DataError unless this map is ``old`` followed by zero or more new scenarios (``what``: whose old map)."""
        if self.names[:len(old)] != old.names:
            moved = [f"{n!r}: {i} -> {self._index.get(n, 'removed')}" for i, n in enumerate(old.names)
                     if self._index.get(n) != i]
            raise DataError(f"task map {self.names} does not extend the task map of {what} {old.names}: scenario "
                            f"ids would change meaning ({', '.join(moved)}); a task map is only ever appended to")

    def save(self, path: str | Path) -> None:
        """Write the map; a map read from a file is copied as it is (the file ingestion wrote stays the one)."""
        data = (storage.read_bytes(self.source) if self.source is not None
                else json.dumps({"scenarios": self.names}, indent=2).encode())
        storage.write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "TaskMap":
        """Read a task map file; DataError names the file when it is missing or malformed."""
        d = storage.read_json(path, "task map")
        if not isinstance(d, dict) or not isinstance(d.get("scenarios"), list):
            raise DataError(f"{path}: a task map needs a list under 'scenarios'")
        return cls(d["scenarios"], source=path)
