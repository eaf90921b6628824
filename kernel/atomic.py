"""Outputs appear whole or not at all: write under a temporary name, then rename.

    with atomic_path(out / "stats.json") as tmp:       # tmp sits next to the target, same filesystem
        tmp.write_text(...)                              # on error tmp is removed, the target untouched
    write_json_atomic(out / "stats.json", stats)


    with staging_dir(out_dir) as stage:                  # a hidden sibling folder of out_dir
        ... write several files into stage ...
        publish(stage, out_dir, ["train.parquet", "stats.json"])   # renamed in order; last one = done marker
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def _tmp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``, on error delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: object) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return Path(path)


def read_json(path: str | Path, what: str) -> object:
    """Parse a JSON file; a missing or malformed file raises DataError naming the path and ``what`` it is."""
    from kernel.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: {what} is not valid JSON ({e})") from e


@contextmanager
def staging_dir(final_dir: str | Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``final_dir``; always removed on exit (published files moved out first)."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = _tmp_name(final, "staging")
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, final_dir: str | Path, names: Sequence[str]) -> list[Path]:
    """Move ``names`` from the staging folder into ``final_dir`` (each by an atomic rename), in order."""
    final = Path(final_dir)
    final.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        os.replace(stage / name, final / name)
        out.append(final / name)
    return out
