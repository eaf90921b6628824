"""What each step of the job was run on, so that a rerun redoes exactly the steps whose inputs changed.

    state = JobState(Path("runs/demo/state"))
    fp = Fingerprint.of(config={...}, inputs={...}, upstream={"ingest": "3fa0..."}, code=code_version())
    record = state.read("train")                 # None, or the last finished run of the step
    if record and record.fingerprint == fp.digest: ...up to date: its recorded outcome still holds
    state.begin("train", fp); ...; state.finish("train", fp, outputs=[train_dir], info={...}, exit_code=0)

A step's fingerprint hashes everything that decides its output: the config sections it reads, its input
data (the file listing: relative path, size and modification time of every Parquet file, or an object
store's listing), the ``output`` digest of each upstream step it reads from, and the code version (a hash
of the project's source files, so an upgrade reruns the job). A finished step records its fingerprint,
the digest of its own outputs (listing of the folders it wrote, plus identifiers such as the MLflow run
and model version), its info and its exit code, so a replay reports the same outcome the first run had.
``begin`` leaves ``<step>.running.json``: an interrupted step with the same fingerprint resumes (training
continues from its checkpoint); one whose inputs changed since starts over.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from kernel import storage
from kernel.hashing import bytes_digest, json_digest

PACKAGES = ("kernel", "pipeline", "features", "training", "serving", "monitoring", "job")


def digest(obj: object) -> str:
    return json_digest(obj, 16)


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the project's source files (path and bytes): changes with any code change or upgrade."""
    root = Path(__file__).resolve().parents[1]
    files = [f for pkg in PACKAGES for f in sorted((root / pkg).rglob("*.py"))]
    return bytes_digest((part for f in files for part in (str(f.relative_to(root)), f.read_bytes())), 16)


def listing(path: str | Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime ns) of a file, or of every file under a folder (sorted); [] if absent; a
    local path or an object-store URI. Names starting with '.' (temporaries) are left out; '_' folders
    (quarantine, markers) are kept."""
    return storage.listing(path)


@dataclass(frozen=True)
class Fingerprint:
    """The four parts of what a step was run on, each kept so that a rerun can say which one changed."""

    config: dict
    inputs: dict
    upstream: dict
    code: str

    @property
    def digest(self) -> str:
        return digest([self.config, self.inputs, self.upstream, self.code])

    def parts(self) -> dict:
        return {"config": self.config, "inputs": digest(self.inputs), "upstream": self.upstream, "code": self.code}

    def changes_since(self, old: dict) -> list[str]:
        """Readable reasons this fingerprint differs from an earlier one's ``parts()``."""
        reasons = []
        keys = sorted(set(self.config) | set(old.get("config", {})))
        changed = [k for k in keys if self.config.get(k) != old.get("config", {}).get(k)]
        if changed:
            reasons.append("config " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))
        if digest(self.inputs) != old.get("inputs"):
            reasons.append("input data")
        ups = [k for k in sorted(set(self.upstream) | set(old.get("upstream", {})))
               if self.upstream.get(k) != old.get("upstream", {}).get(k)]
        if ups:
            reasons.append("upstream " + ", ".join(ups))
        if self.code != old.get("code"):
            reasons.append("code version")
        return reasons


@dataclass
class StepRecord:
    fingerprint: str
    parts: dict
    output: str  # digest of what the step wrote: downstream fingerprints include it
    exit_code: int
    info: dict = field(default_factory=dict)
    finished_at: str = ""


class JobState:
    """``<state_dir>/<step>.json`` per finished step, ``<step>.running.json`` while one runs; a local folder
    or an object-store URI (each record is one object, written whole)."""

    def __init__(self, state_dir: str | Path):
        self.dir = state_dir

    def _path(self, step: str, running: bool = False) -> str | Path:
        return storage.join(self.dir, f"{step}{'.running' if running else ''}.json")

    def read(self, step: str) -> StepRecord | None:
        p = self._path(step)
        if not storage.is_file(p):
            return None
        d = storage.read_json(p, f"state of step {step}")
        if "fingerprint" not in d:  # written by a version without fingerprints: not evidence of anything
            return None
        return StepRecord(**d)

    def begin(self, step: str, fp: Fingerprint) -> bool:
        """Mark the step as running; True when an interrupted run of the same inputs can be resumed."""
        running = self._path(step, running=True)
        resumable = (storage.is_file(running)
                     and storage.read_json(running, f"running state of {step}").get("fingerprint") == fp.digest)
        storage.write_json(running, {"fingerprint": fp.digest, "started_at": _now(), "pid": os.getpid()})
        return resumable

    def finish(self, step: str, fp: Fingerprint, outputs: list[Path], info: dict, exit_code: int) -> StepRecord:
        record = StepRecord(fp.digest, fp.parts(), digest([[listing(o) for o in outputs], _ids(info)]),
                            exit_code, info, _now())
        storage.write_json(self._path(step), record.__dict__)
        storage.delete(self._path(step, running=True))
        return record

    def forget(self, step: str) -> None:
        storage.delete(self._path(step))


def _ids(info: dict) -> dict:
    """Identifiers among a step's info that name its outputs (an MLflow run, a model version)."""
    return {k: info[k] for k in ("run_id", "version", "model_version") if k in info}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
