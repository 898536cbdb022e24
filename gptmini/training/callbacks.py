"""Lightning callbacks for what a language-model run needs beyond Lightning's own (each class says what)."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.strategies import FSDPStrategy

from gptmini.common import atomic_file, say
from gptmini.eval.config import HELLASWAG_HUB, HellaSwagConfig
from gptmini.eval.hellaswag import Example, load_examples, score
from gptmini.training.perf import flops_per_token, mfu, peak_flops
from gptmini.training.steps import StepCallback, align_logged_step, is_logging_step


class Throughput(StepCallback):
    """Logs ``perf/tokens_per_s`` and ``perf/mfu`` every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: window length; the device is synchronised once per window.
        peak_flops: override the device's peak FLOP/s (e.g. 989e12 for an H100 in bf16).
    """

    def __init__(self, every_n_steps: int = 50, peak_flops: float | None = None) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.peak_override = peak_flops
        self.train_seconds = 0.0  # training time only: validation and data preparation excluded
        self.train_tokens = 0
        self._started: float | None = None  # when the clock last started; None while it is stopped
        self._paused = False  # stopped for a validation in the middle of training
        self._window_tokens, self._window_seconds = 0, 0.0
        self.last_tokens_per_s: float | None = None
        self.last_mfu: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._peak = peak_flops(pl_module.device, str(trainer.precision), self.peak_override)
        self._flops_per_token = flops_per_token(pl_module.model)
        self._start(pl_module)

    def _start(self, pl_module) -> None:
        _synchronize(pl_module.device)
        self._started = time.perf_counter()

    def _stop(self, pl_module) -> None:
        """Stop the clock; the seconds since it started count for the window and the run."""
        _synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._started
        self._started = None
        self.train_seconds += elapsed
        self._window_seconds += elapsed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x, _ = batch
        self._window_tokens += x.numel() * trainer.world_size
        if not self.ended_a_step(trainer) or trainer.global_step % self.every_n_steps:
            return
        self._stop(pl_module)
        tokens, seconds = self._window_tokens, self._window_seconds
        self.train_tokens += tokens
        self._window_tokens, self._window_seconds = 0, 0.0
        if seconds > 0 and tokens:
            self.last_tokens_per_s = tokens / seconds
            self.last_mfu = mfu(
                self._flops_per_token, self.last_tokens_per_s / trainer.world_size, self._peak
            )
            metrics = {"perf/tokens_per_s": self.last_tokens_per_s}
            if self.last_mfu is not None:
                metrics["perf/mfu"] = self.last_mfu
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
            pl_module.log("tok/s", self.last_tokens_per_s, prog_bar=True, logger=False, rank_zero_only=True)
        self._start(pl_module)

    # Validation in the middle of training is not training time: the clock stops around it. (During
    # validation ``trainer.training`` is False, so the clock's own state says whether training was timing.)
    def on_validation_start(self, trainer, pl_module) -> None:
        self._paused = self._started is not None
        if self._paused:
            self._stop(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._paused:
            self._paused = False
            self._start(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._started is not None and self._window_tokens:
            self._stop(pl_module)
            self.train_tokens += self._window_tokens
        self._started, self._window_tokens = None, 0

    @property
    def average_tokens_per_s(self) -> float | None:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else None


@contextmanager
def evaluating(model: torch.nn.Module):
    """Run ``model`` in eval mode and eagerly (a compiled model would compile a graph for every new shape, and
    a sample or an evaluation is short), then put it back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            yield model
    finally:
        model.train(was_training)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LossHistory(StepCallback):
    """Keeps (tokens seen, loss) pairs of every logged training step and every validation.

    The pairs travel in the checkpoint, so a resumed run's loss curve and best validation loss cover the
    whole run, not only the part after the resume.
    """

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.tokens_per_batch = 0
        self.last_val_step: int | None = None

    def state_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train = [tuple(pair) for pair in state_dict.get("train", [])]
        self.val = [tuple(pair) for pair in state_dict.get("val", [])]

    def tokens_seen(self, trainer) -> int:
        """Tokens consumed so far by all ranks, derived from the step so it stays right after a resume."""
        batches = trainer.global_step * trainer.accumulate_grad_batches
        return batches * self.tokens_per_batch * trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens_per_batch = batch[0].numel()
        if self.ended_a_step(trainer) and is_logging_step(trainer):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            # Lightning hands back the loss divided by the accumulation factor (what backward saw).
            self.train.append((self.tokens_seen(trainer), float(loss) * trainer.accumulate_grad_batches))

    def on_validation_end(self, trainer, pl_module) -> None:
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None and not trainer.sanity_checking:
            self.val.append((self.tokens_seen(trainer), float(val_loss)))
            self.last_val_step = trainer.global_step

    def plot(self, path: str | os.PathLike) -> Path:
        """Write the loss curve (train and validation against tokens seen) as a PNG."""
        # The object API on an Agg canvas: no display needed, and pyplot's global backend is left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        if self.train:
            ax.plot(*zip(*self.train, strict=True), label="train", linewidth=1, alpha=0.8)
        if self.val:
            ax.plot(*zip(*self.val, strict=True), "o-", label="validation", linewidth=2)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title("gptmini loss curve")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        with atomic_file(path) as handle:
            fig.savefig(handle, format="png", dpi=110)
        return path


class TextSamples(L.Callback):
    """Prints a text sample after each validation and appends it to ``<run dir>/samples.txt``.

    Args:
        tokenizer: the run's tiktoken encoding.
        out_dir: the run directory.
        options: the sampling options; ``options.prompt`` is the text to continue ("" = a new document).
        seed: sampling seed, so samples of different validations differ only by the model.
        prompt_ids: token ids to continue instead of ``options.prompt`` (data=chat: a rendered prompt that
            ends where a reply starts, special tokens included).
    """

    def __init__(
        self,
        tokenizer,
        out_dir: str | os.PathLike,
        options,
        seed: int = 1234,
        prompt_ids: list[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.path = Path(out_dir) / "samples.txt"
        self.options = options
        self.prompt_ids = prompt_ids
        self.prompt = getattr(options, "prompt", "")
        if prompt_ids:  # shown as text, without the opening <|endoftext|>
            self.prompt = tokenizer.decode([i for i in prompt_ids if i != tokenizer.eot_token])
        self.seed = seed

    def sample(self, model: torch.nn.Module, device: torch.device) -> str:
        from gptmini.generation.sampling import sample_tokens

        eot = self.tokenizer.eot_token
        prompt_ids = self.prompt_ids or self.tokenizer.encode_ordinary(self.prompt) or [eot]
        generator = torch.Generator(device=device).manual_seed(self.seed)
        with evaluating(model):
            tokens = sample_tokens(
                model,
                torch.tensor(prompt_ids, device=device),
                self.options,
                generator=generator,
                eot_id=eot,
                vocab_limit=self.tokenizer.n_vocab,  # never an id the tokenizer cannot decode
            )
            new_ids = [int(t) for t in tokens]
        return self.tokenizer.decode([i for i in new_ids if i != eot])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.options.max_new_tokens == 0:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            return  # rank 0 holds only a shard of each weight: no sample without gathering them all
        text = self.sample(pl_module.model, pl_module.device)
        header = f"----- sample at step {trainer.global_step} -----"
        say(f"\n{header}\n{self.prompt}{text}\n{'-' * len(header)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"{header}\n{self.prompt}{text}\n\n")
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):  # TensorBoard
            experiment.add_text("sample", self.prompt + text, trainer.global_step)


class HellaSwagEval(StepCallback):
    """``eval.hellaswag_every=N``: log ``eval/hellaswag_acc`` and ``eval/hellaswag_acc_norm`` every N
    optimizer steps, scored by ``gptmini.eval.hellaswag``. The examples are read once when fitting starts (so
    an offline Hub fails before any training); under DDP each rank scores its own slice of them and the
    counts are summed, so every rank logs the same figure."""

    def __init__(self, config: HellaSwagConfig, tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.examples: list[Example] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        examples = load_examples(self.config.hellaswag_path, HELLASWAG_HUB, self.config.hellaswag_limit)
        self.examples = examples[trainer.global_rank :: trainer.world_size]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.config.hellaswag_every or not self.ended_a_step(trainer):
            return
        with evaluating(pl_module.model) as model:
            figures = score(model, self.tokenizer, self.examples, pl_module.device, progress=False)
        counts = torch.tensor([figures[k] for k in ("correct", "correct_norm", "n")], dtype=torch.float64)
        counts = counts.to(pl_module.device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        correct, correct_norm, n = (float(c) for c in counts)
        acc, acc_norm = correct / n, correct_norm / n
        # Straight to the loggers (rank zero only), at the step the other metrics of this step carry:
        # self.log from a batch-end hook would repeat the value on every later logging step.
        metrics = {"eval/hellaswag_acc": acc, "eval/hellaswag_acc_norm": acc_norm}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)


class AlignStepLabels(L.Callback):
    """Label logged rows with ``trainer.global_step`` (see ``steps.align_logged_step``). Put it first: other
    callbacks log in ``on_train_batch_start`` too (the learning-rate monitor) and must see the right label.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        align_logged_step(trainer)


class StopAtMaxSteps(L.Callback):
    """Ask Lightning to stop on the last step, which also runs a final validation (and so a checkpoint).

    Without it a run shorter than the validation interval would end with no validation loss at all.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class TrainingInterrupted(Exception):
    """Raised at a step boundary after Ctrl-C or SIGTERM, once the checkpoint is safely written."""


class GracefulInterrupt(StepCallback):
    """Ctrl-C or SIGTERM: finish the current step, write a resumable checkpoint, then leave the loop.

    The signal only sets a flag. The checkpoint is written at the end of the next training step, so it
    always holds a whole step, and the loop is left when the step after it would start: by then Lightning
    has logged the saved step's metrics (leaving at once would lose its row in metrics.csv) and run a
    validation if one was due, whose own checkpoint then replaces this one. A signal during validation waits
    for it to end. ``TrainingInterrupted`` carries the signal's name to the caller. A second Ctrl-C exits at
    once (status 130). Put this callback last, so every other callback has seen the step before it saves.

    Args:
        ckpt_file: where the checkpoint goes (the run's ``checkpoints/last.ckpt``, so resuming finds it).
    """

    def __init__(self, ckpt_file: str | os.PathLike) -> None:
        self.ckpt_file = Path(ckpt_file)
        self.received: str | None = None
        self.saved = False  # the checkpoint is written; the loop is left before the next step
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed here, after Lightning's own handlers (which Lightning restores when fit ends).
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        if self.received is not None:
            say("\nSecond interrupt: exiting now without saving.")
            os._exit(130)
        self.received = signal.Signals(signum).name
        say(
            f"\n{self.received} received: stopping after this step and saving a checkpoint "
            "(press Ctrl-C again to exit at once)."
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.ended_a_step(trainer) or self.saved:
            return
        stop = self.received is not None
        if trainer.world_size > 1:
            # Ranks may get the signal a step apart; all must stop at the same step (saving is collective).
            # Agreeing costs a collective, so ranks compare notes only on logging steps.
            if not is_logging_step(trainer):
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.save_checkpoint(self.ckpt_file)
            self.saved = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved:
            raise TrainingInterrupted(self.received or "signal on another rank")
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_end(self, trainer, pl_module, exception=None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    on_exception = on_train_end  # the handlers go back however the run ends


class QuietRichProgressBar(RichProgressBar):
    """A Rich progress bar that reads metrics (a device sync) only every ``metrics_every`` batches."""

    def __init__(self, metrics_every: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        self.metrics_every = max(1, metrics_every)
        self._cached: dict | None = None
        self._calls = 0

    def _get_train_description(self, current_epoch: int) -> str:
        # Training is step-based on an endless stream of windows: epochs mean nothing here.
        return "train"

    def get_metrics(self, trainer, pl_module):
        self._calls += 1
        if self._cached is None or not trainer.training or self._calls % self.metrics_every == 0:
            self._cached = super().get_metrics(trainer, pl_module)
        return self._cached
