"""``python -m serving.export``: the command line is ``serving.export.cli``."""
import sys

from serving.export.cli import main

sys.exit(main())
