"""HellaSwag during training: ``eval.hellaswag_every=N`` logs ``eval/hellaswag_acc`` and
``eval/hellaswag_acc_norm`` every N optimizer steps.

One concern: running ``gptmini.eval.hellaswag``'s scoring inside a Lightning run. The examples are read once
when fitting starts (so an offline Hub fails before any training); under DDP each rank scores its own slice
of them and the counts are summed, so every rank logs the same figure.
"""

from __future__ import annotations

import lightning as L
import torch

from gptmini.common import as_config
from gptmini.eval.config import HELLASWAG_HUB, HellaSwagConfig
from gptmini.eval.hellaswag import Example, load_examples, score
from gptmini.training.callbacks import evaluating
from gptmini.training.steps import StepCallback


class HellaSwagEval(StepCallback):
    """Score HellaSwag every ``config.hellaswag_every`` optimizer steps (see the module docstring)."""

    def __init__(self, config: HellaSwagConfig, tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.examples: list[Example] = []
        self.history: list[tuple[int, float, float]] = []  # (step, acc, acc_norm), for tests and notebooks

    def on_fit_start(self, trainer, pl_module) -> None:
        examples = load_examples(self.config.hellaswag_path, HELLASWAG_HUB, self.config.hellaswag_limit)
        self.examples = examples[trainer.global_rank :: trainer.world_size]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.config.hellaswag_every or not self.ended_a_step(trainer):
            return
        with evaluating(pl_module.model) as model:
            figures = score(model, self.tokenizer, self.examples, pl_module.device, progress=False)
        counts = torch.tensor(
            [figures["correct"], figures["correct_norm"], figures["n"]],
            device=pl_module.device,
            dtype=torch.float64,
        )
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        correct, correct_norm, n = (float(c) for c in counts)
        acc, acc_norm = correct / n, correct_norm / n
        self.history.append((step, acc, acc_norm))
        # Straight to the loggers (rank zero only), at the step the other metrics of this step carry:
        # self.log from a batch-end hook would repeat the value on every later logging step.
        metrics = {"eval/hellaswag_acc": acc, "eval/hellaswag_acc_norm": acc_norm}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)


def hellaswag_config(cfg) -> HellaSwagConfig:
    """The checked ``eval`` node of a composed train config (before any data is read)."""
    node = cfg.get("eval")
    return as_config(node, HellaSwagConfig, "eval") if node else HellaSwagConfig()


def hellaswag_callbacks(config: HellaSwagConfig, tokenizer) -> list[L.Callback]:
    """``[HellaSwagEval]`` when ``eval.hellaswag_every`` is set, else ``[]``."""
    return [HellaSwagEval(config, tokenizer)] if config.hellaswag_every else []
