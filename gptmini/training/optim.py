"""The optimizer and its learning-rate schedule: ``OptimConfig``, ``build_optimizer``, ``build_lr_schedule``.

AdamW as nanoGPT sets it up: weight decay only on matrices (biases and norm gains are left alone), the fused
kernel on CUDA, and a per-step schedule of linear warmup then cosine decay to a floor. The LightningModule
and bench/train.py's plain loop both build theirs here, so they cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptmini.common import GptMiniError


@dataclass
class OptimConfig:
    """AdamW and its schedule: linear warmup, then cosine decay to a floor, stepped per optimizer step."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Floor of the cosine decay (nanoGPT uses lr / 10)."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    decay_steps: int | None = None
    """Steps from the start to the end of the cosine decay; None = ``trainer.max_steps``."""
    weight_decay: float = 0.1
    """Decoupled weight decay, only on weights with 2 or more dimensions (not biases, not LayerNorms)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay (0.95 is steadier than 0.999 for language models)."""
    eps: float = 1e-8
    """AdamW epsilon."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise GptMiniError(f"optim.lr must be > 0, got {self.lr}; try optim.lr=1e-3.")
        if not 0 <= self.min_lr <= self.lr:
            raise GptMiniError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}.")
        if self.warmup_steps < 0:
            raise GptMiniError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise GptMiniError(f"optim.decay_steps must be > 0 or null, got {self.decay_steps}.")
        if self.weight_decay < 0:
            raise GptMiniError(f"optim.weight_decay must be >= 0, got {self.weight_decay}.")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise GptMiniError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}.")


def lr_at(step: int, optim: OptimConfig, decay_steps: int) -> float:
    """The learning rate after ``step`` optimizer steps: linear warmup, cosine decay, then the floor."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if step >= decay_steps:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, device: torch.device | str
) -> torch.optim.Optimizer:
    """AdamW over ``model.configure_optimizer_groups`` (decay on matrices only); fused on CUDA."""
    groups = model.configure_optimizer_groups(optim.weight_decay)
    fused = torch.device(device).type == "cuda"  # one kernel for all parameters; only on CUDA
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused
    )


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, decay_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_at`` as a scheduler stepped once per optimizer step."""
    # LambdaLR multiplies the base lr, so express the schedule as a fraction of the peak.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, optim, decay_steps) / optim.lr
    )
