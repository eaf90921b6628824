"""One MLflow parent run per job run, a child run per stage, and the datasets each stage read.

    lineage = JobLineage(cfg, paths)           # nothing is created until a step runs
    tags = lineage.tags("train")               # mlflow.parentRunId, stage, run_key: for a stage's own run
    with lineage.child("score") as run: run.log_metrics(...)
    log_input(run, "runs/demo/data/test.parquet", "evaluation", "evaluation")   # a dataset the stage read

The parent run is created when the first step of this invocation runs; with a run key (``--run-date``) its
id is kept in the run's state folder, so a resumed or re-run night keeps one parent with all its children.
Without tracking (``tracking.enabled: false``) every call is a no-op.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from job.state import digest, listing
from kernel import exit_codes, storage
from kernel.config import Config
from kernel.dataset_profile import describe_parquet, parquet_schema
from kernel.mlflow_client import MlflowTracker, NullTracker, mlflow_client
from kernel.tracking import open_tracker

PARENT_FILE = "mlflow_job_run_id"


class JobLineage:
    def __init__(self, cfg: Config, state_dir: str | Path, run_key: str | None):
        self.cfg, self.state_dir, self.run_key = cfg, state_dir, run_key
        self._parent: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.tracking.enabled

    @property
    def parent_run_id(self) -> str | None:
        """The job's run (created on first use); None with tracking off."""
        if not self.enabled:
            return None
        if self._parent is None:
            saved = storage.join(self.state_dir, PARENT_FILE)
            if self.run_key and storage.is_file(saved):
                self._parent = storage.read_bytes(saved).decode().strip()
            else:
                t = self.cfg.tracking
                run = MlflowTracker(self.cfg.tracking_uri, t.experiment, t.timeout_s, t.artifact_uri)
                stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                run.start(run_name=f"job {self.run_key or stamp}",
                          tags={"stage": "job", "run_key": self.run_key or "", "mlflow.source.name": "job.run"})
                self._parent = run.run_id
                storage.write_bytes(saved, self._parent.encode())
        return self._parent

    def tags(self, stage: str) -> dict[str, str]:
        if not self.enabled:
            return {}
        return {"mlflow.parentRunId": self.parent_run_id, "stage": stage, "run_key": self.run_key or "",
                "mlflow.source.name": "job.run"}

    @contextmanager
    def child(self, stage: str):
        """A started (spooled) tracker for the stage's own run, ended when the block ends."""
        if not self.enabled:
            yield NullTracker()
            return
        tracker = open_tracker(self.cfg)
        tracker.start(run_name=stage, tags=self.tags(stage))
        try:
            yield tracker
        except BaseException:
            tracker.end("FAILED")
            raise
        tracker.end()

    def finish(self, exit_code: int) -> None:
        """Close the parent run with the job's outcome: its exit code as a tag; FINISHED when the job ran
        through (a breach or a failed gate is an outcome, not a failure), FAILED otherwise."""
        if not self.enabled or self._parent is None:
            return
        client = mlflow_client(self.cfg.tracking_uri, self.cfg.tracking.timeout_s)
        client.set_tag(self._parent, "exit_code", str(exit_code))
        ran_through = exit_code in (exit_codes.OK, exit_codes.MONITORING_BREACH, exit_codes.GATE_FAILED)
        client.set_terminated(self._parent, status="FINISHED" if ran_through else "FAILED")


def log_input(tracker, path: str | Path, name: str, context: str, *, profile_of: str | Path | None = None,
              profile: dict | None = None) -> None:
    """Log the Parquet file or folder ``path`` as a dataset input of a stage's run: known by its fingerprint
    (the digest of its file listing), with its schema and a profile (rows and label rate, per scenario:
    kernel.dataset_profile). ``profile_of``: read the profile from another folder (the scores of traffic in
    the user's own columns); ``profile``: one already known (ingestion's counts of its source)."""
    if profile is None:
        schema, profile = describe_parquet(path, profile_of)
    else:
        schema = parquet_schema(path)
    tracker.log_dataset(str(path), name, digest(listing(path)), context, schema, profile)


def ingest_profile(stats: dict) -> dict:
    """The profile of an ingested source from ingestion's stats.json: rows read and accepted, and per
    scenario the accepted rows and their label rate (positives / accepted rows)."""
    per = stats.get("by_scenario") or {}
    accepted = sum(s["rows"] for s in per.values())
    return {"rows": stats.get("rows_in"), "rows_accepted": accepted,
            "rows_per_scenario": {k: s["rows"] for k, s in per.items()},
            "label_rate": sum(s["positives"] for s in per.values()) / accepted if accepted else None,
            "label_rate_per_scenario": {k: s["positive_rate"] for k, s in per.items()}}
