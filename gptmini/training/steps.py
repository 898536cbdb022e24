"""Lightning's step bookkeeping, read in one place: which optimizer step this is, and whether it is logged.

Lightning counts ``trainer.global_step`` in optimizer steps: during a training step it still holds the number
of steps already finished, and after the optimizer has stepped it holds one more. A step is a *logging step*
when the count of finished steps at its end is a multiple of ``trainer.log_every_n_steps`` (Lightning writes
its logged values out then). Every callback and the LightningModule use these helpers, so they agree.
"""

from __future__ import annotations


def log_every(trainer) -> int:
    """``trainer.log_every_n_steps``, never below 1."""
    return max(1, int(trainer.log_every_n_steps))


def is_logging_step(trainer, steps_done: int | None = None) -> bool:
    """Whether the optimizer step that ends with ``steps_done`` finished steps is a logging step.

    Default: the step that just ended (``trainer.global_step``), as seen from ``on_train_batch_end``. Inside
    ``training_step`` pass ``trainer.global_step + 1``: that step has not finished yet.
    """
    steps = trainer.global_step if steps_done is None else steps_done
    return steps % log_every(trainer) == 0


def is_accumulating(trainer) -> bool:
    """True between the micro-batches of one optimizer step (gradient accumulation), False on the last one.

    Wraps Lightning's private ``fit_loop._should_accumulate()``; Lightning offers no public equivalent.
    """
    return trainer.fit_loop._should_accumulate()


def finished_optimizer_step(trainer) -> bool:
    """From ``on_train_batch_end``: whether this batch ended an optimizer step (not mid-accumulation)."""
    return not is_accumulating(trainer)


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
