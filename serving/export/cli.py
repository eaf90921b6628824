"""Export a trained MTL-LoRA model for serving: merged per-scenario checkpoints, a compact multi-scenario
artifact with standard PEFT adapters, and a manifest; optionally registered in the MLflow model registry.

    python -m serving.export --run <run id | training out dir | model dir> --out runs/demo/export
    run(export_config(model_dir), model_dir, "runs/demo/export", valid=...) -> Outcome     # the stage
    python -m serving.export --run runs/demo/train --out runs/demo/export \\
        --valid runs/demo/data/valid.parquet --name ads-relevance --alias champion \\
        --tracking-uri sqlite:///runs/demo/mlflow.db

``--run`` takes an MLflow run id (its artifact ``model`` is downloaded), a training output folder (holding
``model/``) or a trained-model folder itself (config.yaml, task_map.json, trainable.safetensors;
serving.export.source). ZeRO-3
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
data mapping), which scoring uses as defaults; the sections the weights were trained with cannot change
(``export_config``: ``main`` builds the config from the trained model, ``run`` checks it).

The steps: serving.export.source (the trained model and its config) -> serving.export.checkpoints (the
weights) -> serving.export.manifest -> serving.export.validation (with --valid) -> publication ->
serving.registry.register (with --name).

Exit codes: kernel.exit_codes (2: bad source, folder or config; 5: MLflow did not answer; 8: --out is not
writable (checked first), or the disk filled up: the previous export stays whole).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from kernel import storage
from kernel.atomic import publish_dir, write_json_atomic
from kernel.config import Config, add_config_args, dump_config, load_config
from kernel.environment import check_writable, writing
from kernel.errors import DataError
from kernel.exit_codes import OK, run_cli
from kernel.hashing import file_digest, fingerprint_files
from kernel.logs import add_logging_args, setup_from_args
from kernel.mlflow_client import VERSION_TAG
from kernel.provenance import provenance
from kernel.stage import Outcome
from kernel.task_map import TASK_MAP_FILE, TaskMap
from modeling.artifact import START_FILE, TRAINABLE_FILE, TRAINED_DIR, load_trained
from modeling.base import load_tokenizer
from serving.export.checkpoints import write_checkpoints
from serving.export.manifest import build_manifest
from serving.export.onnx_graphs import write_fp32_graphs
from serving.export.precision_gate import gate_precisions, served_summary
from serving.export.source import (
    CONFIG_FILE,
    check_trained_sections,
    export_config,
    run_tags,
    trained_metrics,
    trained_model,
)
from serving.export.validation import fit_on_validation, read_validation
from serving.layout import MANIFEST_FILE, REGISTERED_FILE, factors_digest
from serving.registry.register import register_export

log = logging.getLogger(__name__)


def run(cfg: Config, model_dir: str | Path, out: str | Path, *, valid: str | Path | None = None,
        tracking_uri: str | None = None, name: str | None = None, alias: str | None = None,
        source_run_id: str | None = None, calibration_method: str | None = None,
        parent_run: str | None = None) -> Outcome:
    """Export the trained-model folder ``model_dir`` to ``out`` (a local folder or an object-store URI) with
    the config ``cfg`` (``export_config``: as trained, deployment sections as deployed); register it as
    ``name`` (with ``alias``) when a name is given. Outcome.info: the manifest.

    The folder is built beside ``out`` and renamed into place (locally) or uploaded with its commit marker
    last, so readers see the old export or the new one, never a mix. An existing export there is replaced;
    any other non-empty folder is an error. ``source_run_id`` is the training run (recorded, its tags read).
    ``calibration_method`` (isotonic, platt) defaults to the config's monitoring.calibration_method.
    """
    remote = storage.is_uri(out)
    check_writable(out, "--out")  # before any work: the folder is built beside it and renamed into place
    out = str(out).rstrip("/") if remote else Path(out)
    if not remote and out.exists() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise DataError(f"--out {out} exists and is not an export folder (no {MANIFEST_FILE}); not replacing it")
    model_dir = Path(model_dir)
    trained, task_map, model = load_trained(model_dir)
    check_trained_sections(cfg, trained, model_dir)
    tracking_uri = tracking_uri or cfg.tracking_uri
    tags = run_tags(source_run_id, tracking_uri)
    with writing(out), storage.staging(out) as stage:  # a full disk names --out (exit 8)
        tokenizer = load_tokenizer(cfg)
        layers, entries = write_checkpoints(model, tokenizer, task_map, stage, final=out)
        code = provenance()  # the code that exports; the training run's tags say which code trained
        source = {"run_id": source_run_id, "git_commit": tags.get("git_commit") or code["git_commit"],
                  "version": tags.get(VERSION_TAG) or code["version"], "export_version": code["version"],
                  "model_dir": str(model_dir) if source_run_id is None else f"runs:/{source_run_id}/model"}
        fingerprint = tags.get("data_fingerprint") or (fingerprint_files([valid]) if valid else None)
        manifest = build_manifest(cfg, tokenizer, layers, entries, digest=factors_digest(stage),
                                  metrics=trained_metrics(model_dir), source=source, fingerprint=fingerprint)
        manifest.update(carry_trained(model_dir, stage))
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        dump_config(cfg, stage / CONFIG_FILE)
        task_map.save(stage / TASK_MAP_FILE)  # a copy of the file ingestion wrote
        if cfg.serving.onnx.export:
            write_onnx(stage, tokenizer, manifest, cfg, valid)
        if valid:
            fit_on_validation(stage, valid, manifest, calibration_method or cfg.monitoring.calibration_method)
            write_json_atomic(stage / MANIFEST_FILE, manifest)
        if remote:  # every file, then the commit marker: readers trust the folder once it is complete
            storage.upload_dir(stage, out)
        else:
            publish_dir(stage, out)  # swap: the old export stays whole until the new one is in place
        if name:
            example = pq.read_table(valid).slice(0, 3).to_pandas() if valid else None
            manifest["registered"] = register_export(
                stage if remote else out, tracking_uri, cfg.tracking.experiment, name, alias,
                training_run=source_run_id, parent_run=parent_run, example=example,
                timeout_s=cfg.tracking.timeout_s, artifact_root=cfg.tracking.artifact_uri)
            if remote:  # beside the committed folder: which registry version this content is
                storage.write_json(storage.join(out, REGISTERED_FILE), manifest["registered"])
    return Outcome(manifest, [out])


def write_onnx(stage: Path, tokenizer, manifest: dict, cfg: Config, valid: str | Path | None) -> None:
    """onnx/<s>/fp32.onnx per scenario; with ``valid``, the lower-precision candidates and their accuracy gate
    (serving.export.precision_gate). The manifest records both and is rewritten."""
    manifest["onnx"] = {"opset": cfg.serving.onnx.opset,
                        "graphs": write_fp32_graphs(stage, tokenizer, cfg.serving.onnx.opset,
                                                    keep_unfused=bool(valid) and "int8_static" in cfg.serving.onnx.candidates),
                        "gate": None, "serve": None}
    # What a warm-started model's export compares to tell an unchanged scenario (serving.export.precision_gate).
    manifest["onnx"]["fp32_digest"] = {s: file_digest(stage / g["fp32"], 16) for s, g in manifest["onnx"]["graphs"].items()}
    write_json_atomic(stage / MANIFEST_FILE, manifest)
    if valid and cfg.serving.onnx.candidates:
        gate_precisions(stage, read_validation(valid), manifest, cfg, fitted_on=storage.name(valid))
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        for line in served_summary(manifest):
            log.info(f"precision gate: {line}")


def carry_trained(model_dir: Path, stage: Path) -> dict:
    """Copy the trained-model folder into the export (``trained/``: what a warm start continues) and return the
    manifest's entries for it: its digest, and what the model itself started from (a warm-started model)."""
    shutil.copytree(model_dir, stage / TRAINED_DIR, ignore=shutil.ignore_patterns(".*"))
    start = json.loads((model_dir / START_FILE).read_text()) if (model_dir / START_FILE).is_file() else None
    if start is not None:  # scenario ids never change meaning from one version of a model to the next
        TaskMap.load(model_dir / TASK_MAP_FILE).check_extends(
            TaskMap(start["scenarios"]), f"the model it started from ({start['init_from']})")
    return {"trained": {"dir": TRAINED_DIR, "digest": file_digest(model_dir / TRAINABLE_FILE, 12)},
            "started_from": start}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)  # deployment sections only: serving.*, monitoring.*, tracking.*, data.columns
    add_logging_args(p)
    p.add_argument("--run", required=True, help="MLflow run id, training output dir (with model/) or model dir")
    p.add_argument("--out", required=True, type=storage.location, help="export folder to write")
    p.add_argument("--valid", type=storage.location, help="canonical validation Parquet: fit calibration, thresholds, drift reference")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the trained config's tracking URI)")
    p.add_argument("--name", help="register the export under this model name")
    p.add_argument("--alias", help="alias for the new version, e.g. champion or challenger")
    p.add_argument("--source-run-id", help="training run id to record when --run is a folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_from_args(args, "export")
    return run_cli(lambda: _work(args))


def _work(args: argparse.Namespace) -> int:
    """The trained model (downloaded when --run is a run id) and the export's config, then run."""
    check_writable(args.out, "--out")  # before anything is downloaded (beside --out)
    with trained_model(args.run, args.tracking_uri, near=args.out) as (model_dir, run_id):
        cfg = export_config(model_dir, load_config(args.config) if args.config else None, args.overrides)
        manifest = run(cfg, model_dir, args.out, valid=args.valid, tracking_uri=args.tracking_uri, name=args.name,
                       alias=args.alias, source_run_id=run_id or args.source_run_id).info
    log.info(f"exported {len(manifest['scenarios'])} scenarios ({manifest['pooling']} pooling) to {args.out}")
    if "registered" in manifest:
        log.info(f"registered {manifest['registered']['uri']} (version {manifest['registered']['version']})")
    return OK
