"""kernel.hashing.fingerprint_files: sha256 over each file's name and bytes, recomputed here with hashlib."""
from __future__ import annotations

import hashlib

from kernel.hashing import fingerprint_files, fingerprint_files_and_each


def _direct(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def test_one_read_gives_the_whole_fingerprint_and_each_file_s(tmp_path):
    paths = []
    for name, size in (("train.parquet", 3 << 20), ("valid.parquet", 1000), ("empty.parquet", 0)):
        p = tmp_path / name
        p.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))  # spans several 1 MiB chunks
        paths.append(p)
    whole, each = fingerprint_files_and_each(paths)
    assert whole == fingerprint_files(paths) == _direct(paths)
    assert each == [_direct([p]) for p in paths] == [fingerprint_files([p]) for p in paths]
    assert len(set(each)) == 3 and whole not in each
