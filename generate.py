"""Generate text from a gptmini checkpoint: ``python generate.py ckpt=PATH prompt="..."``.

A thin Hydra wrapper around ``gptmini.generation.text.generate_text``; see configs/generate.yaml for the
options.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from gptmini.common import GptMiniError, user_error_message
from gptmini.generation.prompt import quote_prompt_argument
from gptmini.generation.text import generate_text, register_config

register_config()  # before @hydra.main composes: the schema checks every key


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        generate_text(cfg)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (GptMiniError, OSError) as error:
        # A user mistake or a fault of the machine: one line, no traceback. Anything else is a bug.
        message = user_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    sys.argv = quote_prompt_argument(sys.argv)  # prompt="def main(" works as typed in the shell
    main()
