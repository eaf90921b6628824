"""Promotions of one registered model at the same moment, as separate ``python -m monitoring.promote``
processes against one real ``mlflow server`` on 127.0.0.1, and the promotion lease they share
(serving.registry.lease): one champion, gated against the version it replaced, whatever the interleaving.

The two registered versions are real exports of one tiny model: A, and A with its classifier negated, whose
scores are 1 - A's, so per scenario AUC(B) = 1 - AUC(A) and the macro gate passes exactly one of them
against the other: the order in which they are promoted decides what a serial run ends with.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from kernel.config import config_from_dict
from kernel.errors import LeaseBusy, LeaseLost
from monitoring.promote import as_arrays, evaluate, gate
from serving.registry.lease import OWNER, TOKEN, PromotionLease, lease_name, tombstone_name
from serving.scoring.table import score_table
from tests.mlflow_testkit import MlflowServer
from tests.serving_testkit import SCENARIOS, canonical, export, trained_folder, wdc_raw
from tests.shared import REPO

RACES = 3
GATE = ["monitoring.min_auc=0", "monitoring.bootstrap_rounds=50"]


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    """A real MLflow server holding two exports (A and inverted A) as runs' ``model`` artifacts, the pinned
    evaluation set, and every eval row's score under each export (scored in this process)."""
    root = tmp_path_factory.mktemp("race")
    eval_path = root / "eval.parquet"
    pq.write_table(canonical(wdc_raw("test", per_category=40)), eval_path)
    exports = {}
    model_dir = trained_folder(root / "a")
    export(model_dir, root / "export-a")
    weights = load_file(str(model_dir / "trainable.safetensors"))
    for key in ("backbone.classifier.weight", "backbone.classifier.bias"):
        weights[key] = -weights[key]  # logit -> -logit: every score p becomes 1 - p
    save_file(weights, str(model_dir / "trainable.safetensors"))
    export(model_dir, root / "export-b")
    server = MlflowServer(root / "server")
    uri = server.start()
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.create_experiment("race")
        for label in ("a", "b"):
            run_id = client.create_run(exp).info.run_id
            client.log_artifacts(run_id, str(root / f"export-{label}"), "model")
            client.set_terminated(run_id)
            exports[label] = run_id
        table = pq.read_table(eval_path)
        scores = {label: score_table(root / f"export-{label}", table) for label in ("a", "b")}
        yield {"uri": uri, "client": client, "runs": exports, "eval": str(eval_path), "scores": scores,
               "root": root}
    finally:
        server.stop()


def new_model(srv: dict, name: str) -> dict[str, str]:
    """A registered model with version 1 = A and version 2 = B; {"a": "1", "b": "2"}."""
    client = srv["client"]
    client.create_registered_model(name)
    return {label: str(client.create_model_version(name, f"runs:/{run}/model", run).version)
            for label, run in srv["runs"].items()}


def promoter(srv: dict, name: str, candidate: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "monitoring.promote", "--name", name, "--candidate", candidate,
                             "--eval", srv["eval"], "--tracking-uri", srv["uri"], *GATE, *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def serial_champions(srv: dict, cfg) -> set[str]:
    """The champion each serial order of promoting A and B ends with, computed here with the gate's own rules
    on this process's scores (first champion: min_auc 0 passes)."""
    metrics = {label: evaluate(*as_arrays(t, label), cfg) for label, t in srv["scores"].items()}
    ends = set()
    for first, second in (("a", "b"), ("b", "a")):
        reasons, _ = gate(*metrics[second], metrics[first][0], cfg)
        ends.add(second if not reasons else first)
    return ends


def macro_auc(table) -> float:
    """Independent of evaluation.metrics: sklearn's AUC per scenario, averaged."""
    s, y, p = (np.asarray(table[c].to_pylist()) for c in ("scenario", "label", "score"))
    return float(np.mean([roc_auc_score(y[s == n], p[s == n]) for n in SCENARIOS]))


def promotions(client, name: str, versions: list[str]) -> list[dict]:
    """Every promotion decision on the model's versions, in the order they were recorded."""
    found = []
    for v in versions:
        for key, value in client.get_model_version(name, v).tags.items():
            if key.startswith("history.") and key.endswith(".promotion"):
                found.append((key.split(".")[1], {"version": v, **json.loads(value)}))
    return [d for _, d in sorted(found, key=lambda x: x[0])]


def test_concurrent_promotions_end_with_one_champion_gated_against_the_one_it_replaced(registry_server):
    srv, client = registry_server, registry_server["client"]
    cfg = config_from_dict({"monitoring": {"min_auc": 0.0, "bootstrap_rounds": 50}})
    possible = serial_champions(srv, cfg)
    macro = {label: macro_auc(t) for label, t in srv["scores"].items()}
    consistent = 0
    for race in range(RACES):
        name = f"race-{race}"
        versions = new_model(srv, name)
        label_of = {v: label for label, v in versions.items()}
        procs = [promoter(srv, name, v) for v in versions.values()]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode in (0, 4) for p in procs), [o[-2000:] for o in outs]
        aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
        decisions = promotions(client, name, list(versions.values()))
        assert len(decisions) == 2, decisions
        # The promotions form one chain: each promoted candidate was gated against the champion before it.
        champion = previous = None
        compared = []
        for d in decisions:
            assert d["champion_version"] == (champion or ""), (race, decisions)
            compared.append({"candidate": d["version"], "champion": champion})
            if d["decision"] == "promoted":
                previous, champion = champion, d["version"]
                # The gate's macro rule, recomputed with sklearn: a promoted candidate's macro AUC did not fall.
                if previous is not None:
                    assert macro[label_of[d["version"]]] >= macro[label_of[previous]]
            else:
                assert d["reasons"] and champion is not None
        assert aliases.get("champion") == champion and label_of[champion] in possible, (race, aliases, decisions)
        assert aliases.get("previous") == previous, (race, aliases, decisions)
        assert [d["compared"] for d in decisions] == compared  # the decision tags say what was compared
        consistent += 1
        with pytest.raises(MlflowException):  # each promoter released its lease
            client.get_registered_model(lease_name(name))
    assert consistent == RACES


def test_a_killed_holder_blocks_only_until_its_lease_expires(registry_server, tmp_path):
    """A process holding the lease is killed (-9); a promotion started then waits for the expiry (not for
    monitoring.promotion_wait_s), takes the lease over, promotes, and leaves the dead holding's tombstone."""
    srv, client = registry_server, registry_server["client"]
    versions = new_model(srv, "killed")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from serving.registry.lease import PromotionLease; "
        f"PromotionLease({srv['uri']!r}, 'killed', ttl_s=4).acquire(); print('held', flush=True); time.sleep(600)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    dead = client.get_registered_model(lease_name("killed")).tags
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.time()
    proc = promoter(srv, "killed", versions["a"], "monitoring.promotion_wait_s=120")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert time.time() - t0 < 100  # the expired lease was taken over, not waited out
    assert str(client.get_registered_model("killed").aliases["champion"]) == versions["a"]
    tomb = client.get_registered_model(tombstone_name("killed", dead[TOKEN])).tags
    assert tomb[OWNER] == dead[OWNER] and tomb[TOKEN] == dead[TOKEN]


def test_the_lease_is_renewed_while_held_and_refuses_a_holder_that_lost_it(registry_server):
    uri = registry_server["uri"]
    client = registry_server["client"]
    client.create_registered_model("held")
    first = PromotionLease(uri, "held", ttl_s=2, wait_s=1, poll_s=0.1).acquire()
    time.sleep(3)  # past one ttl: only renewal keeps it
    with pytest.raises(LeaseBusy, match="another promotion holds its lease"):
        PromotionLease(uri, "held", ttl_s=2, wait_s=1, poll_s=0.1).acquire()
    first.check()
    first._stop.set()  # renewal stops (a hung holder): the lease lapses and is taken over
    first._thread.join()
    second = PromotionLease(uri, "held", ttl_s=30, wait_s=10, poll_s=0.1).acquire()
    assert second.took_over and second.took_over[0][TOKEN] == first.token
    with pytest.raises(LeaseLost):
        first.check()
    first.release()  # must not delete the new holder's lease
    assert client.get_registered_model(lease_name("held")).tags[TOKEN] == second.token
    # A waiter that saw the same expired holding late cannot retire the new one: the tombstone name is taken.
    second._take_over({TOKEN: first.token, OWNER: "late"})
    assert client.get_registered_model(lease_name("held")).tags[TOKEN] == second.token
    second.release()
    with pytest.raises(MlflowException):
        client.get_registered_model(lease_name("held"))
