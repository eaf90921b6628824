"""Outputs appear whole or not at all: write under a temporary name, then rename. The one implementation of
atomic publication in the project, for files and for folders.

    with atomic_path(out / "stats.json") as tmp:       # tmp sits next to the target, same filesystem
        tmp.write_text(...)                              # on error tmp is removed, the target untouched
    write_json_atomic(out / "stats.json", stats)

    f = AtomicFile(out / "part-00003.parquet")           # a file written over many calls (a streamed shard)
    ... write to f.tmp ...;  f.commit()  (or f.abort())

    with staging_dir(out_dir) as stage:                  # a hidden sibling folder of out_dir
        ... write several files into stage ...
        publish(stage, out_dir, ["train.parquet", "stats.json"])   # renamed in order; last one = done marker
        publish_dir(stage, out_dir)                      # or: the whole folder replaces out_dir

Temporary names start with "." and hold ".tmp" or ".staging", so readers that skip hidden files never see
them and a crashed writer's leftovers are easy to find.
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


class AtomicFile:
    """A file written under a temporary name beside ``final``; ``commit`` renames it onto ``final``."""

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp_name(self.final, "tmp")

    def commit(self) -> Path:
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``, on error delete it."""
    f = AtomicFile(path)
    try:
        yield f.tmp
        f.commit()
    except BaseException:
        f.abort()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | Path, obj: object) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return Path(path)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: str | Path) -> None:
    """Give every file under ``root`` (or ``root`` itself) the mode the umask allows: 0666 & ~umask (0777 for
    executables). safetensors and the writers built on it create files 0600 whatever the umask, which would
    keep another service account from reading a shared model."""
    mask, root = current_umask(), Path(root)
    for p in [root] if root.is_file() else root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            full = 0o777 if p.stat().st_mode & 0o111 else 0o666
            os.chmod(p, full & ~mask)


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


def publish_dir(stage: Path, final_dir: str | Path, replace: bool = True) -> bool:
    """Put the finished folder ``stage`` at ``final_dir`` by renames; True when it took its place.

    replace=True: an existing ``final_dir`` is renamed aside first and removed after, so readers see the old
    folder or the new one, never a mix. replace=False: an existing ``final_dir`` (another writer finished
    the same content first) wins, and ``stage`` is discarded.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    honour_umask(stage)
    if final.exists() and not replace:
        shutil.rmtree(stage, ignore_errors=True)
        return False
    old = _tmp_name(final, "old") if final.exists() else None
    if old is not None:
        final.rename(old)
    try:
        Path(stage).rename(final)
    except OSError:
        if old is not None and not final.exists():
            old.rename(final)  # put the old one back: never leave nothing
        if not replace and final.exists():  # lost a race to a concurrent writer of the same content
            shutil.rmtree(stage, ignore_errors=True)
            return False
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def publish(stage: Path, final_dir: str | Path, names: Sequence[str]) -> list[Path]:
    """Move ``names`` from the staging folder into ``final_dir`` (each by an atomic rename), in order."""
    final = Path(final_dir)
    final.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        os.replace(stage / name, final / name)
        out.append(final / name)
    return out
