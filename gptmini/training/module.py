"""The LightningModule: a GPT plus its optimizer, learning-rate schedule and metrics.

Built from plain values (dicts, numbers), never from Hydra objects, so
``GPTTrainingModule.load_from_checkpoint`` works anywhere. Lightning owns the loop, precision, devices,
checkpoint files and logging; this module owns what is specific to language modelling: the loss, bits per
byte, and non-finite-loss detection. The optimizer and schedule are built in ``gptmini.training.optim``.
"""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import FSDPStrategy

from gptmini.common import GptMiniError
from gptmini.model.config import GPTConfig
from gptmini.model.gpt import GPT
from gptmini.model.lora import FinetuneConfig, adapter_state, add_lora
from gptmini.training.optim import OptimConfig, adamw_fused, build_lr_schedule, build_optimizer, lr_at
from gptmini.training.steps import RunPlan, is_logging_step
from gptmini.weights import GPTMINI_KEY, gptmini_entry


class GPTTrainingModule(L.LightningModule):
    """GPT language modelling under Lightning.

    ``model_config``, ``optim``, ``finetune`` and ``plan`` are the fields of ``GPTConfig``, ``OptimConfig``,
    ``FinetuneConfig`` (method "lora" freezes the GPT and trains adapters) and ``RunPlan`` (the run's length,
    schedule length, precision and clipping, as ``train()`` decided them) as dicts.

    Args:
        val_bytes_per_token: UTF-8 bytes per loss target of the validation split (data=chat: per reply
            token), to report bits per byte.
        compile, compile_mode: ``torch.compile`` the GPT in place (checkpoint keys do not change).
        loss: "chunked" (``GPT.loss``: no full logits tensor) or "standard" (``forward``'s full logits).
        tokenizer_spec: the tokenizer, stored in every checkpoint so generation needs only the file.
        run_info: extra plain values stored in the checkpoint's gptmini entry (e.g. data and tokenizer names).
        clock: with optim.schedule_by=time, the Timer that ends the run; the schedule's progress is its
            elapsed fraction (not saved as a hyperparameter: it is a live object).
    """

    def __init__(
        self,
        model_config: dict,
        optim: dict | None = None,
        val_bytes_per_token: float | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        loss: str = "chunked",
        tokenizer_spec: dict | None = None,
        run_info: dict | None = None,
        finetune: dict | None = None,
        plan: dict | None = None,
        clock: Timer | None = None,
    ) -> None:
        super().__init__()
        # The tokenizer can be large (a BPE's ranks): it goes in the checkpoint's gptmini entry.
        self.save_hyperparameters(ignore=["tokenizer_spec", "run_info", "clock"])
        self.model = GPT(GPTConfig(**model_config))
        # LoRA freezes the GPT and adds adapters; its checkpoints keep only those (their base is named).
        self._lora = bool(finetune) and finetune.get("method") == "lora"
        if self._lora:
            add_lora(self.model, FinetuneConfig(**finetune))
            self.strict_loading = False  # a resume loads the adapters; the base came from init_from
        self.optim = OptimConfig(**(optim or {}))
        self.plan = RunPlan(**(plan or {}))
        self.clock = clock
        self.val_bytes_per_token = val_bytes_per_token
        self.tokenizer_spec = tokenizer_spec
        self.run_info = run_info or {}
        self._compile = compile
        self._compile_mode = compile_mode
        assert loss in ("chunked", "standard"), loss  # settings.resolve_loss chose it
        self._loss_kind = loss
        # The chunked loss runs the LM head in chunks (no full logits tensor); the standard one is forward's.
        self._train_loss = self.model.loss if loss == "chunked" else lambda x, y: self.model(x, y)[1]
        # Non-finite losses are detected on the device and checked only on logging steps and before each
        # checkpoint, so the training step never waits for the host (no .item() per step). Both counters
        # count micro-batches, so gradient accumulation needs no special case.
        self.register_buffer("_batches_seen", torch.tensor(0, dtype=torch.long), persistent=False)
        self.register_buffer("_first_bad_batch", torch.tensor(-1, dtype=torch.long), persistent=False)
        self.saved_step: int | None = None  # the step of the newest checkpoint written or resumed from
        # One context of token ids: Lightning's model summary runs it to fill its FLOPs and size columns.
        self.example_input_array = torch.zeros(1, self.model.config.block_size, dtype=torch.long)

    # ----- setup --------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self._compile and not getattr(self.model, "_compiled_in_place", False):
            # In place: parameters keep their names, so checkpoints carry no "_orig_mod." prefix.
            # Module.compile covers forward (validation, the standard loss); the chunked loss is a method.
            self.model.compile(mode=self._compile_mode)
            if self._loss_kind == "chunked":
                self._train_loss = torch.compile(self.model.loss, mode=self._compile_mode)
            self.model._compiled_in_place = True

    def configure_optimizers(self):
        plan = self.plan
        optimizer = build_optimizer(self.model, self.optim, self.device, plan.precision, plan.clipping)
        progress = self._time_progress() if self.optim.schedule_by == "time" else None
        decay_steps = 1 if progress else self._schedule_steps()  # unused when the schedule follows time
        schedule = build_lr_schedule(optimizer, self.optim, decay_steps, progress)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _schedule_steps(self) -> int:
        assert self.plan.schedule_steps, "train() plans the schedule's length (settings checked it has one)"
        return self.plan.schedule_steps

    def _time_progress(self):
        """schedule_by=time: a function giving the fraction of the time budget used so far.

        It reads the Timer that also stops the run (``clock``), so the decay ends when the run does; a resumed
        run restores the Timer's elapsed time from its checkpoint and continues with the rest.
        """
        assert self.clock is not None, "schedule_by=time needs train()'s clock (settings checked max_time)"
        budget = self.clock.time_elapsed() + self.clock.time_remaining()  # the duration, in seconds
        return lambda: min(1.0, self.clock.time_elapsed() / budget)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size); what the model summary runs on ``example_input_array``.

        Eager even when the model is compiled: one batch-1 call must not compile a graph for its shape.
        """
        with torch.compiler.set_stance("force_eager"):
            return self.model(idx)[0]

    # ----- steps --------------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self._train_loss(x, y)
        self._record_if_nonfinite(loss)
        steps_done = self.trainer.global_step + 1  # once this step's optimizer has stepped
        last = self.plan.max_steps is not None and steps_done >= self.plan.max_steps
        if is_logging_step(self.trainer, steps_done) or last:
            # self.log costs a little on every call; Lightning only writes it out on logging steps anyway.
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        # Weight each batch by its targets (y == -1 is padding or prompt, outside the loss), so the mean is
        # per target: the last, shorter window of text counts for what it holds, and a batch of chat by its
        # reply tokens. For text every target is kept: y.numel().
        targets = int((y != -1).sum())
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=targets, prog_bar=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is None:
            return
        self.log("val/ppl", torch.exp(val_loss), sync_dist=False)
        if self.val_bytes_per_token:
            self.log("val/bpb", bits_per_byte(val_loss, self.val_bytes_per_token), prog_bar=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradient norm costs one reduction; compute it only on steps that get logged.
        # Under FSDP each rank holds a shard of every gradient: a local norm would be wrong, so none.
        logged = is_logging_step(self.trainer, self.trainer.global_step + 1)
        if logged and not isinstance(self.trainer.strategy, FSDPStrategy):
            norms = [p.grad.detach().norm(2) for p in self.model.parameters() if p.grad is not None]
            if norms:
                self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms)), on_step=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip as Lightning does, except where ``adamw_fused`` made AdamW fused: Lightning's mixed-precision
        plugin refuses to clip a fused optimizer (even under bf16-mixed, which has no scaler), although its
        gradients are true values here. Without this, every bf16 run on a GPU stopped at its first step."""
        fused = adamw_fused(self.device, self.plan.precision, self.plan.clipping)
        # FSDP clips its shards through its own path (a local norm would be wrong): Lightning's, untouched.
        if not (fused and gradient_clip_val) or isinstance(self.trainer.strategy, FSDPStrategy):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), gradient_clip_val)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if is_logging_step(self.trainer):  # the step that was just logged
            self.raise_if_nonfinite()

    # ----- numerical faults ---------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._batches_seen.fill_(self.trainer.global_step * self.trainer.accumulate_grad_batches)
        # Restored here, after Lightning's own seeding, so dropout continues exactly where the run stopped.
        states = getattr(self, "_rng_to_restore", None)
        if states:
            _restore_rng_states(states)
            self._rng_to_restore = None

    def _record_if_nonfinite(self, loss: torch.Tensor) -> None:
        first_bad_now = (self._first_bad_batch < 0) & ~torch.isfinite(loss.detach())
        self._first_bad_batch.copy_(torch.where(first_bad_now, self._batches_seen, self._first_bad_batch))
        self._batches_seen.add_(1)

    def raise_if_nonfinite(self) -> None:
        """Stop with a message naming the step and learning rate where the loss first went non-finite."""
        first_bad = self._first_bad_batch
        if self.trainer.world_size > 1:
            # Every rank must decide alike, or the ones that carry on wait forever for the others.
            first_bad = self.trainer.strategy.reduce(first_bad.clone(), reduce_op="max")
        bad_batch = int(first_bad)
        if bad_batch < 0:
            return
        bad_step = bad_batch // self.trainer.accumulate_grad_batches
        if self.optim.schedule_by == "time":  # the rate now: a time-based schedule has no step formula
            lr = self.trainer.optimizers[0].param_groups[-1]["lr"]
        else:
            lr = lr_at(bad_step, self.optim, self._schedule_steps())
        if self.saved_step is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = f"the last good checkpoint (step {self.saved_step}) was kept"
        raise GptMiniError(
            f"the training loss became non-finite (NaN or inf) in step {bad_step + 1}, after {bad_step} good "
            f"ones (learning rate {lr:.3g}). Training stopped; {kept}. Try a lower optim.lr, more "
            "optim.warmup_steps, or trainer.gradient_clip_val=1.0."
        )

    # ----- checkpoints --------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never write weights that came out of a NaN step over the last good checkpoint.
        self.raise_if_nonfinite()
        if self._lora:
            checkpoint["state_dict"] = adapter_state(checkpoint["state_dict"])
        checkpoint[GPTMINI_KEY] = gptmini_entry(
            self.model.config, self.tokenizer_spec or {}, rng=_rng_states(), **self.run_info
        )
        self.saved_step = checkpoint.get("global_step")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        entry = checkpoint.get(GPTMINI_KEY, {})
        if self.tokenizer_spec is None:
            self.tokenizer_spec = entry.get("tokenizer")
        self._rng_to_restore = entry.get("rng")
        self.saved_step = checkpoint.get("global_step")  # a resumed run's last good checkpoint


def bits_per_byte(loss, bytes_per_token: float):
    """Nats per token to bits per UTF-8 byte: comparable across char-level, BPE and GPT-2 tokenizers."""
    return loss / math.log(2) / bytes_per_token


def _rng_states() -> dict:
    """Every random stream a training step can touch, as plain values and tensors (weights_only-safe)."""
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
