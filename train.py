"""Train a GPT: ``python train.py [overrides]``, e.g. ``python train.py experiment=shakespeare``.

The same as ``gptmini train [overrides]`` (gptmini/cli.py); see configs/train.yaml for every option.
Mistakes and faults of the machine end in one line on stderr, never a traceback: exit 2 for a bad setting,
a full disk or a permission problem; exit 130 for Ctrl-C (a resumable checkpoint is saved when training
had started). In a ``-m`` sweep a failed job is recorded (``error.txt`` in its directory, "failed" in the
sweep summary) and the other jobs still run.
"""

import sys

from gptmini.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
