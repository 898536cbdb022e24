"""Lightning's step bookkeeping, read in one place: which optimizer step this is, whether a batch ended one,
and whether it is logged.

Lightning counts ``trainer.global_step`` in optimizer steps: during a training step it still holds the number
of steps already finished, and after the optimizer has stepped it holds one more. A step is a *logging step*
when the count of finished steps at its end is a multiple of ``trainer.log_every_n_steps`` (Lightning writes
its logged values out then). Every callback and the LightningModule use these helpers, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L


@dataclass(frozen=True)
class RunPlan:
    """A run's facts, decided once by ``train()`` and handed to the module as plain values, so nothing reads
    them back from Lightning at hook time."""

    max_steps: int | None = None
    """Optimizer steps to train; None when a time budget ends the run."""
    schedule_steps: int | None = None
    """The learning-rate decay's length in optimizer steps (optim.decay_steps, else max_steps); None when the
    schedule follows the time budget."""
    precision: str | None = None
    """The Trainer's precision ("32-true", "bf16-mixed", ...): it decides whether AdamW may be fused."""
    clipping: bool = False
    """Whether gradients are clipped (trainer.gradient_clip_val)."""


def is_logging_step(trainer, steps_done: int | None = None) -> bool:
    """Whether the optimizer step that ends with ``steps_done`` finished steps is a logging step.

    Default: the step that just ended (``trainer.global_step``), as seen from ``on_train_batch_end``. Inside
    ``training_step`` pass ``trainer.global_step + 1``: that step has not finished yet.
    """
    steps = trainer.global_step if steps_done is None else steps_done
    return steps % max(1, int(trainer.log_every_n_steps)) == 0


class StepCallback(L.Callback):
    """A callback that can tell, in ``on_train_batch_end``, whether that batch ended an optimizer step.

    Under gradient accumulation several micro-batches make one step. The optimizer stepped during a batch
    exactly when ``trainer.global_step`` moved, so comparing it with its value at the batch's start answers
    from public values alone (Lightning's own answer, ``fit_loop._should_accumulate()``, is private).
    A subclass that overrides ``on_train_batch_start`` calls this one too.
    """

    _step_at_start: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def ended_a_step(self, trainer) -> bool:
        return self._step_at_start is None or trainer.global_step != self._step_at_start


def align_logged_step(trainer) -> None:
    """Make the step Lightning logs metrics at equal ``trainer.global_step``; call before each training batch.

    Lightning labels logged rows with a private counter of optimizer steps, ``_batches_that_stepped``, which
    it does not keep in step with ``global_step`` across a resume: a checkpoint written at the end of a
    training step stores the counter before Lightning bumps it, and on restart Lightning adds one to it or
    not depending on where the checkpoint was written (after a validation, or at a batch end). A resumed
    run's rows were then labelled one step off. Before a batch, with one optimizer, the two counts are equal
    in a straight run, so setting it there is right whatever the restart path was. The one private attribute
    gptmini writes; ``tests/test_resume.py`` fails if Lightning renames it.
    """
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_batches_that_stepped"):
        raise RuntimeError("Lightning renamed fit_loop.epoch_loop._batches_that_stepped; update steps.py")
    loop._batches_that_stepped = trainer.global_step
