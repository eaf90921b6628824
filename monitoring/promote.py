"""Promotion gate of the MLflow model registry: a candidate replaces ``champion`` only if it is no worse.

    python -m monitoring.promote --name ads-relevance --candidate 7 --eval data/pinned_eval.parquet
    python -m monitoring.promote --name ads-relevance --candidate challenger --eval ... --tracking-uri URI
    python -m monitoring.promote --name ads-relevance --rollback

    outcome = run(cfg, "data/pinned_eval.parquet", candidate="7")   # the stage; the job calls it too

The candidate (a version number or an alias) and the current ``champion`` are scored on the same pinned,
labelled evaluation set. Per scenario the AUC change gets a paired bootstrap CI (both models see the same
resamples, see ``evaluation.metrics``). The gate passes when:
  * no scenario's AUC falls by more than ``monitoring.auc_tolerance`` *and* significantly (the upper end of
    the 95% CI of the change is below zero): a drop inside the noise is not a regression;
  * the macro AUC over the scenarios both models score does not fall;
  * no scenario's metric is missing for the candidate (no rows scored, non-finite scores, a single class);
  * with no champion yet: every scenario's AUC is at least ``monitoring.min_auc``;
  * a scenario the champion has no metric for (a new market it does not serve) is held to the same floor:
    its AUC is at least ``monitoring.min_auc``;
  * every scenario in ``require`` (the job passes the champion's scenarios) has rows in the evaluation set:
    a scenario that is not evaluated cannot be shown not to regress.
The evaluation set may be several Parquet files or folders (the job adds ``monitoring.gate_eval`` to its test
split, so that a run whose data holds only a new market still compares the known scenarios).
Pass: ``previous`` -> the old champion, ``champion`` -> the candidate. Fail: no alias moves. Either way the
candidate is tagged with the decision (who, when, metrics, reasons; see ``serving.registry.aliases``).
``--rollback`` points ``champion`` back at ``previous`` and clears ``previous``. Aliases only: no stages.

Promotions of one registered model at the same time (two jobs, a manual run beside the nightly one) are
serialised: the champion is read, gated against and replaced under the model's promotion lease
(serving.registry.lease: a lock in the registry itself, renewed while held, taken over once expired, so a
killed promoter does not block the next one; ``monitoring.promotion_lease_s``, ``promotion_wait_s``), and
read again right before the switch (a champion moved outside the lease is gated against anew). Whatever the
interleaving, there is one champion, gated against the version it replaced, ``previous`` names that version
(or is cleared when there was none), and the candidate's ``promotion.compared`` tag says what was compared.

Exit codes (kernel.exit_codes): 0 promoted / rolled back; 2 bad input (unknown model, version, alias,
unreadable eval set); 4 the gate failed (nothing moved; the reasons are printed and tagged); 5 the MLflow
server did not answer; 8 another promotion held the lease past ``monitoring.promotion_wait_s``, or this one
lost it (nothing moved).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from evaluation.metrics import scenario_metrics, summarize
from kernel import exit_codes
from kernel.config import Config, add_config_args, load_config
from kernel.errors import ConfigError, DataError, RelevanceError
from kernel.logs import add_logging_args, setup_from_args
from kernel.metric_names import EVAL_SET
from kernel.stage import Outcome
from pipeline.reader import ParquetSource
from serving.registry import aliases as registry
from serving.registry.lease import PromotionLease
from serving.scoring.table import score_table

EXIT_OK, EXIT_INPUT, EXIT_REJECTED = exit_codes.OK, exit_codes.BAD_INPUT, exit_codes.GATE_FAILED
log = logging.getLogger(__name__)
MAX_REGATES = 3  # the champion moving this often during one gate means something bypasses the lease
ScoreFn = Callable[[str, str], "pa.Table | tuple[np.ndarray, np.ndarray, np.ndarray]"]


def default_score_fn(model_uri: str, eval_path: str, tracking_uri: str | None = None) -> pa.Table:
    """Score the evaluation Parquet (canonical columns; a file or folder, local or a URI) with the batch
    scorer, ``serving.scorer.score_table``. Rows of a scenario the model does not know come back with a null
    score, which the gate reports as that scenario's missing metric.
    """
    table = ParquetSource.open(eval_path, "evaluation set").dataset.to_table()
    return score_table(model_uri, table, tracking_uri=tracking_uri)


def as_arrays(result, who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scenarios str, labels int8, scores float64) from a table with scenario/label/score or a 3-tuple."""
    if isinstance(result, pa.Table):
        missing = {"scenario", "label", "score"} - set(result.column_names)
        if missing:
            raise DataError(f"scores of {who}: columns {sorted(missing)} missing (has {result.column_names})")
        if result["label"].null_count:
            raise DataError(f"scores of {who}: column label has {result['label'].null_count} nulls; "
                            "the evaluation set must be fully labelled")
        result = (result["scenario"].to_numpy(zero_copy_only=False), result["label"].to_numpy(),
                  result["score"].to_numpy(zero_copy_only=False))
    s, y, p = (np.asarray(a) for a in result)
    if not len(s) == len(y) == len(p):
        raise DataError(f"scores of {who}: lengths differ (scenarios {len(s)}, labels {len(y)}, scores {len(p)})")
    return s.astype(str), y.astype(np.int8), np.asarray(p, dtype=np.float64)


def evaluate(scenarios, labels, scores, cfg: Config) -> tuple[dict, dict]:
    """Per-scenario metrics (+ ``auc_samples``, the bootstrap draws) and the reasons some are missing.

    Scenarios with non-finite or out-of-range scores get no metrics; that is a reason, not an exception.
    """
    mon = cfg.monitoring
    bad = ~np.isfinite(scores) | (scores < 0) | (scores > 1)
    invalid = {}
    for name in sorted(set(scenarios[bad].tolist())):
        m = scenarios == name
        invalid[name] = f"{int(bad[m].sum())} of {int(m.sum())} scores are missing or not probabilities in [0, 1]"
    keep = ~np.isin(scenarios, list(invalid))
    per = scenario_metrics(scenarios[keep], labels[keep], scores[keep], bootstrap_rounds=mon.bootstrap_rounds,
                           seed=mon.seed, bins=mon.calibration_bins, keep_samples=True)
    for name, m in per.items():
        if m["auc"] is None:
            invalid[name] = m["reason"]
    return per, invalid


def gate(cand: dict, cand_invalid: dict, champ: dict | None, cfg: Config,
         require: list[str] | None = None) -> tuple[list[str], dict]:
    """Reasons to reject (empty: pass) and the comparison record. ``champ`` None: first champion. ``require``:
    scenarios that must have been evaluated (see the module docstring)."""
    mon = cfg.monitoring
    reasons, delta, new = [], {}, []
    names = sorted(set(cand) | set(cand_invalid) | set(champ or {}))
    for name in sorted(set(require or []) - set(names)):
        reasons.append(f"scenario {name!r}: no rows in the evaluation set, so it cannot be compared with the "
                       "champion (add labelled rows of it: monitoring.gate_eval)")
    for name in names:
        c = cand.get(name)
        if name in cand_invalid or c is None:
            why = cand_invalid.get(name, "no rows scored")
            reasons.append(f"scenario {name!r}: candidate AUC missing ({why})")
            continue
        if champ is None:
            if c["auc"] < mon.min_auc:
                reasons.append(f"scenario {name!r}: AUC {c['auc']:.4f} < monitoring.min_auc {mon.min_auc} "
                               "(no champion yet)")
            continue
        h = champ.get(name)
        if h is None or h["auc"] is None:  # the champion does not serve it (a new market): the first-champion floor
            new.append(name)
            if c["auc"] < mon.min_auc:
                reasons.append(f"scenario {name!r}: AUC {c['auc']:.4f} < monitoring.min_auc {mon.min_auc} "
                               "(the champion has no metric for it: a new scenario)")
            continue
        d = c["auc"] - h["auc"]
        lo = hi = d
        if len(c["auc_samples"]) and len(c["auc_samples"]) == len(h["auc_samples"]):
            lo, hi = (float(v) for v in np.percentile(c["auc_samples"] - h["auc_samples"], [2.5, 97.5]))
        delta[name] = {"delta": d, "ci_low": lo, "ci_high": hi}
        if d < -mon.auc_tolerance and hi < 0:
            reasons.append(f"scenario {name!r}: AUC fell {-d:.4f} ({h['auc']:.4f} -> {c['auc']:.4f}; 95% CI of the "
                           f"change [{lo:.4f}, {hi:.4f}]), more than monitoring.auc_tolerance {mon.auc_tolerance}")
    macro = {"candidate": None, "champion": None}
    if champ is not None and delta:
        common = sorted(delta)
        macro = {"candidate": float(np.mean([cand[n]["auc"] for n in common])),
                 "champion": float(np.mean([champ[n]["auc"] for n in common]))}
        if macro["candidate"] < macro["champion"] - 1e-12:
            reasons.append(f"macro AUC fell: {macro['champion']:.4f} -> {macro['candidate']:.4f} "
                           f"over scenarios {common}")
    return reasons, {"delta": delta, "auc_macro": macro, "new_scenarios": new}


def _compact(per: dict | None) -> dict | None:
    if per is None:
        return None
    keys = ("n", "positives", "auc", "auc_ci_low", "auc_ci_high", "pr_auc", "log_loss", "ece")
    return {name: {k: m[k] for k in keys} for name, m in per.items()}


def run(cfg: Config, eval_path: str | Path | list | None = None, *, candidate: str, name: str | None = None,
        tracking_uri: str | None = None, score_fn: ScoreFn | None = None, about: dict | None = None,
        eval_data: str = EVAL_SET, require: list[str] | None = None) -> Outcome:
    """The promotion gate of ``candidate`` (a version number or an alias) of registered model ``name``
    (default ``tracking.registered_model``) on the pinned, labelled ``eval_path`` (default
    ``data.score_input``): move the aliases on a pass; tag the candidate either way and write its description
    (``registry.version_description``: ``about`` says what the model is). ``eval_path`` may be a list (each
    scored, the rows pooled); ``require``: scenarios that must be evaluated. See the module docstring.
    ``eval_data`` names the evaluation data in the description and the outcome (kernel.metric_names: eval_set,
    a pinned set; test_split, the ingest's test split, when the job gates on it).

    The candidate is scored first; the champion is read, scored and gated, and the aliases moved, under the
    model's promotion lease (serving.registry.lease), and the champion is read again right before the
    switch: if it moved meanwhile (an alias set outside the lease), the candidate is gated again against the
    new one. So whatever runs at the same time, a candidate replaces exactly the champion it was gated against.

    Outcome info: passed, reasons, candidate_version, champion_version (the one it was gated against),
    regated_from (champions that moved away during the gate), metrics, eval_path, eval_data; exit code
    GATE_FAILED when the candidate was rejected (nothing moved)."""
    name = name or cfg.tracking.registered_model
    tracking_uri = tracking_uri or cfg.tracking_uri
    eval_path = eval_path or cfg.data.score_input
    if not eval_path:
        raise ConfigError("--eval (or data.score_input): a pinned, labelled evaluation Parquet is required")
    score_fn = score_fn or functools.partial(default_score_fn, tracking_uri=tracking_uri)
    client = registry.registry_client(tracking_uri)
    cand_version = str(registry.resolve_version(client, name, candidate).version)
    scored: dict[str, tuple[dict, dict]] = {}

    paths = [str(p) for p in eval_path] if isinstance(eval_path, (list, tuple)) else [str(eval_path)]

    def metrics_of(version: str) -> tuple[dict, dict]:
        if version not in scored:
            parts = [as_arrays(score_fn(registry.model_uri(name, version), p), f"version {version} on {p}")
                     for p in paths]
            scored[version] = evaluate(*(np.concatenate([part[i] for part in parts]) for i in range(3)), cfg)
        return scored[version]

    metrics_of(cand_version)  # the candidate's scores do not depend on the champion: outside the lease
    mon = cfg.monitoring
    with PromotionLease(tracking_uri, name, ttl_s=mon.promotion_lease_s, wait_s=mon.promotion_wait_s) as lease:
        result = _gate_and_switch(client, name, cand_version, metrics_of, lease, cfg, require)
    registry.record_decision(client, name, cand_version, "promotion", {
        "decision": "promoted" if result["passed"] else "rejected", "reasons": result["reasons"],
        "metrics": result["metrics"], "champion_version": result["champion_version"] or "",
        "compared": {"candidate": cand_version, "champion": result["champion_version"]},
        "regated_from": result["regated_from"], "eval_path": ",".join(paths), "eval_data": eval_data,
        "lease": lease.token})
    result.update(eval_path=",".join(paths), eval_data=eval_data)
    registry.describe_version(client, name, cand_version, about, result)
    return Outcome(result, [], EXIT_OK if result["passed"] else EXIT_REJECTED)


def _gate_and_switch(client, name: str, cand_version: str, metrics_of, lease: PromotionLease, cfg: Config,
                     require: list[str] | None) -> dict:
    """Under the lease: gate against the champion, check the lease and that the champion did not move, and
    on a pass move ``previous`` and ``champion``. The result as run() describes it; ``require``: as run()."""
    regated: list[str | None] = []
    champ_version = _champion(client, name)
    for _ in range(MAX_REGATES + 1):
        cand_per, cand_invalid = metrics_of(cand_version)
        champ_per = None
        if champ_version == cand_version:
            reasons, comparison = [f"version {cand_version} is already the champion"], {}
        else:
            if champ_version is not None:
                champ_per, _ = metrics_of(champ_version)
            reasons, comparison = gate(cand_per, cand_invalid, champ_per, cfg,
                                       require if champ_per is not None else None)
        lease.check()  # from here to the last alias write the lease must be ours (LeaseLost: nothing moved)
        now = _champion(client, name)
        if now == champ_version:
            break
        regated.append(champ_version)  # moved outside the lease while we gated: gate against the new one
        champ_version = now
    else:
        raise RelevanceError(f"registered model {name!r}: the champion moved {MAX_REGATES + 1} times while version "
                             f"{cand_version} was gated (via {regated}); something sets it outside the promotion "
                             "lease; nothing was moved")
    passed = not reasons
    if passed:
        switch_champion(client, name, cand_version, champ_version)
    metrics = {"candidate": _compact(cand_per), "champion": _compact(champ_per), **comparison,
               "candidate_summary": summarize(cand_per)}
    return {"passed": passed, "reasons": reasons, "candidate_version": cand_version,
            "champion_version": champ_version, "regated_from": regated, "metrics": metrics}


def _champion(client, name: str) -> str | None:
    mv = registry.alias_version(client, name, registry.CHAMPION)
    return str(mv.version) if mv else None


def switch_champion(client, name: str, new: str, old: str | None) -> None:
    """``previous`` -> ``old`` (cleared when there was no champion: it names the version replaced), then
    ``champion`` -> ``new``: a failure in between leaves the champion untouched."""
    if old is not None:
        registry.set_alias(client, name, registry.PREVIOUS, old)
        registry.record_decision(client, name, old, "demotion", {"decision": "previous", "replaced_by": new})
    else:
        registry.delete_alias(client, name, registry.PREVIOUS)
    registry.set_alias(client, name, registry.CHAMPION, new)


def rollback(name: str, tracking_uri: str, cfg: Config | None = None) -> dict:
    """``champion`` -> the version under ``previous``; ``previous`` is cleared. Both versions are tagged.
    Under the model's promotion lease, like a promotion."""
    mon = (cfg or Config()).monitoring
    client = registry.registry_client(tracking_uri)
    registry.alias_version(client, name, registry.CHAMPION)  # RelevanceError for an unknown model, before waiting
    with PromotionLease(tracking_uri, name, ttl_s=mon.promotion_lease_s, wait_s=mon.promotion_wait_s) as lease:
        return _rollback(client, name, lease)


def _rollback(client, name: str, lease: PromotionLease) -> dict:
    prev = registry.alias_version(client, name, registry.PREVIOUS)
    if prev is None:
        raise RelevanceError(f"registered model {name!r}: no {registry.PREVIOUS!r} alias to roll back to")
    cur = registry.alias_version(client, name, registry.CHAMPION)
    lease.check()
    registry.set_alias(client, name, registry.CHAMPION, prev.version)
    registry.delete_alias(client, name, registry.PREVIOUS)
    restored, rolled_back = str(prev.version), (str(cur.version) if cur else None)
    if rolled_back is not None:
        registry.record_decision(client, name, rolled_back, "rollback",
                                 {"decision": "removed from champion", "restored": restored})
    registry.record_decision(client, name, restored, "rollback",
                             {"decision": "restored as champion", "replaced": rolled_back or ""})
    return {"champion_version": restored, "rolled_back_version": rolled_back}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monitoring.promote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--candidate", help="version number or alias of the candidate")
    p.add_argument("--eval", dest="eval_path", help="pinned, labelled evaluation Parquet (default data.score_input)")
    p.add_argument("--rollback", action="store_true", help="restore the 'previous' version as champion")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: the config's)")
    add_config_args(p)
    add_logging_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    setup_from_args(args, "promote")
    if not args.rollback and not args.candidate:
        p.error("--candidate is required unless --rollback")

    def work() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.rollback:
            print(json.dumps(rollback(args.name, args.tracking_uri or cfg.tracking_uri, cfg), indent=1))
            return EXIT_OK
        outcome = run(cfg, args.eval_path, candidate=args.candidate, name=args.name, tracking_uri=args.tracking_uri)
        i = outcome.info
        if i["passed"]:
            log.info(f"version {i['candidate_version']} of {args.name} is champion")
        else:
            log.warning(f"promotion gate failed for version {i['candidate_version']}: {'; '.join(i['reasons'])}")
        print(json.dumps({k: outcome.info[k] for k in ("passed", "reasons", "candidate_version", "champion_version")},
                         indent=1))
        return outcome.exit_code

    return exit_codes.run_cli(work)


if __name__ == "__main__":
    raise SystemExit(main())
