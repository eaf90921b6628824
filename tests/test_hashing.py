"""kernel.hashing's digests (files, bytes, JSON), each recomputed here with hashlib."""
from __future__ import annotations

import hashlib
import json

from kernel.hashing import bytes_digest, fingerprint_files, fingerprint_files_and_each, json_digest


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


def test_bytes_and_json_digests_are_sha256_of_the_bytes_and_of_the_sorted_json():
    assert bytes_digest(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert bytes_digest("é", 12) == hashlib.sha256("é".encode()).hexdigest()[:12]
    parts = (bytes([i]) * 1000 for i in range(5))  # consumed one part at a time
    assert bytes_digest(parts, 16) == hashlib.sha256(b"".join(bytes([i]) * 1000 for i in range(5))).hexdigest()[:16]
    a, b = {"b": [1, {"y": 2, "x": None}], "a": "t"}, {"a": "t", "b": [1, {"x": None, "y": 2}]}
    expected = hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest()
    assert json_digest(a) == json_digest(b) == expected and json_digest(a, 16) == expected[:16]
    assert json_digest({"a": "t"}) != json_digest({"a": "u"})
