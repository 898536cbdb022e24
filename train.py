"""Train a GPT: ``python train.py [overrides]``, e.g. ``python train.py experiment=shakespeare``.

A thin Hydra wrapper around ``gptmini.training.run.train``; see configs/train.yaml for every option.
Mistakes and faults of the machine end in one line on stderr, never a traceback: exit 2 for a bad setting,
a full disk or a permission problem; exit 130 for Ctrl-C (a resumable checkpoint is saved when training
had started). In a ``-m`` sweep a failed job is recorded (``error.txt`` in its directory, "failed" in the
sweep summary) and the other jobs still run.
"""

import sys

import hydra
from omegaconf import DictConfig

from gptmini.common import GptMiniError, user_error_message
from gptmini.training.config import register_configs
from gptmini.training.run import train
from gptmini.training.sweep import in_multirun, record_failed_job

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except KeyboardInterrupt:  # outside the training loop (e.g. while tokenizing): nothing to resume
        print(
            "\ninterrupted: no cache or checkpoint was left half-written.",
            file=sys.stderr,
        )
        sys.exit(130)
    except (GptMiniError, OSError) as error:
        message = user_error_message(error)
        if message is None:
            raise  # a bug: keep its traceback
        print(f"error: {message}", file=sys.stderr)
        if in_multirun():
            record_failed_job(message)  # the sweep goes on; its summary lists this job as failed
            return None
        sys.exit(2)
    return summary.get("val_loss")  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
