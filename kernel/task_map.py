"""The scenario -> task-id map: fixed at training, saved with the model, reused at scoring.

    tm = TaskMap(["cameras", "computers"]);  tm.id_of("computers") == 1
    tm.ids(pa.array(["cameras", "computers"]))  -> np.array([0, 1])
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernel.errors import UnknownScenario


class TaskMap:
    def __init__(self, names: Sequence[str]):
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate scenario names in {list(names)}")
        self.names = list(names)
        self._index = {n: i for i, n in enumerate(self.names)}

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

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"scenarios": self.names}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "TaskMap":
        return cls(json.loads(Path(path).read_text())["scenarios"])
