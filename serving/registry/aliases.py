"""MLflow model-registry helpers: aliases (never stages) and decision tags.

    client = registry_client("sqlite:///runs/demo/mlflow.db")
    mv = resolve_version(client, "ads-relevance", "champion")      # a version number or an alias
    alias_version(client, "ads-relevance", PREVIOUS)                 # ModelVersion or None
    record_decision(client, "ads-relevance", "7", "promotion", {"decision": "promoted", "reasons": []})

Decisions are model-version tags. Each decision writes ``<kind>.<field>`` for the latest one (readable in the
MLflow UI: ``promotion.decision``, ``promotion.by``, ``promotion.at``, ``promotion.reasons``,
``promotion.metrics``) and one ``history.<UTC time>.<kind>`` tag holding the whole record as JSON, so an older
decision on the same version is never overwritten.
"""
from __future__ import annotations

import getpass
import json
import os
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from kernel.errors import RelevanceError
from kernel.mlflow_client import mlflow_client

CHAMPION = "champion"
PREVIOUS = "previous"


def registry_client(tracking_uri: str, timeout_s: float = 10.0) -> MlflowClient:
    """A client bound to an explicit URI (the registry lives in the same store as the tracking data), with
    bounded waits: an unreachable server is ServiceUnavailable (exit 5), not minutes of retries."""
    return mlflow_client(tracking_uri, timeout_s)


def model_uri(name: str, version: str | int) -> str:
    return f"models:/{name}/{version}"


def resolve_version(client: MlflowClient, name: str, ref: str) -> ModelVersion:
    """``ref`` is a version number ("7") or an alias ("challenger"); RelevanceError if neither exists."""
    try:
        if str(ref).isdigit():
            return client.get_model_version(name, str(ref))
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as e:
        raise RelevanceError(f"registered model {name!r}: no version or alias {ref!r} ({e.message})") from e


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version an alias points to, or None when the alias is unset."""
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        raise RelevanceError(f"registered model {name!r} does not exist ({e.message})") from e
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(client: MlflowClient, name: str, alias: str, version: str | int) -> None:
    client.set_registered_model_alias(name, alias, str(version))


def delete_alias(client: MlflowClient, name: str, alias: str) -> None:
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException:
        pass  # already unset


def who() -> str:
    """The person or service deciding: $RELEVANCE_USER if set, else the login name."""
    return os.environ.get("RELEVANCE_USER") or getpass.getuser()


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_decision(client: MlflowClient, name: str, version: str | int, kind: str, fields: dict) -> dict:
    """Tag ``version`` with one decision (``kind``: promotion, rollback, ...); adds ``by`` and ``at``.

    Values that are not strings are stored as JSON. Returns the record as tagged.
    """
    record = {"by": who(), "at": now_utc(), **fields}
    for key, value in record.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        client.set_model_version_tag(name, str(version), f"{kind}.{key}", text)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    client.set_model_version_tag(name, str(version), f"history.{stamp}.{kind}", json.dumps(record, sort_keys=True))
    return record


def decisions(client: MlflowClient, name: str, version: str | int) -> list[dict]:
    """Every recorded decision on a version, oldest first."""
    tags = client.get_model_version(name, str(version)).tags
    keys = sorted(k for k in tags if k.startswith("history."))
    return [{"kind": k.rsplit(".", 1)[1], **json.loads(tags[k])} for k in keys]


def version_description(name: str, version: str, about: dict | None, result: dict) -> str:
    """The model version's description in the registry UI (Markdown): what the model is, its per-scenario
    AUC on the evaluation data with 95% CIs (and the paired change against the champion), and the decision.
    The AUC is named by its data (``result["eval_data"]``: test_split, eval_set; kernel.metric_names)."""
    about = about or {}
    lines = [f"**{name} version {version}**"]
    if about:
        lines.append(f"Method **{about.get('method')}** ({about.get('adapter', '')}), base `{about.get('base_model')}`, "
                     f"{about.get('pooling')} pooling; trained in run `{about.get('training_run')}`.")
        if about.get("scenarios"):
            lines.append("Scenarios: " + ", ".join(about["scenarios"]) + ".")
        start = about.get("started_from")
        if start:  # a warm start (train.init_from): what it continued
            lines.append(f"Warm-started from `{start.get('init_from')}`"
                         + (f" (version {start['version']})" if start.get("version") else "")
                         + f", which served {', '.join(start.get('scenarios') or [])}.")
    cand = (result.get("metrics") or {}).get("candidate") or {}
    delta = (result.get("metrics") or {}).get("delta") or {}
    champ = result.get("champion_version")
    data = result.get("eval_data") or "eval_set"
    if cand:
        head = f"| scenario | {data} AUC | 95% CI | rows |" + (f" vs champion v{champ} (95% CI) |" if delta else "")
        lines += ["", head, "|---|---|---|---|" + ("---|" if delta else "")]
        for s, m in sorted(cand.items()):
            auc = "n/a" if m.get("auc") is None else f"{m['auc']:.4f}"
            ci = "" if m.get("auc_ci_low") is None else f"[{m['auc_ci_low']:.3f}, {m['auc_ci_high']:.3f}]"
            row = f"| {s} | {auc} | {ci} | {m.get('n', '')} |"
            if delta:
                d = delta.get(s)
                row += (f" {d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] |" if d else " |")
            lines.append(row)
    verdict = "promoted to champion" if result.get("passed") else "not promoted"
    lines += ["", f"**Promotion: {verdict}**" + (f" (champion was version {champ})." if champ else ".")]
    lines += [f"- {r}" for r in result.get("reasons") or []]
    if result.get("eval_path"):
        lines.append(f"Evaluated on {data}: `{result['eval_path']}`.")
    return "\n".join(lines)


def describe_version(client: MlflowClient, name: str, version: str | int, about: dict | None, result: dict) -> str:
    text = version_description(name, str(version), about, result)
    client.update_model_version(name, str(version), description=text)
    return text
