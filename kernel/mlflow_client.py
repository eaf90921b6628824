"""MLflow, synchronously, with bounded waits: the client, the reachability check, and one run's logger.

    client = mlflow_client("http://mlflow:5000", timeout_s=10)   # ServiceUnavailable (exit 5) if it does not answer
    tracker = MlflowTracker(uri, "experiment", timeout_s=10); tracker.start(run_name="x"); tracker.log_metrics(...)

Every MLflow request waits at most ``timeout_s`` (set through MLflow's own HTTP settings: request timeout,
2 retries, short back-off; MLflow's defaults retry for about 5 minutes). An http(s) server is first asked its
``/health`` endpoint, so one that does not answer fails in seconds with a message naming the URI. Stages log
through ``kernel.tracking.open_tracker``, which puts a spool in front of this logger.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from kernel.errors import ServiceUnavailable
from kernel.logs import adopt_library_loggers
from kernel.provenance import git_commit, package_version


class NullTracker:
    run_id: str | None = None
    uri: str | None = None

    def start(self, run_name: str = "", params: dict | None = None, tags: dict | None = None,
              run_id: str | None = None) -> None: ...
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_dict(self, data: dict, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_dataset(self, uri: str, name: str, digest: str, context: str, schema: str | None = None,
                    profile: dict | None = None) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


def bound_mlflow_requests(timeout_s: float) -> None:
    """MLflow's HTTP client reads these per request: a bounded wait instead of minutes of retries."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(round(timeout_s))))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "2"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"  # an int for MLflow: pauses of 1 s, 2 s
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"


def check_reachable(uri: str, timeout_s: float) -> None:
    """For an http(s) tracking URI, one GET of /health; raise ServiceUnavailable naming the URI if it fails."""
    if not uri.startswith(("http://", "https://")):
        return
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = str(getattr(e, "reason", e))
    raise ServiceUnavailable(f"MLflow tracking server {uri} is unreachable ({reason}; waited "
                             f"{time.monotonic() - t0:.1f} s, tracking.timeout_s={timeout_s:g})")


def mlflow_client(uri: str, timeout_s: float = 10.0):
    """An MlflowClient bound to ``uri`` for tracking and registry, with bounded waits; an http(s) server
    that does not answer raises ServiceUnavailable (exit 5) before any call is made."""
    from mlflow import MlflowClient

    adopt_library_loggers()  # MLflow's console handler, installed on its import: our format, WARNING and up
    bound_mlflow_requests(timeout_s)
    check_reachable(uri, timeout_s)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def fluent_uri(uri: str):
    """MLflow's fluent API (``mlflow.start_run``, ``mlflow.pyfunc.log_model``) reads global URIs: set them to
    ``uri`` for the block, then put back exactly what was there. (MLflow's setters also export
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI to the environment, which child processes would inherit, so the
    environment is restored too.)"""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    before = (tracking_state._tracking_uri, registry_state._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        registry_state._registry_uri = before[1]
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


VERSION_TAG = "ads_relevance.version"  # the installed package's version, on every run the project creates


def source_tags(entry_point: str | None = None) -> dict[str, str]:
    """``mlflow.source.*``: what the UI's "Source" shows (the entry point, and the commit when in git), and
    the package version (``VERSION_TAG``)."""
    import sys

    name = entry_point or (Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python")
    tags = {"mlflow.source.name": name, "mlflow.source.type": "JOB", VERSION_TAG: package_version()}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
        tags["git_commit"] = commit
    return tags


def dataset_entity(uri: str, name: str, digest: str, context: str, schema: str | None = None,
                   profile: dict | None = None):
    """An MLflow dataset input for ``uri`` (a file, folder or object-store URI) known by its fingerprint, with
    its ``schema`` (MLflow's JSON form) and ``profile`` (rows, rows per scenario, label rate:
    kernel.dataset_profile) when given."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path is a local path
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(uri))
    entity = MetaDataset(source=source, name=name, digest=digest)._to_mlflow_entity()
    entity = Dataset(name=entity.name, digest=entity.digest, source_type=entity.source_type, source=entity.source,
                     schema=schema, profile=json.dumps(profile, sort_keys=True) if profile is not None else None)
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])


def guarded(uri: str, what: str, call):
    """Run one synchronous MLflow call; a connection failure becomes ServiceUnavailable naming the URI."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as e:
        if uri.startswith(("http://", "https://")) and _is_connection_error(e):
            raise ServiceUnavailable(f"MLflow at {uri} did not answer ({what}): {str(e).splitlines()[0][:200]}") from e
        raise
    except OSError as e:
        raise ServiceUnavailable(f"MLflow at {uri} did not answer ({what}): {e}") from e


def _is_connection_error(e: Exception) -> bool:
    text = str(e).lower()
    return any(k in text for k in ("connection", "max retries", "timed out", "timeout", "refused", "unreachable"))


class MlflowTracker(NullTracker):
    """One MLflow run, driven synchronously through an MlflowClient bound to an explicit tracking URI."""

    def __init__(self, tracking_uri: str, experiment: str, timeout_s: float = 10.0, artifact_root: str = ""):
        from mlflow import MlflowClient

        adopt_library_loggers()
        bound_mlflow_requests(timeout_s)
        check_reachable(tracking_uri, timeout_s)
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = guarded(tracking_uri, "experiment lookup", lambda: self.client.get_experiment_by_name(experiment))
        self.experiment_id = exp.experiment_id if exp else guarded(
            tracking_uri, "experiment creation", lambda: self.client.create_experiment(
                experiment, artifact_location=artifact_location(tracking_uri, experiment, artifact_root)))
        self.run_id = None

    def start(self, run_name: str = "", params: dict | None = None, tags: dict | None = None,
              run_id: str | None = None) -> None:
        if run_id:  # resuming: keep logging into the same run
            self.run_id = run_id
            guarded(self.uri, "run resume", lambda: self.client.update_run(run_id, status="RUNNING"))
        else:
            run = guarded(self.uri, "run creation", lambda: self.client.create_run(
                self.experiment_id, run_name=run_name or None, tags={**source_tags(), **(tags or {})}))
            self.run_id = run.info.run_id
            if params:
                self.log_params(params)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_dataset(self, uri: str, name: str, digest: str, context: str, schema: str | None = None,
                    profile: dict | None = None) -> None:
        self.client.log_inputs(self.run_id, datasets=[dataset_entity(uri, name, digest, context, schema, profile)])

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def artifact_location(tracking_uri: str, experiment: str, artifact_root: str = "") -> str | None:
    """Where a new experiment keeps its artifacts: ``<artifact_root>/<experiment>`` when a root is configured
    (``tracking.artifact_uri``, e.g. s3://bucket/mlflow); for a sqlite store, beside the database file
    (MLflow's default is ./mlruns under the current directory, wherever the job happens to run); None (the
    server's choice) otherwise."""
    if artifact_root:
        return f"{artifact_root.rstrip('/')}/{experiment}"
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None
