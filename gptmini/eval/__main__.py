"""``python -m gptmini.eval ckpt=<...> task=hellaswag|val [path=...] [limit=N] [data=...]``.

Overrides are Hydra's ``key=value`` strings on configs/eval.yaml; nothing is written (no run directory).
A user mistake or a machine fault is one ``error:`` line and exit status 2; a config typo is Hydra's message
and status 1; Ctrl-C is status 130.
"""

import sys


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gptmini.common import command_exit_code
    from gptmini.eval.run import compose_eval, run_eval

    try:
        cfg = compose_eval(argv)
    except (HydraException, OmegaConfBaseException) as error:
        print(f"error: {str(error).strip()}", file=sys.stderr)
        return 1
    return command_exit_code(lambda: run_eval(cfg))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
