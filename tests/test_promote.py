"""Registry promotion through real MLflow: sqlite for most tests, one test against a real ``mlflow server``.

Each registered model version holds a small scorer spec (``scorer.json``) as its artifact. The score function
below downloads that artifact through MLflow (aliases resolved by MLflow) and really scores the pinned
evaluation Parquet with it: token overlap of the two offer texts, optionally with noise, with some scenarios
inverted or dropped. Versions therefore differ in quality the way retrained models do.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from kernel.config import config_from_dict
from kernel.errors import RelevanceError
from kernel.exit_codes import GATE_FAILED
from monitoring.promote import EXIT_INPUT, EXIT_OK, gate, main, rollback, run
from serving.registry import aliases as registry
from tests.mlflow_testkit import MlflowServer
from tests.monitoring_testkit import CATEGORIES, DATA, overlap_scores

ROWS_PER_SCENARIO = 250


def download_model(model_uri: str, tracking_uri: str, dst: Path) -> Path:
    """Fetch a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` folder through an explicit URI.

    (mlflow.artifacts.download_artifacts resolves ``models:/`` against the global registry URI, whatever
    registry_uri it is given, so the version's storage location is looked up with a bound client first.)
    """
    client = registry.registry_client(tracking_uri)
    ref = model_uri.removeprefix("models:/")
    name, version = ref.split("@") if "@" in ref else ref.rsplit("/", 1)
    if "@" in ref:
        version = client.get_model_version_by_alias(name, version).version
    source = client.get_model_version_download_uri(name, version)
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))


def make_score_fn(tracking_uri: str, cache: Path):
    """score_fn(model_uri, eval_path) -> table(scenario, label, score), driven by the version's scorer.json."""
    def score(model_uri: str, eval_path: str) -> pa.Table:
        local = download_model(model_uri, tracking_uri, cache / model_uri.replace(":", "_").replace("/", "_"))
        spec = json.loads((Path(local) / "scorer.json").read_text())
        t = pq.read_table(eval_path)
        t = t.filter(pa.array([s not in spec.get("drop", []) for s in t["scenario"].to_pylist()]))
        s = overlap_scores(t["query"].to_pylist(), t["title"].to_pylist())
        s = np.clip(s + spec.get("noise", 0.0) * np.random.default_rng(spec.get("seed", 0)).normal(size=len(s)), 0, 1)
        scen = np.asarray(t["scenario"].to_pylist())
        for name in spec.get("invert", []):
            s[scen == name] = 1 - s[scen == name]
        for name in spec.get("nan", []):
            s[scen == name] = np.nan
        return pa.table({"scenario": t["scenario"], "label": t["label"], "score": s})
    return score


def register(client: MlflowClient, name: str, spec: dict, experiment_id: str, workdir: Path) -> str:
    """Log scorer.json as a run's ``model`` artifact and register it; returns the new version."""
    run_id = client.create_run(experiment_id).info.run_id
    folder = workdir / f"spec-{run_id}"
    folder.mkdir(parents=True)
    (folder / "scorer.json").write_text(json.dumps(spec))
    client.log_artifacts(run_id, str(folder), "model")
    client.set_terminated(run_id)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    return str(client.create_model_version(name, f"runs:/{run_id}/model", run_id).version)


@pytest.fixture(scope="module")
def eval_path(tmp_path_factory) -> str:
    """The pinned evaluation set: the first rows of each category's real test split."""
    parts = []
    for cat in CATEGORIES:
        t = pq.read_table(DATA / cat / "test.parquet").slice(0, ROWS_PER_SCENARIO)
        parts.append(pa.table({"scenario": t["category"], "label": t["label"], "query": t["left"],
                               "title": t["right"]}))
    path = tmp_path_factory.mktemp("eval") / "eval.parquet"
    pq.write_table(pa.concat_tables(parts), path)
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite registry for the module; each test registers its own model name."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = registry.registry_client(uri)
    exp = client.create_experiment("ads-relevance", artifact_location=(root / "artifacts").as_uri())
    return {"uri": uri, "client": client, "exp": exp, "root": root}


@pytest.fixture
def cfg():
    return config_from_dict({"monitoring": {"bootstrap_rounds": 100, "min_auc": 0.55}})


def aliases(client, name) -> dict:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def test_first_champion_needs_every_scenario_above_min_auc(store, eval_path, cfg):
    c, score = store["client"], make_score_fn(store["uri"], store["root"] / "cache")
    v1 = register(c, "first", {"noise": 0.0}, store["exp"], store["root"])
    strict = config_from_dict({"monitoring": {"bootstrap_rounds": 50, "min_auc": 0.999}})
    outcome = run(strict, eval_path, candidate=v1, name="first", tracking_uri=store["uri"], score_fn=score)
    res = outcome.info
    assert outcome.exit_code == GATE_FAILED and not res["passed"] and len(res["reasons"]) == len(CATEGORIES)
    assert all("monitoring.min_auc" in r for r in res["reasons"]) and aliases(c, "first") == {}
    res = run(cfg, eval_path, candidate=v1, name="first", tracking_uri=store["uri"], score_fn=score).info
    assert res["passed"] and res["champion_version"] is None and aliases(c, "first") == {"champion": v1}
    history = registry.decisions(c, "first", v1)
    assert [h["decision"] for h in history] == ["rejected", "promoted"]
    assert all(h["by"] and h["at"] and "metrics" in h for h in history)


def test_better_candidate_becomes_champion_and_old_one_previous(store, eval_path, cfg):
    c, score = store["client"], make_score_fn(store["uri"], store["root"] / "cache")
    v1 = register(c, "better", {"noise": 0.25, "seed": 1}, store["exp"], store["root"])
    v2 = register(c, "better", {"noise": 0.0}, store["exp"], store["root"])
    loose = config_from_dict({"monitoring": {"bootstrap_rounds": 50, "min_auc": 0.0}})
    assert run(loose, eval_path, candidate=v1, name="better", tracking_uri=store["uri"], score_fn=score).info["passed"]
    c.set_registered_model_alias("better", "challenger", v2)
    res = run(cfg, eval_path, candidate="challenger", name="better", tracking_uri=store["uri"], score_fn=score).info
    assert res["passed"], res["reasons"]
    assert (res["candidate_version"], res["champion_version"]) == (v2, v1)
    assert aliases(c, "better") == {"champion": v2, "previous": v1, "challenger": v2}
    m = res["metrics"]
    assert m["auc_macro"]["candidate"] >= m["auc_macro"]["champion"]
    for name, d in m["delta"].items():
        assert d["ci_low"] <= d["delta"] <= d["ci_high"]
        assert d["delta"] == pytest.approx(m["candidate"][name]["auc"] - m["champion"][name]["auc"])
    tags = c.get_model_version("better", v2).tags
    assert tags["promotion.decision"] == "promoted" and json.loads(tags["promotion.reasons"]) == []
    assert json.loads(tags["promotion.metrics"])["candidate"].keys() == set(CATEGORIES)
    assert c.get_model_version("better", v1).tags["demotion.replaced_by"] == v2
    # The alias resolves to the new champion's artifact.
    local = download_model("models:/better@champion", store["uri"], store["root"] / "dl")
    assert json.loads((Path(local) / "scorer.json").read_text()) == {"noise": 0.0}

    out = rollback("better", store["uri"])
    assert out == {"champion_version": v1, "rolled_back_version": v2}
    assert aliases(c, "better") == {"champion": v1, "challenger": v2}
    assert c.get_model_version("better", v2).tags["rollback.decision"] == "removed from champion"
    with pytest.raises(RelevanceError, match="previous"):
        rollback("better", store["uri"])


@pytest.mark.parametrize("spec, expect", [
    ({"noise": 0.3, "seed": 2}, "AUC fell"),              # worse everywhere
    ({"invert": ["shoes"]}, "scenario 'shoes': AUC fell"),  # one scenario regresses
    ({"drop": ["watches"]}, "'watches': candidate AUC missing (no rows scored)"),
    ({"nan": ["cameras"]}, "'cameras': candidate AUC missing"),
])
def test_rejected_candidate_moves_nothing_and_is_tagged_with_reasons(store, eval_path, cfg, spec, expect):
    c, score = store["client"], make_score_fn(store["uri"], store["root"] / "cache")
    name = "reject-" + "-".join(spec)
    champion = register(c, name, {"noise": 0.0}, store["exp"], store["root"])
    c.set_registered_model_alias(name, "champion", champion)
    cand = register(c, name, spec, store["exp"], store["root"])
    res = run(cfg, eval_path, candidate=cand, name=name, tracking_uri=store["uri"], score_fn=score).info
    assert not res["passed"] and any(expect in r for r in res["reasons"]), res["reasons"]
    assert aliases(c, name) == {"champion": champion}
    tags = c.get_model_version(name, cand).tags
    assert tags["promotion.decision"] == "rejected" and json.loads(tags["promotion.reasons"]) == res["reasons"]
    assert tags["promotion.champion_version"] == champion


def test_identical_quality_passes_and_same_version_is_refused(store, eval_path, cfg):
    c, score = store["client"], make_score_fn(store["uri"], store["root"] / "cache")
    v1 = register(c, "same", {"noise": 0.1, "seed": 5}, store["exp"], store["root"])
    v2 = register(c, "same", {"noise": 0.1, "seed": 5}, store["exp"], store["root"])
    c.set_registered_model_alias("same", "champion", v1)
    res = run(cfg, eval_path, candidate=v2, name="same", tracking_uri=store["uri"], score_fn=score).info
    assert res["passed"]
    assert all(d["delta"] == d["ci_low"] == d["ci_high"] == 0 for d in res["metrics"]["delta"].values())
    res = run(cfg, eval_path, candidate="champion", name="same", tracking_uri=store["uri"], score_fn=score).info
    assert not res["passed"] and "already the champion" in res["reasons"][0]


def _fake_scenario(auc: float, deltas: np.ndarray) -> dict:
    return {"auc": auc, "auc_samples": deltas}


def test_gate_tells_noise_from_regression():
    """A drop beyond the tolerance fails only when the paired CI of the change excludes zero."""
    cfg = config_from_dict({"monitoring": {"auc_tolerance": 0.01}})
    base = np.linspace(0.70, 0.90, 200)
    champ = {"noisy": _fake_scenario(0.80, base), "real": _fake_scenario(0.80, base),
             "small": _fake_scenario(0.80, base), "gain": _fake_scenario(0.70, base)}
    cand = {"noisy": _fake_scenario(0.77, base + np.linspace(-0.08, 0.02, 200)),   # CI of change spans 0
            "real": _fake_scenario(0.77, base + np.linspace(-0.05, -0.01, 200)),   # CI entirely below 0
            "small": _fake_scenario(0.795, base - 0.005),                          # significant but < tolerance
            "gain": _fake_scenario(0.80, base + 0.1)}
    reasons, comparison = gate(cand, {}, champ, cfg)
    assert len(reasons) == 1 and reasons[0].startswith("scenario 'real'")
    assert comparison["auc_macro"]["candidate"] > comparison["auc_macro"]["champion"]
    cand["gain"] = _fake_scenario(0.70, base)
    reasons, _ = gate(cand, {}, champ, cfg)
    assert any(r.startswith("macro AUC fell") for r in reasons)


def test_cli_rollback_and_input_errors(store, capsys):
    c = store["client"]
    v1 = register(c, "cli", {"noise": 0.0}, store["exp"], store["root"])
    v2 = register(c, "cli", {"noise": 0.0}, store["exp"], store["root"])
    c.set_registered_model_alias("cli", "champion", v2)
    c.set_registered_model_alias("cli", "previous", v1)
    assert main(["--name", "cli", "--rollback", "--tracking-uri", store["uri"]]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["champion_version"] == v1
    assert main(["--name", "cli", "--rollback", "--tracking-uri", store["uri"]]) == EXIT_INPUT
    assert main(["--name", "no-such-model", "--rollback", "--tracking-uri", store["uri"]]) == EXIT_INPUT
    assert main(["--name", "cli", "--candidate", "nope", "--eval", "x.parquet", "--tracking-uri", store["uri"]]) \
        == EXIT_INPUT
    assert "no version or alias 'nope'" in capsys.readouterr().err


def test_promotion_and_rollback_against_a_real_mlflow_server(tmp_path, eval_path, cfg):
    with MlflowServer(tmp_path / "server") as uri:
        client = MlflowClient(tracking_uri=uri)
        exp = client.create_experiment("ads-relevance")
        score = make_score_fn(uri, tmp_path / "cache")
        v1 = register(client, "served", {"noise": 0.25, "seed": 1}, exp, tmp_path)
        v2 = register(client, "served", {"noise": 0.0}, exp, tmp_path)
        loose = config_from_dict({"monitoring": {"bootstrap_rounds": 50, "min_auc": 0.0}})
        assert run(loose, eval_path, candidate=v1, name="served", tracking_uri=uri, score_fn=score).info["passed"]
        res = run(cfg, eval_path, candidate=v2, name="served", tracking_uri=uri, score_fn=score).info
        assert res["passed"], res["reasons"]
        assert aliases(client, "served") == {"champion": v2, "previous": v1}
        assert client.get_model_version("served", v2).tags["promotion.decision"] == "promoted"
        assert rollback("served", uri)["champion_version"] == v1
        assert aliases(client, "served") == {"champion": v1}


def test_a_champion_moved_during_the_gate_is_gated_against_anew(store, eval_path, cfg):
    """An alias set outside the lease (the UI, another tool) while the gate scores the champion: the final
    check sees it, the candidate is gated again against the new champion, which becomes ``previous``."""
    c, real = store["client"], make_score_fn(store["uri"], store["root"] / "cache")
    v1 = register(c, "moved", {"noise": 0.3, "seed": 3}, store["exp"], store["root"])
    v2 = register(c, "moved", {"noise": 0.2, "seed": 4}, store["exp"], store["root"])
    v3 = register(c, "moved", {"noise": 0.0}, store["exp"], store["root"])
    c.set_registered_model_alias("moved", "champion", v1)
    scored = []

    def score(model_uri: str, path: str):
        scored.append(model_uri.rsplit("/", 1)[1])
        if scored == [v3, v1]:  # while the old champion is being scored, someone points the alias at v2
            c.set_registered_model_alias("moved", "champion", v2)
        return real(model_uri, path)

    res = run(cfg, eval_path, candidate=v3, name="moved", tracking_uri=store["uri"], score_fn=score).info
    assert scored == [v3, v1, v2]  # each version scored once
    assert res["passed"] and res["champion_version"] == v2 and res["regated_from"] == [v1]
    assert aliases(c, "moved") == {"champion": v3, "previous": v2}
    tags = c.get_model_version("moved", v3).tags
    assert json.loads(tags["promotion.compared"]) == {"candidate": v3, "champion": v2}
    assert json.loads(tags["promotion.regated_from"]) == [v1] and tags["promotion.champion_version"] == v2
    assert json.loads(tags["promotion.metrics"])["delta"].keys() == set(CATEGORIES)
