"""``python -m gptmini.eval ckpt=<...> task=hellaswag|val [path=...] [limit=N] [data=...]``.

The same as ``gptmini eval ...`` (gptmini/cli.py): Hydra overrides on configs/eval.yaml; nothing is written.
A user mistake or a machine fault is one ``error:`` line and exit status 2; a config typo is Hydra's message
and status 1; Ctrl-C is status 130.
"""

import sys

from gptmini.cli import run_command


def main(argv: list[str]) -> int:
    return run_command("eval", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
