"""Failures of the environment, told apart from bugs: a full disk, a file-size limit, a read-only or unwritable
path, a worker that died. Each becomes one line naming the path or the worker, and exit 8.

    reason = environment_failure(error)     # "no space left on device: /data/scores/part-1.parquet", or None
    check_writable("runs/demo/scores", "--output")   # before any work: ResourceUnavailable naming the path
    with writing(path): ...                 # a full disk inside the block names ``path``

``environment_failure`` looks at the error and at what caused it (``raise ... from``, or an error raised
while handling another), so a project error wrapping a full disk still counts as one. It knows the errno
of an OSError, the messages of libraries that report them as text (pyarrow, safetensors), and Ray's errors
for a dead actor or worker (by class name: the kernel does not import Ray).
"""
from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path

from kernel.errors import RelevanceError, ResourceUnavailable

ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit such as ulimit -f)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# How libraries that do not raise an OSError spell the same errors (strerror text, Rust's io::ErrorKind).
TEXTS = {
    "no space left on device": errno.ENOSPC, "storagefull": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
    "file too large": errno.EFBIG, "filetoolarge": errno.EFBIG, "read-only file system": errno.EROFS,
    "readonlyfilesystem": errno.EROFS, "permission denied": errno.EACCES,
}
# Ray's errors for an actor or worker process that died (its own failure, out of memory, a lost node).
RAY_DEATHS = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
              "OutOfMemoryError", "LocalRayletDiedError", "ObjectLostError"}


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]


def _kind(e: BaseException) -> str | None:
    """What the environment refused, from this one error (not its causes); None when it is not such an error."""
    if isinstance(e, OSError) and e.errno in ERRNOS:
        return ERRNOS[e.errno]
    if isinstance(e, RelevanceError):
        return None  # the project's own message is not parsed; what caused it may still say
    text = str(e).lower()
    return next((ERRNOS[code] for phrase, code in TEXTS.items() if phrase in text), None)


def environment_failure(error: BaseException) -> str | None:
    """One line saying what the environment refused and where, or None when ``error`` is not such a failure."""
    for e in _chain(error):
        if isinstance(e, ResourceUnavailable):
            return str(e)
        if {c.__name__ for c in type(e).__mro__} & RAY_DEATHS:
            return f"a Ray worker died ({type(e).__name__}): {_first_line(e)}"
        kind = _kind(e)
        if kind is not None:
            where = [str(f) for f in (getattr(e, "filename", None), getattr(e, "filename2", None)) if f is not None]
            return f"{kind}: {' -> '.join(where) or _first_line(e)}"
    return None


@contextmanager
def writing(path: str | Path):
    """Errors of the environment inside the block name ``path`` (pyarrow and safetensors report a full disk
    or a file-size limit without the file): they become ResourceUnavailable("<what> writing <path>")."""
    try:
        yield
    except ResourceUnavailable:
        raise
    except Exception as e:
        kind = next((k for k in map(_kind, _chain(e)) if k is not None), None)
        if kind is None:
            raise
        raise ResourceUnavailable(f"{kind} writing {path} ({_first_line(e, 200)})") from e


def is_environment_failure(error: BaseException) -> bool:
    return environment_failure(error) is not None


def check_writable(path: str | Path, what: str) -> None:
    """Raise ResourceUnavailable naming ``path`` when a local ``path`` (a folder, existing or to be created)
    cannot be written: a read-only file system, no permission, or (for an existing folder) a probe file that
    cannot be written, e.g. under a file-size limit of 0. Nothing is created. Object-store URIs are not
    probed: their first write reports the same failures."""
    text = str(path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text) and not text.startswith("file://"):
        return
    target = Path(text.removeprefix("file://")).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ResourceUnavailable(f"{what} {path}: {existing} is a file, not a folder")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise ResourceUnavailable(f"{what} {path}: read-only file system ({existing})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResourceUnavailable(f"{what} {path}: permission denied (cannot write in {existing})")
    if existing == target:
        probe = target / f".write-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"0")
        except OSError as e:
            raise ResourceUnavailable(f"{what} {path}: cannot write there ({environment_failure(e) or e})") from e
        finally:
            probe.unlink(missing_ok=True)
