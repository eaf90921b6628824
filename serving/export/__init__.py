"""The export wing: ``python -m serving.export`` turns a trained-model folder into an export folder.

    cli.py          the command line and the stage: ``run(cfg, model_dir, out, ...) -> Outcome``

Exit codes: kernel.exit_codes (see serving.export.cli).
"""
from serving.export.cli import main

__all__ = ["main"]
