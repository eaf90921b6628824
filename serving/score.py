"""``python -m serving.score``: batch scoring. The command line and the stage are ``serving.scoring.cli``.

Exit codes: kernel.exit_codes (see serving.scoring.cli).
"""
from __future__ import annotations

import sys

from serving.scoring.cli import main

if __name__ == "__main__":
    sys.exit(main())
