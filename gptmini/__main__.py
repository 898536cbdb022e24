"""``python -m gptmini <job> ...``: the same as the ``gptmini`` command (gptmini/cli.py)."""

import sys

from gptmini.cli import main

sys.exit(main())
