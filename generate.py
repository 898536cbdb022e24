"""Generate text from a gptmini checkpoint: ``python generate.py ckpt=PATH prompt="..."``.

The same as ``gptmini generate ckpt=PATH prompt="..."`` (gptmini/cli.py); see configs/generate.yaml for the
options. The prompt is quoted for Hydra, so ``prompt="def main("`` works as typed in the shell.
"""

import sys

from gptmini.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("generate", sys.argv[1:]))
