"""Serve a gptmini checkpoint: ``python serve.py ckpt=PATH`` — the OpenAI API under /v1 and a chat page at /.

A thin Hydra wrapper around ``gptmini.serve.run.serve``; see configs/serve.yaml and docs/serving.md.
"""

import sys

import hydra
from omegaconf import DictConfig

from gptmini.serve.config import register_config
from gptmini.serve.run import run

register_config()  # before @hydra.main composes: the schema checks every key


@hydra.main(version_base="1.3", config_path="configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))  # one error line and status 2 for bad input; 0 after Ctrl-C or SIGTERM


if __name__ == "__main__":
    main()
