"""DeepSpeed's launcher (``deepspeed.launcher.runner``) with this project's logs.

    python -m training.ds_runner --num_gpus 2 ... --module training.launch --worker ...   # training.launch runs it

``training.launch`` starts several processes through DeepSpeed's launcher. Run as its own module the launcher
prints in a format of its own, and at INFO; run through here it logs like every entry point (``kernel.logs``:
the level, format and step come from the environment the parent exported), with the launcher's own
INFO lines and known-harmless warnings left out. ``--log_level`` (added by ``training.launch``) also quiets
the per-node ``deepspeed.launcher.launch`` processes the launcher starts in turn.
"""
from __future__ import annotations

import sys

from kernel.logs import adopt_library_loggers, drop_records, setup_logging

# A single-node run needs no hostfile: the launcher says it will use local resources, which is the intent.
NO_HOSTFILE = "Unable to find hostfile, will proceed with training with local resources only"


def main(argv: list[str] | None = None) -> int:
    setup_logging(step="train")
    from deepspeed.launcher import runner

    adopt_library_loggers()
    drop_records("DeepSpeed", NO_HOSTFILE)
    try:
        runner.main(argv if argv is not None else sys.argv[1:])
    except SystemExit as e:  # the launcher exits with its workers' code when one failed
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
