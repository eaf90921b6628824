"""MLflow tracking with an explicit URI, and a do-nothing tracker so call sites need no ``if`` guards.

    tracker = open_tracker(cfg, rank)           # MlflowTracker on rank 0 when tracking is on, else NullTracker
    tracker.start(run_name="demo", params=flat_params(cfg), tags={...})
    tracker.log_metrics({"val/auc_macro": 0.83}, step=100)
    tracker.end()
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from kernel.config import Config


class NullTracker:
    run_id: str | None = None

    def start(self, run_name: str = "", params: dict | None = None, tags: dict | None = None,
              run_id: str | None = None) -> None: ...
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_dict(self, data: dict, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run, driven through an MlflowClient bound to an explicit tracking URI."""

    def __init__(self, tracking_uri: str, experiment: str):
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=artifact_location(tracking_uri, experiment))
        self.run_id = None

    def start(self, run_name: str = "", params: dict | None = None, tags: dict | None = None,
              run_id: str | None = None) -> None:
        if run_id:  # resuming: keep logging into the same run
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name or None, tags=tags or {})
            self.run_id = run.info.run_id
            if params:
                self.log_params(params)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts beside the database file (MLflow's default is ./mlruns under the
    current directory, wherever the job happens to run); None (the server's choice) otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def open_tracker(cfg: Config, rank: int = 0) -> NullTracker:
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    return MlflowTracker(cfg.tracking_uri, cfg.tracking.experiment)


def git_commit() -> str:
    """The source commit (plus "-dirty" when the tree has changes), or "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
