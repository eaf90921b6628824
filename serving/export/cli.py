"""Export a trained MTL-LoRA model for serving: merged per-scenario checkpoints, a compact multi-scenario
artifact with standard PEFT adapters, and a manifest; optionally registered in the MLflow model registry.

    python -m serving.export --run <run id | training out dir | model dir> --out runs/demo/export
    python -m serving.export --run runs/demo/train --out runs/demo/export \\
        --valid runs/demo/data/valid.parquet --name ads-relevance --alias champion \\
        --tracking-uri sqlite:///runs/demo/mlflow.db

``--run`` takes an MLflow run id (its artifact ``model`` is downloaded), a training output folder (holding
``model/``) or a trained-model folder itself (config.yaml, task_map.json, trainable.safetensors). ZeRO-3
partitions are gathered by the trainer when it writes ``model/`` (``deepspeed.zero.GatheredParameters``
over every trainable parameter), so the folder read here always holds full tensors.

The layout written is described in ``serving.layout``; in short, per scenario ``scenarios/<s>/`` is a
plain checkpoint with ΔW_s merged in:

    AutoModelForSequenceClassification.from_pretrained("export/scenarios/cameras")   # pooling cls, last
    AutoModelForSequenceClassification.from_pretrained("export/scenarios/cameras", trust_remote_code=True)  # mean

(no built-in transformers class pools by a masked mean, so a mean-pooling checkpoint carries its model code,
``modeling_ads_relevance.py``; without ``trust_remote_code=True`` transformers refuses to load it rather than
guess a head). ``base/`` + ``factors.safetensors`` hold the base once and every scenario's LoRA pair;
``adapters/<s>/`` is the same pair for PEFT:
``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("export/base"), "export/adapters/cameras")``.

With ``--valid`` (a canonical Parquet, e.g. <work_dir>/data/valid.parquet) the export scores it, fits
per-scenario calibration (calibration.json), an F1-maximising threshold per scenario, and the drift
reference profile (reference.json). With ``--name`` the folder is logged as artifact ``model`` of a new
run (tagged with the source run) and registered, so ``models:/<name>@<alias>`` resolves to it.
``--config`` and ``key=value`` overrides set the export's deployment sections (serving, monitoring, tracking,
data mapping), which scoring uses as defaults; the sections the weights were trained with cannot change.

Exit codes: kernel.exit_codes (2: bad source, folder or config; 5: MLflow did not answer).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from evaluation.calibration import CALIBRATION_FILE, ScenarioCalibrator
from evaluation.drift import reference_profile, save_reference
from kernel import storage
from kernel.atomic import publish_dir, write_json_atomic
from kernel.config import Config, add_config_args, apply_overrides, config_from_dict, dump_config, load_config, to_dict
from kernel.errors import ConfigError, DataError
from kernel.exit_codes import run_cli
from kernel.hashing import fingerprint_files
from kernel.mlflow_client import mlflow_client
from kernel.task_map import TASK_MAP_FILE
from modeling.artifact import load_trained
from modeling.base import load_tokenizer
from modeling.inject import adapter_layers
from modeling.merge import base_backbone, merged_backbone, save_peft_adapter, save_plain
from modeling.pairs import resolve_pair_format
from serving.layout import (
    ADAPTERS_DIR,
    BASE_DIR,
    CALIBRATED_REFERENCE_FILE,
    FACTORS_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    REFERENCE_FILE,
    REGISTERED_FILE,
    SCENARIOS_DIR,
    factor_key,
    factors_digest,
    scenario_dirname,
)
from serving.registry.register import register_export
from serving.scoring.table import score_table

HEAD_FORMULA = ("score = sigmoid(head.weight @ mean_pool + head.bias); mean_pool = sum_i(mask_i * h_i) / "
                "max(sum_i mask_i, 1) over the backbone's last_hidden_state h (batch, tokens, hidden)")


def resolve_source(run: str, tracking_uri: str | None, scratch: Path) -> tuple[Path, str | None]:
    """(trained-model folder, source run id or None) for a run id, a training out dir or a model dir."""
    p = Path(run)
    if p.is_dir():
        for candidate in (p, p / "model"):
            if (candidate / "trainable.safetensors").is_file():
                return candidate, None
        raise DataError(f"--run {run}: neither {p} nor {p / 'model'} is a trained-model folder "
                        "(config.yaml, task_map.json, trainable.safetensors)")
    import mlflow

    if tracking_uri:
        mlflow_client(tracking_uri)  # bounded waits; an unreachable server is ServiceUnavailable, now
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run}/model", tracking_uri=tracking_uri,
                                                    dst_path=str(scratch))
    except Exception as e:  # MLflow raises its own exception types for unknown runs and artifacts
        raise DataError(f"--run {run}: not a folder, and no MLflow run with artifact 'model' at {tracking_uri} "
                        f"({type(e).__name__}: {e})") from e
    return Path(local), run


def _run_tags(run_id: str | None, tracking_uri: str | None) -> dict:
    if not run_id:
        return {}
    from mlflow.exceptions import MlflowException

    try:
        return dict(mlflow_client(tracking_uri).get_run(run_id).data.tags)
    except MlflowException as e:
        raise DataError(f"source run {run_id}: not found at {tracking_uri} ({e.message})") from e


ADAPTER_README = """# {scenario}: a PEFT LoRA adapter of {name}

One scenario of a multi-scenario MTL-LoRA relevance model, as a standard LoRA adapter (scaling 1):
lora_A = A ({r} x in), lora_B = U_t (out x {r}), so that W + lora_B @ lora_A is this scenario's merged weight.

Head weights that travel with this adapter (``modules_to_save``): {heads}. They are the trained relevance
head, shared by every scenario, and equal to those in the base folder.

    from peft import AutoPeftModelForSequenceClassification
    model = AutoPeftModelForSequenceClassification.from_pretrained("{folder}"{trust})
    score = torch.sigmoid(model(**tokenizer(...)).logits[:, 0])

The base is ``base_model_name_or_path`` in adapter_config.json ({base}); the tokenizer and the pair format
are in the export's manifest.json (``input``).
"""


def write_checkpoints(model, tokenizer, task_map, out: Path, final: Path | None = None) -> tuple[list[str], dict]:
    """base/, factors.safetensors, scenarios/<s>/ and adapters/<s>/ under ``out``; returns (layers, entries).
    ``final`` is where ``out`` will be published: the adapters name its base/ folder."""
    layers = adapter_layers(model.backbone)  # names relative to the backbone
    save_plain(model, base_backbone(model), out / BASE_DIR, tokenizer)
    factors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name in task_map.names:
        tid = task_map.id_of(name)
        for layer_name, layer in layers.items():
            a, u = layer.lora_pair(tid, dtype=torch.float32)  # (r, in), (out, r); ΔW = u @ a
            factors[factor_key(tid, layer_name, "A")] = a.contiguous().cpu()
            factors[factor_key(tid, layer_name, "U")] = u.contiguous().cpu()
        sub = scenario_dirname(name, tid)
        save_plain(model, merged_backbone(model, tid), out / SCENARIOS_DIR / sub, tokenizer)
        adapter = save_peft_adapter(model, tid, out / ADAPTERS_DIR / sub,
                                    base_path=str(storage.join(final, BASE_DIR)) if storage.is_uri(final or out)
                                    else str((Path(final or out) / BASE_DIR).resolve()))
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "README.md").write_text(ADAPTER_README.format(
            scenario=name, name="the relevance model", r=config["r"], heads=", ".join(config["modules_to_save"] or []),
            folder=f"{ADAPTERS_DIR}/{sub}", base=config["base_model_name_or_path"],
            trust=", trust_remote_code=True" if model.head is not None else ""))
        entries[name] = {"merged": f"{SCENARIOS_DIR}/{sub}", "adapter": f"{ADAPTERS_DIR}/{sub}"}
    save_file(factors, str(out / FACTORS_FILE))
    return sorted(layers), entries


def best_f1_thresholds(scenarios: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Per scenario, the score threshold that maximises F1 on the given rows (both classes needed)."""
    from sklearn.metrics import precision_recall_curve

    out = {}
    for name in sorted(set(scenarios.tolist())):
        m = scenarios == name
        if labels[m].min() == labels[m].max():
            continue
        prec, rec, thr = precision_recall_curve(labels[m], scores[m])
        f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        out[name] = float(thr[int(np.argmax(f1))])
    return out


def fit_on_validation(out: Path, valid: str | Path, cfg: Config, manifest: dict, method: str = "isotonic") -> None:
    """Score ``valid`` with the staged export; write calibration.json, the drift references and thresholds."""

    if not storage.is_file(valid):
        raise DataError(f"--valid {valid}: no such Parquet file")
    table = pq.read_table(valid)
    for col in ("query", "title", "scenario", "label"):
        if col not in table.column_names:
            raise DataError(f"--valid {valid}: column {col!r} is missing (canonical columns expected)")
    known = set(manifest["scenarios"])
    scored = score_table(out, table, calibrate=False)
    keep = np.array([s in known for s in scored["scenario"].to_pylist()])  # unknown scenarios: no fit
    scen = np.asarray(scored["scenario"].to_pylist(), dtype=object)[keep].astype(str)
    labels = scored["label"].to_numpy(zero_copy_only=False)[keep].astype(np.int64)
    raw = scored["score"].to_numpy(zero_copy_only=False)[keep].astype(np.float64)
    cal = ScenarioCalibrator.fit(scen, labels, raw, method=method)
    cal.save(out / CALIBRATION_FILE)
    calibrated = cal.apply(scen, raw)
    q_len = scored["query_len"].to_numpy(zero_copy_only=False)[keep]
    t_len = scored["title_len"].to_numpy(zero_copy_only=False)[keep]
    # Monitoring must compare like with like: one reference per kind of score the scorer can emit.
    save_reference(reference_profile(scen, raw, q_len, t_len), out / REFERENCE_FILE)
    save_reference(reference_profile(scen, calibrated, q_len, t_len), out / CALIBRATED_REFERENCE_FILE)
    manifest["calibration"] = {"file": CALIBRATION_FILE, "method": cal.method, "fitted_on": storage.name(valid),
                               "skipped": cal.skipped}
    manifest["reference"] = {"file": REFERENCE_FILE, "calibrated_file": CALIBRATED_REFERENCE_FILE}
    manifest["thresholds"] = {"f1_max_calibrated": best_f1_thresholds(scen, labels, calibrated)}


MODEL_SECTIONS = ("model", "adapter", "features", "train")  # what the trained weights depend on


def serving_config(trained: Config, config_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The trained config with the deployment sections (data mapping, serving, monitoring, tracking) taken from
    ``config_path`` and ``overrides``; the sections the weights depend on stay as trained (changing one is
    an error)."""
    overrides = list(overrides or [])
    touched = sorted({o.split("=", 1)[0] for o in overrides if o.split(".", 1)[0] in MODEL_SECTIONS})
    if touched:
        raise ConfigError(f"overrides {touched}: the exported weights were trained with these; retrain to change them")
    if not config_path and not overrides:
        return trained
    deployed = to_dict(load_config(config_path)) if config_path else to_dict(trained)
    apply_overrides(deployed, overrides)
    for section in MODEL_SECTIONS:
        deployed[section] = to_dict(trained)[section]
    deployed["work_dir"] = trained.work_dir
    return config_from_dict(deployed)


def export_model(run: str, out_dir: str | Path, valid: str | Path | None = None, tracking_uri: str | None = None,
                 name: str | None = None, alias: str | None = None, source_run_id: str | None = None,
                 calibration_method: str | None = None, config_path: str | Path | None = None,
                 overrides: list[str] | None = None, parent_run: str | None = None) -> dict:
    """Write the export folder and optionally register it; return the manifest.

    The folder is built beside ``out_dir`` and renamed into place, so readers see the old export or the
    new one, never a mix. An existing export there is replaced; any other non-empty folder is an error.
    ``source_run_id`` names the training run when ``run`` is a folder (recorded, tags read from it).
    ``calibration_method`` (isotonic, platt) defaults to the config's monitoring.calibration_method.
    ``config_path`` / ``overrides`` set the deployment sections of the exported config (``serving_config``):
    scoring reads its defaults (serving.*, data.columns) from the export.
    """

    remote = storage.is_uri(out_dir)
    out = str(out_dir).rstrip("/") if remote else Path(out_dir)
    if not remote and out.exists() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise DataError(f"--out {out} exists and is not an export folder (no {MANIFEST_FILE}); not replacing it")
    if not remote:
        out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=None if remote else out.parent) as scratch:
        model_dir, source_run = resolve_source(run, tracking_uri, Path(scratch))
        source_run = source_run or source_run_id
        trained, task_map, model = load_trained(model_dir)
        cfg = serving_config(trained, config_path, overrides)
        tracking_uri = tracking_uri or cfg.tracking_uri
        tags = _run_tags(source_run, tracking_uri)
        with storage.staging(out) as stage:
            tokenizer = load_tokenizer(cfg)
            layers, entries = write_checkpoints(model, tokenizer, task_map, stage, final=out)
            metrics = json.loads((model_dir / "metrics.json").read_text()) if (model_dir / "metrics.json").is_file() else {}
            digest = factors_digest(stage)
            fingerprint = tags.get("data_fingerprint") or (fingerprint_files([valid]) if valid else None)
            manifest = {
                "format_version": FORMAT_VERSION,
                "model_version": f"export-{digest}",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "pooling": cfg.model.pooling,
                "adapter_method": cfg.adapter.method,
                "max_length": cfg.features.max_length,
                "input": {"text_pair": ["query", "ad_text"], "truncation": "longest_first", "padding_side": "right",
                          "ad_text": "title | description | url (empty parts skipped)",
                          "pair_format": resolve_pair_format(tokenizer, cfg.features.pair_format).describe()},
                "score": "sigmoid(logit), then per-scenario calibration when serving.calibrate and calibration.json",
                "head": ({"formula": HEAD_FORMULA, "model_class": "AutoModelForSequenceClassification",
                          "trust_remote_code": True, "code": "modeling_ads_relevance.py"}
                         if cfg.model.pooling == "mean" else
                         {"backbone_class": "AutoModelForSequenceClassification", "formula": "sigmoid(logits[:, 0])"}),
                "base": BASE_DIR, "factors": FACTORS_FILE, "adapted_layers": layers,
                "task_map": TASK_MAP_FILE, "scenarios": entries,
                "calibration": None, "reference": None, "thresholds": None,
                "metrics": metrics,
                "source": {"run_id": source_run, "model_dir": str(model_dir) if source_run is None else f"runs:/{source_run}/model",
                           "git_commit": tags.get("git_commit")},
                "data_fingerprint": fingerprint,
                "config": "config.yaml",
            }
            write_json_atomic(stage / MANIFEST_FILE, manifest)
            dump_config(cfg, stage / "config.yaml")
            task_map.save(stage / TASK_MAP_FILE)  # a copy of the file ingestion wrote
            if valid:
                fit_on_validation(stage, valid, cfg, manifest,
                                  calibration_method or cfg.monitoring.calibration_method)
                write_json_atomic(stage / MANIFEST_FILE, manifest)
            if remote:  # every file, then the commit marker: readers trust the folder once it is complete
                storage.upload_dir(stage, out)
            else:
                publish_dir(stage, out)  # swap: the old export stays whole until the new one is in place
            local = stage if remote else out
            if name:
                example = pq.read_table(valid).slice(0, 3).to_pandas() if valid else None
                manifest["registered"] = register_export(
                    local, tracking_uri, cfg.tracking.experiment, name, alias, training_run=source_run,
                    parent_run=parent_run, example=example, timeout_s=cfg.tracking.timeout_s,
                    artifact_root=cfg.tracking.artifact_uri)
                if remote:  # beside the committed folder: which registry version this content is
                    storage.write_json(storage.join(out, REGISTERED_FILE), manifest["registered"])
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)  # deployment sections only: serving.*, monitoring.*, tracking.*, data.columns
    p.add_argument("--run", required=True, help="MLflow run id, training output dir (with model/) or model dir")
    p.add_argument("--out", required=True, type=Path, help="export folder to write")
    p.add_argument("--valid", type=Path, help="canonical validation Parquet: fit calibration, thresholds, drift reference")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the trained config's tracking URI)")
    p.add_argument("--name", help="register the export under this model name")
    p.add_argument("--alias", help="alias for the new version, e.g. champion or challenger")
    p.add_argument("--source-run-id", help="training run id to record when --run is a folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    return run_cli(lambda: _work(args))


def _work(args: argparse.Namespace) -> int:
    manifest = export_model(args.run, args.out, args.valid, args.tracking_uri, args.name, args.alias,
                            args.source_run_id, config_path=args.config, overrides=args.overrides)
    print(f"exported {len(manifest['scenarios'])} scenarios ({manifest['pooling']} pooling) to {args.out}")
    if "registered" in manifest:
        print(f"registered {manifest['registered']['uri']} (version {manifest['registered']['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
