"""Data paths that are local folders or object-store URIs (s3://, gs://, hdfs://, file://), through pyarrow.fs.

    fs, path = resolve("s3://bucket/traffic/")        # (S3FileSystem, "bucket/traffic")
    is_uri("s3://bucket/x"), exists(p), is_dir(p), join(p, "part-0.parquet")
    listing(p)                                         # [(relative path, size, mtime ns)] of every file under p
    write_bytes(p, data); read_bytes(p); write_json(p, obj); read_json(p, "what")
    upload_dir(local_folder, "s3://bucket/export")     # every file, then the commit marker, last
    with output_dir("s3://bucket/report") as d: ...    # write a folder locally; published at the end
    download_dir("s3://bucket/export", local_folder)   # only a committed folder

Credentials and endpoints come from the environment as each store's client expects (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL).

Publication on an object store. A rename there is a copy, not atomic, so the guarantees are kept another
way: one object is written by one PUT (S3 and GCS show a finished upload whole, or nothing), and a folder is
published by uploading its files first and a commit marker (``_COMMITTED``, listing every file and its size)
last. A reader trusts a folder only once its marker is there and every listed file has its size. Local paths
keep the rename-based publication of ``kernel.atomic``.
"""
from __future__ import annotations

import json
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from kernel.atomic import publish, staging_dir, write_bytes_atomic
from kernel.errors import DataError

COMMIT_MARKER = "_COMMITTED"


def is_uri(p: str | Path) -> bool:
    """True for ``scheme://...`` strings other than file:// (which is local)."""
    s = str(p)
    return "://" in s and not s.startswith("file://")


def location(text: str) -> str | Path:
    """A path given on a command line: a URI stays a string (``Path`` would fold ``s3://`` into ``s3:/``),
    anything else becomes a ``Path``. Use it as argparse's ``type=`` for every input or output location."""
    return text if is_uri(text) else Path(text)


def local_path(p: str | Path) -> Path:
    s = str(p)
    return Path(s[len("file://"):]) if s.startswith("file://") else Path(s)


def resolve(p: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; DataError names a URI no store handles."""
    if not is_uri(p):
        return pafs.LocalFileSystem(), str(local_path(p).resolve())
    try:
        return pafs.FileSystem.from_uri(str(p))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unknown schemes/credentials
        raise DataError(f"{p}: cannot open this location ({type(e).__name__}: {e})") from e


def join(p: str | Path, *parts: str) -> str | Path:
    """``p/part/...``: a Path for local paths, a URI string for URIs."""
    if not is_uri(p):
        return local_path(p).joinpath(*parts)
    return posixpath.join(str(p).rstrip("/"), *parts)


def name(p: str | Path) -> str:
    return posixpath.basename(str(p).rstrip("/")) if is_uri(p) else local_path(p).name


def parent(p: str | Path) -> str | Path:
    if not is_uri(p):
        return local_path(p).parent
    scheme, rest = str(p).rstrip("/").split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}"


def _info(p: str | Path) -> pafs.FileInfo:
    fs, path = resolve(p)
    return fs.get_file_info(path)


def exists(p: str | Path) -> bool:
    return _info(p).type != pafs.FileType.NotFound


def is_file(p: str | Path) -> bool:
    return _info(p).type == pafs.FileType.File


def is_dir(p: str | Path) -> bool:
    return _info(p).type == pafs.FileType.Directory


def files(p: str | Path) -> list[tuple[str, pafs.FileInfo]]:
    """(relative path, info) of every file under the folder ``p`` (sorted); [] when there is none."""
    fs, path = resolve(p)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(posixpath.basename(path), info)]
    if info.type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = [(posixpath.relpath(f.path, path), f) for f in found if f.type == pafs.FileType.File]
    return sorted(out, key=lambda x: x[0])


def entries(folder: str | Path) -> list[str]:
    """Names of the files directly in ``folder`` (not below it); [] when it is absent."""
    fs, path = resolve(folder)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(f.path) for f in found if f.type == pafs.FileType.File)


def put_file(local: Path, dest: str | Path) -> None:
    """Copy one local file to ``dest`` (one upload on an object store)."""
    fs, path = resolve(dest)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def listing(p: str | Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime ns) of a file or of every file under a folder; [] if absent. Names with a
    part starting with '.' (temporaries) are left out."""
    out = []
    for rel, f in files(p):
        if not any(part.startswith(".") for part in rel.split("/")):
            out.append((rel, int(f.size or 0), int(f.mtime_ns or 0)))
    return out


def read_bytes(p: str | Path) -> bytes:
    """The bytes of one file; DataError when there is no file at ``p`` (nothing, or a folder)."""
    fs, path = resolve(p)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise DataError(f"{p} does not exist") from e
    except OSError as e:
        if fs.get_file_info(path).type != pafs.FileType.File:  # a folder where a file was expected
            raise DataError(f"{p} does not exist as a file") from e
        raise


def write_bytes(p: str | Path, data: bytes) -> None:
    """One object by one PUT (an object store shows it whole or not at all); locally, temp file + rename."""
    if not is_uri(p):
        write_bytes_atomic(local_path(p), data)
        return
    fs, path = resolve(p)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(p: str | Path, what: str) -> object:
    """Parse a JSON file (a local path or a URI); DataError names the path and ``what`` it is when the file is
    missing or malformed. The one JSON reader of the project."""
    try:
        return json.loads(read_bytes(p))
    except DataError as e:
        raise DataError(f"{p}: {what} does not exist") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: {what} is not valid JSON ({e})") from e


def write_json(p: str | Path, obj: object) -> None:
    write_bytes(p, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def delete(p: str | Path) -> None:
    """Remove a file or a folder with everything in it; nothing to do when absent."""
    fs, path = resolve(p)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local: Path, dest: str | Path) -> None:
    """Publish the finished folder ``local`` at ``dest``: every file, then the commit marker listing them."""
    fs, root = resolve(dest)
    if is_uri(dest):
        delete(join(dest, COMMIT_MARKER))  # an earlier publication there is no longer trusted from here on
    listed = {}
    for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        fs.create_dir(posixpath.dirname(posixpath.join(root, rel)), recursive=True)
        pafs.copy_files(str(f), posixpath.join(root, rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        listed[rel] = f.stat().st_size
    write_json(join(dest, COMMIT_MARKER), {"files": listed})


def committed(p: str | Path) -> dict | None:
    """The commit marker of a published folder when it and every file it lists are there; else None."""
    marker = join(p, COMMIT_MARKER)
    if not exists(marker):
        return None
    record = read_json(marker, "commit marker")
    sizes = {rel: int(f.size or 0) for rel, f in files(p)}
    return record if all(sizes.get(rel) == n for rel, n in record["files"].items()) else None


def download_dir(src: str | Path, local: Path) -> Path:
    """Copy a committed folder to ``local`` (which must not exist yet); DataError when not committed."""
    record = committed(src)
    if record is None:
        raise DataError(f"{src}: not a completely published folder (no valid {COMMIT_MARKER} marker)")
    fs, root = resolve(src)
    for rel in record["files"]:
        target = Path(local) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(posixpath.join(root, rel), str(target), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return Path(local)


@contextmanager
def output_dir(dest: str | Path, local: Path | None = None) -> Iterator[Path]:
    """The local folder to write the output folder ``dest`` in; published at ``dest`` when the block ends
    without an error. A local ``dest`` is that folder itself (each file written atomically, kernel.atomic).
    For a URI: ``local`` (kept after publication, e.g. for a tracker that sends its files later) or else a
    temporary folder, uploaded at the end by ``upload_dir`` (every file, then the commit marker)."""
    if not is_uri(dest):
        folder = local_path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        yield local
        upload_dir(local, dest)
        return
    with tempfile.TemporaryDirectory(prefix=".staging-") as tmp:
        yield Path(tmp)
        upload_dir(Path(tmp), dest)


@contextmanager
def staging(dest: str | Path) -> Iterator[Path]:
    """A local folder to write an output into before it is published at ``dest`` (beside a local ``dest``,
    so renames stay on one file system; a temporary folder for a URI)."""
    if not is_uri(dest):
        with staging_dir(local_path(dest)) as stage:
            yield stage
        return
    with tempfile.TemporaryDirectory(prefix=".staging-") as tmp:
        yield Path(tmp)


def publish_files(stage: Path, dest: str | Path, names: list[str]) -> None:
    """Move ``names`` from ``stage`` to ``dest`` in order, the last one being the done marker: by atomic
    renames locally, by one PUT each on an object store (a reader sees a file whole or not at all)."""
    if not is_uri(dest):
        publish(stage, local_path(dest), names)
        return
    fs, root = resolve(dest)
    fs.create_dir(root, recursive=True)
    for n in names:
        pafs.copy_files(str(stage / n), posixpath.join(root, n), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


class StagedFile:
    """One file written over many calls under a local temporary name (``tmp``), then published at ``dest``
    whole: ``commit`` renames it beside a local ``dest`` (kernel.atomic.AtomicFile), or uploads it to an
    object store in one PUT (seen whole or not at all); ``abort`` removes it, leaving ``dest`` untouched.

        f = StagedFile("s3://bucket/scores/part-00003.parquet");  write to f.tmp;  f.commit()  (or f.abort())
    """

    def __init__(self, dest: str | Path):
        import os

        from kernel.atomic import AtomicFile

        self.dest = dest
        self._local = None if is_uri(dest) else AtomicFile(local_path(dest))
        if self._local is not None:
            self.tmp = self._local.tmp
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{name(dest)}.", suffix=".upload")
            os.close(fd)
            self.tmp = Path(tmp)

    def commit(self) -> str | Path:
        if self._local is not None:
            return self._local.commit()
        try:
            put_file(self.tmp, self.dest)
        finally:
            self.tmp.unlink(missing_ok=True)
        return self.dest

    def abort(self) -> None:
        if self._local is not None:
            self._local.abort()
        else:
            self.tmp.unlink(missing_ok=True)
