"""Tracking for the stages: MLflow behind a local spool, so that logging never blocks and loses nothing.

    tracker = open_tracker(cfg, rank)          # rank 0 with tracking on: SpooledTracker over MLflow; else a no-op
    tracker.start(run_name="train")            # synchronous: a run id is needed (ServiceUnavailable if down)
    tracker.log_metrics({"train/loss": 0.4}, step=10)   # returns at once
    tracker.end()                              # waits up to tracking.flush_timeout_s for the spool to drain

Every call after ``start`` becomes one JSON line appended to ``<spool_dir>/<run id>.jsonl`` and is sent by a
background thread, in order; ``<run id>.sent`` holds how many lines have been sent. While the server is down
the thread retries with a growing pause (0.5 s up to 10 s) and the caller carries on. A run that ends while
the server is still down keeps its spool on disk and says so in one line; the next tracker opened on the
same spool folder (the next job, or a resumed training) sends those lines first, with their original
timestamps. Metrics keep the time of the logging call, not of the send. The synchronous MLflow layer
(bounded waits, the client) is ``kernel.mlflow_client``.

A resumed run (``start(run_id=...)``: training after a kill, from its last checkpoint) replays the steps
between that checkpoint and the kill, and would log their metrics a second time. The tracker reads which
(metric, step) points the run holds already, on the server and in its spool, and does not log those again,
so the run's history equals an uninterrupted run's: one point per metric and step, the first value logged
(the same value on a deterministic resume).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from pathlib import Path

from kernel.atomic import write_json_atomic
from kernel.config import Config, TrackingConfig
from kernel.mlflow_client import MlflowTracker, NullTracker, dataset_entity, guarded

MAX_PAUSE_S = 10.0
log = logging.getLogger(__name__)


class SpooledTracker(NullTracker):
    def __init__(self, inner: MlflowTracker, spool_dir: Path, flush_timeout_s: float = 60.0):
        self.inner = inner
        self.uri = inner.uri
        self.dir = Path(spool_dir)
        self.flush_timeout_s = flush_timeout_s
        self.run_id: str | None = None
        self._queue: deque[tuple[Path, int, dict]] = deque()  # (spool file, line number, record)
        self._totals: dict[Path, int] = {}  # lines written to each spool file so far
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.unsent = 0  # after end(): records left in the spool (0: all delivered)
        self._recorded: set[tuple[str, int]] = set()  # resumed run: (metric, step) points it holds already
        self.skipped = 0  # metric points not logged again because the resumed run holds them

    # --- the caller's side -------------------------------------------------------------------------------

    def start(self, run_name: str = "", params: dict | None = None, tags: dict | None = None,
              run_id: str | None = None) -> None:
        self.inner.start(run_name=run_name, tags=tags, run_id=run_id)
        self.run_id = self.inner.run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in sorted(self.dir.glob("*.jsonl")):  # earlier runs' lines that never reached the server
            self._enqueue_unsent(leftover)
        self._totals.setdefault(self._file, _count_lines(self._file))
        if run_id:  # a resumed run: the points it already holds (sent, or still in the spool) are not logged again
            self._recorded = recorded_points(self.inner, run_id) | _spooled_points(self._file)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-spool", daemon=True)
        self._thread.start()
        if params:
            self.log_params(params)

    def log_params(self, params: dict) -> None:
        self._record("params", {k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None and (k, step or 0) not in self._recorded}
        self.skipped += sum(1 for k, v in metrics.items() if v is not None) - len(values)
        if values:
            self._record("metrics", {"metrics": values, "step": step or 0, "ts": int(time.time() * 1000)})

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._record("dict", {"data": data, "file": artifact_file})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._record("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._record("artifacts", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: dict) -> None:
        self._record("tags", {k: str(v) for k, v in tags.items()})

    def log_dataset(self, uri: str, name: str, digest: str, context: str, schema: str | None = None,
                    profile: dict | None = None) -> None:
        self._record("dataset", {"uri": str(uri), "name": name, "digest": digest, "context": context,
                                 "schema": schema, "profile": profile})

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        self._record("end", {"status": status})
        deadline = time.monotonic() + self.flush_timeout_s
        with self._lock:
            while self._queue and time.monotonic() < deadline:
                self._lock.wait(timeout=0.2)
            self._closing = True
            self.unsent = len(self._queue)
            self._lock.notify_all()
        if self.unsent:
            log.warning(f"tracking: {self.unsent} records for MLflow run {self.run_id} were not delivered to "
                        f"{self.uri} within tracking.flush_timeout_s={self.flush_timeout_s:g}; kept in {self.dir}, "
                        "sent by the next run that tracks there")

    @property
    def _file(self) -> Path:
        return self.dir / f"{self.run_id}.jsonl"

    def _record(self, op: str, payload: dict) -> None:
        record = {"op": op, "run_id": self.run_id, **payload}
        with self._lock:
            with open(self._file, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
            line = self._totals.get(self._file, 0)
            self._totals[self._file] = line + 1
            self._queue.append((self._file, line, record))
            self._lock.notify_all()

    def _enqueue_unsent(self, spool: Path) -> None:
        sent, total = _read_sent(spool), 0
        with open(spool) as f:
            for i, line in enumerate(f):
                total = i + 1
                if i >= sent and line.strip():
                    self._queue.append((spool, i, json.loads(line)))
        self._totals[spool] = total

    # --- the sender's side -----------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        pause = 0.5
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                spool, line, record = self._queue[0]
            try:
                _send(self.inner, record)
            except Exception:  # noqa: BLE001 - any failure to deliver: keep the line, wait, retry
                with self._lock:
                    self._lock.wait(timeout=pause)
                pause = min(pause * 2, MAX_PAUSE_S)
                continue
            pause = 0.5
            with self._lock:
                finished = record["op"] == "end" and line + 1 == self._totals.get(spool)
            _mark_sent(spool, line + 1, finished)
            with self._lock:
                self._queue.popleft()
                self._lock.notify_all()


def recorded_points(inner: MlflowTracker, run_id: str) -> set[tuple[str, int]]:
    """(metric, step) of every point the server holds for the run."""
    client = inner.client
    keys = guarded(inner.uri, "metric lookup", lambda: list(client.get_run(run_id).data.metrics))
    return {(key, m.step) for key in keys
            for m in guarded(inner.uri, "metric history", lambda key=key: client.get_metric_history(run_id, key))}


def _spooled_points(spool: Path) -> set[tuple[str, int]]:
    """(metric, step) of every metrics line in a spool file (sent or not)."""
    points = set()
    if spool.is_file():
        with open(spool) as f:
            for line in f:
                r = json.loads(line) if line.strip() else {}
                if r.get("op") == "metrics":
                    points.update((k, r["step"]) for k in r["metrics"])
    return points


def _send(inner: MlflowTracker, r: dict) -> None:
    from mlflow.entities import Metric, Param

    client, run_id, op = inner.client, r["run_id"], r["op"]
    if op == "params":
        items = [Param(k, v) for k, v in r.items() if k not in ("op", "run_id")]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    elif op == "metrics":
        items = [Metric(k, v, r["ts"], r["step"]) for k, v in r["metrics"].items()]
        client.log_batch(run_id, metrics=items)
    elif op == "dict":
        client.log_dict(run_id, r["data"], r["file"])
    elif op in ("artifact", "artifacts"):
        if Path(r["path"]).exists():  # a folder removed since (a replaced checkpoint) has nothing to send
            (client.log_artifact if op == "artifact" else client.log_artifacts)(run_id, r["path"], r["artifact_path"])
    elif op == "tags":
        for k, v in r.items():
            if k not in ("op", "run_id"):
                client.set_tag(run_id, k, v)
    elif op == "dataset":
        client.log_inputs(run_id, datasets=[dataset_entity(r["uri"], r["name"], r["digest"], r["context"],
                                                           r.get("schema"), r.get("profile"))])
    elif op == "end":
        client.set_terminated(run_id, status=r["status"])


def _sent_path(spool: Path) -> Path:
    return spool.with_suffix(".sent")


def _read_sent(spool: Path) -> int:
    try:
        return int(json.loads(_sent_path(spool).read_text())["lines"])
    except (OSError, ValueError, KeyError):
        return 0


def _mark_sent(spool: Path, lines: int, finished: bool) -> None:
    """Record progress; a spool whose every line is delivered, its run's end included, is removed."""
    if finished:
        spool.unlink(missing_ok=True)
        _sent_path(spool).unlink(missing_ok=True)
        return
    write_json_atomic(_sent_path(spool), {"lines": lines})


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def open_tracker(cfg: Config, rank: int = 0, spool_dir: Path | None = None) -> NullTracker:
    """NullTracker off rank 0 or with tracking off; else MLflow behind a spool in ``spool_dir``
    (default <local work dir>/tracking_spool), so that a run never blocks on the tracking server."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    cfg.local_work_dir.mkdir(parents=True, exist_ok=True)
    t: TrackingConfig = cfg.tracking
    inner = MlflowTracker(cfg.tracking_uri, t.experiment, t.timeout_s, t.artifact_uri)
    return SpooledTracker(inner, Path(spool_dir or cfg.local_work_dir / "tracking_spool"), t.flush_timeout_s)
