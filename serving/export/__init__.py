"""The export wing: ``python -m serving.export`` turns a trained-model folder into an export folder.

    cli.py          the command line and the stage: ``run(cfg, model_dir, out, ...) -> Outcome``
    source.py       the trained-model folder (a run id is downloaded) and the export's config
    checkpoints.py  the weights: base/, factors.safetensors, scenarios/<s>/, adapters/<s>/
    manifest.py     manifest.json
    validation.py   with --valid: calibration, thresholds and drift references fitted on validation scores

The folder's layout is serving.layout; registration is serving.registry.register.
Exit codes: kernel.exit_codes (see serving.export.cli).
"""
from serving.export.cli import main, run

__all__ = ["main", "run"]
