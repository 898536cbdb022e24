"""Generate text from a gptmini checkpoint: ``python generate.py ckpt=PATH prompt="..."``.

A thin Hydra wrapper around ``gptmini.generation.generate``; see configs/generate.yaml for the options.
"""

import sys

import hydra
from omegaconf import DictConfig

from gptmini.common import GptMiniError
from gptmini.generation.text import generate, quote_prompt_argument, register_config

register_config()  # before @hydra.main composes: the schema checks every key


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        generate(cfg)
    except GptMiniError as exc:
        # A user mistake: one readable line, no traceback (anything else is a bug and keeps its traceback).
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    sys.argv = quote_prompt_argument(sys.argv)  # prompt="def main(" works as typed in the shell
    main()
