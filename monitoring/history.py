"""Earlier monitoring runs read back from MLflow: the trend of each scenario's AUC and PSI.

    history = read_history("sqlite:///runs/demo/mlflow.db", "ads-relevance", model_name="ads-relevance", limit=10)
    history[-1]["model_version"], history[-1]["scenarios"]["shoes"]["auc"], history[-1]["scenarios"]["shoes"]["psi_score"]
    recent_checks(cfg.tracking_uri, cfg, "ads-relevance/3", 10)   # the same, for that version's model

A monitoring run is an MLflow run that ``monitoring.check.run`` logged to: it carries the tags below
(set by the check on its tracker) and the headline metrics of ``monitoring.check.headline_metrics``, named as
every metric of the project is, by the data they were measured on (kernel.metric_names): ``<data>/<metric>``
for the whole run and ``<data>/<metric>/<scenario>`` per scenario, where ``<data>`` is the run's ``data``
tag (``traffic``, ``test_split``, ...). Only FINISHED runs count (a failed or still running check is not a
point of the trend). Give the check a run of its own: the ``stage`` tag marks the whole run as a monitoring run.

Scenario names in metric keys are cleaned by ``metric_key`` (characters MLflow refuses become "_"), so
``scenarios`` is keyed by ``scenario_key(name)``; look a scenario up with that, not with the raw name.
"""
from __future__ import annotations

from datetime import datetime, timezone

from kernel.config import Config
from kernel.errors import DataError
from kernel.metric_names import TRAFFIC, clean, metric_name
from kernel.mlflow_client import guarded, mlflow_client

STAGE_TAG, STAGE = "stage", "monitor"  # stage=monitor: the runs read_history finds
MODEL_VERSION_TAG = "model_version"  # e.g. "ads-relevance/3": the version whose scores were checked
MODEL_NAME_TAG = "model_name"  # "ads-relevance": the part of model_version before the last "/", if any
CHAMPION_VERSION_TAG = "champion_version"  # set when the check compared against a champion
DATA_TAG = "data"  # what the scored rows are: traffic (the default), test_split, eval_set
# The per-scenario metrics that the check logs (the middle part of "<data>/<metric>/<scenario>").
SCENARIO_METRICS = ("auc", "ece", "log_loss", "psi_score", "auc_delta_vs_champion")


def metric_key(data: str, metric: str, scenario: str | None = None) -> str:
    """The MLflow name of a monitoring figure: ``<data>/<metric>[/<scenario>]`` (kernel.metric_names)."""
    return metric_name(data, metric, scenario)


def scenario_key(name: str) -> str:
    """How a scenario is named in metric keys, hence in ``read_history(...)[i]["scenarios"]``."""
    return clean(name)


def model_name_of(model_version: str | None) -> str | None:
    """ "ads-relevance/3" -> "ads-relevance"; None for a version without a registry name (an export digest)."""
    if not model_version or "/" not in model_version:
        return None
    return model_version.rsplit("/", 1)[0] or None


def run_tags(model_version: str | None, champion_version: str | None = None, data: str = TRAFFIC) -> dict[str, str]:
    """The tags the check sets on its run so that read_history finds it (and can filter by model and data)."""
    tags = {STAGE_TAG: STAGE, DATA_TAG: data}
    if model_version:
        tags[MODEL_VERSION_TAG] = model_version
        name = model_name_of(model_version)
        if name:
            tags[MODEL_NAME_TAG] = name
    if champion_version:
        tags[CHAMPION_VERSION_TAG] = champion_version
    return tags


def split_metrics(metrics: dict[str, float],
                  data: str = TRAFFIC) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Logged metric keys -> ({run-level metric: value}, {scenario key: {metric: value}}).

    "<data>/auc_macro" is run-level; "<data>/<metric>/<scenario>" is per scenario (the scenario is the rest
    of the key after the second "/": it may hold "/"). Keys of other data are skipped.
    """
    overall: dict[str, float] = {}
    per: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        head, _, rest = key.partition("/")
        if head != data or not rest:
            continue
        metric, _, scenario = rest.partition("/")
        if scenario and metric in SCENARIO_METRICS:
            per.setdefault(scenario, {})[metric] = float(value)
        elif not scenario:
            overall[metric] = float(value)
    return overall, per


def _quoted(value: str, what: str) -> str:
    if "'" in value or "\\" in value:
        raise DataError(f"read_history: {what} {value!r} holds a quote or a backslash, which an MLflow "
                        "search filter cannot hold")
    return f"'{value}'"


def read_history(tracking_uri: str, experiment: str, model_name: str | None = None, limit: int = 10,
                 timeout_s: float = 10.0, data: str | None = None) -> list[dict]:
    """The last ``limit`` FINISHED monitoring runs of ``experiment``, oldest first.

    Each: {"run_id", "start_time" (ISO 8601, UTC), "model_version" (tag; None if the run had none),
    "champion_version" (tag or None), "data" (tag), "metrics" (every logged metric, as logged:
    "traffic/auc/shoes" ...), "overall" ({"auc_macro", "breaches", "rows", ...}), "scenarios" ({scenario key:
    {"auc", "psi_score", "ece", ...}})}. ``model_name``: only runs tagged model_name=<it> (runs of that
    registered model); ``data``: only checks of that data (a trend compares like with like). An
    experiment that does not exist yet has no history: []. Read through an MlflowClient bound to
    ``tracking_uri``; an http(s) server that does not answer raises ServiceUnavailable (exit 5).
    """
    if limit <= 0:
        return []
    client = mlflow_client(tracking_uri, timeout_s)
    exp = guarded(tracking_uri, "experiment lookup", lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        return []
    filters = [f"tags.{STAGE_TAG} = '{STAGE}'", "attributes.status = 'FINISHED'"]
    if model_name:
        filters.append(f"tags.{MODEL_NAME_TAG} = {_quoted(model_name, 'model_name')}")
    if data:
        filters.append(f"tags.{DATA_TAG} = {_quoted(data, 'data')}")
    runs = guarded(tracking_uri, "search of monitoring runs", lambda: client.search_runs(
        [exp.experiment_id], filter_string=" and ".join(filters),
        order_by=["attributes.start_time DESC"], max_results=limit))
    out = []
    for run in reversed(list(runs)):  # newest first from the search; the trend reads oldest first
        run_data = run.data.tags.get(DATA_TAG, TRAFFIC)
        overall, per = split_metrics(run.data.metrics, run_data)
        out.append({
            "run_id": run.info.run_id,
            "start_time": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(
                timespec="seconds"),
            "model_version": run.data.tags.get(MODEL_VERSION_TAG),
            "champion_version": run.data.tags.get(CHAMPION_VERSION_TAG),
            "data": run_data,
            "metrics": dict(run.data.metrics),
            "overall": overall,
            "scenarios": per,
        })
    return out


def recent_checks(tracking_uri: str, cfg: Config, model_version: str | None, limit: int = 10,
                  exclude_run: str | None = None, data: str = TRAFFIC) -> list[dict]:
    """The last ``limit`` finished monitoring runs of ``tracking.experiment`` for the registered model of
    ``model_version`` (all runs when it names none) on ``data``, oldest first, leaving out ``exclude_run`` (a
    resumed run is not its own history)."""
    if limit <= 0:
        return []
    runs = read_history(tracking_uri, cfg.tracking.experiment, model_name_of(model_version), limit + 1,
                        cfg.tracking.timeout_s, data=data)
    return [h for h in runs if h["run_id"] != exclude_run][-limit:]
