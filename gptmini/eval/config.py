"""The typed configs of evaluation: ``EvalConfig`` (``configs/eval.yaml``) and ``HellaSwagConfig`` (the
``eval`` node of ``configs/train.yaml``), each validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptmini.common import GptMiniError, as_config
from gptmini.data.corpus import DataConfig

TASKS = ("hellaswag", "val")
# The Hub copy of HellaSwag read when no local path is given (validation split: 10,042 examples).
HELLASWAG_HUB = "Rowan/hellaswag"


def _check_limit(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise GptMiniError(f"{name}={value!r} must be a positive integer, or null for all.")


@dataclass
class EvalConfig:
    """``python -m gptmini.eval``: each key and its default (configs/eval.yaml picks the data group)."""

    ckpt: str = "latest"
    """A .ckpt file, a run directory or ``latest``; anything ``gptmini.weights.load_checkpoint`` loads."""
    task: str = "hellaswag"
    """hellaswag (multiple choice by completion loss) or val (validation loss and bits per byte)."""
    path: str | None = None
    """hellaswag: a local jsonl in HellaSwag's format (ctx, endings, label); null = the Hub."""
    hub: str = HELLASWAG_HUB
    """hellaswag without a path: the Hub dataset to read (its validation split)."""
    limit: int | None = None
    """hellaswag: the first N examples; val: the first N windows. null = all."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda or mps."""
    batch_size: int = 16
    """val: windows per forward pass."""
    data: DataConfig = field(default_factory=DataConfig)
    """val: the corpus whose validation split is scored (any data config; the checkpoint's tokenizer)."""

    def __post_init__(self) -> None:
        self.data = as_config(self.data, DataConfig, "data")  # a mapping from Hydra becomes the dataclass
        if self.task not in TASKS:
            raise GptMiniError(f"task={self.task!r} is unknown; use one of: {', '.join(TASKS)}.")
        _check_limit("limit", self.limit)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise GptMiniError(f"batch_size={self.batch_size!r} must be a positive integer.")


@dataclass
class HellaSwagConfig:
    """HellaSwag during training (the ``eval`` node of configs/train.yaml)."""

    hellaswag_every: int = 0
    """Score HellaSwag every this many optimizer steps and log eval/hellaswag_acc(_norm); 0 = never."""
    hellaswag_path: str | None = None
    """A local HellaSwag jsonl; null = the Hub (HELLASWAG_HUB)."""
    hellaswag_limit: int | None = None
    """Score only the first N examples (faster, noisier); null = all 10,042."""

    def __post_init__(self) -> None:
        every = self.hellaswag_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise GptMiniError(f"eval.hellaswag_every={every!r} must be 0 (off) or a number of steps >= 1.")
        _check_limit("eval.hellaswag_limit", self.hellaswag_limit)
