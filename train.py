"""Train a GPT: ``python train.py [overrides]``, e.g. ``python train.py experiment=shakespeare``.

A thin Hydra wrapper around ``gptmini.training.train``; see configs/train.yaml for every option.
"""

import sys

import hydra
from omegaconf import DictConfig

from gptmini.common import GptMiniError
from gptmini.training.config import register_configs
from gptmini.training.run import train

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except GptMiniError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return summary.get("val_loss")  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
