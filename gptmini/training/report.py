"""What a run reports when it ends or stops: summary.json, the closing lines, the command that resumes it."""

from __future__ import annotations

import shlex
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gptmini.common import say
from gptmini.training.module import bits_per_byte


def build_summary(trainer, lit, throughput, history, ckpt_dir: Path, wall_s: float, val_tokens: int) -> dict:
    """The run's figures, as written to summary.json."""
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    best, best_loss = _best_checkpoint(trainer)
    bpt = lit.val_bytes_per_token
    if best_loss is None and history.val:  # no best.ckpt by val/loss: the whole history's
        best_loss = min(loss for _, loss in history.val)
    return {
        "val_loss": metrics.get("val/loss"),
        "val_bpb": metrics.get("val/bpb"),
        "val_ppl": metrics.get("val/ppl"),
        "best_val_loss": best_loss,  # the loss of best_checkpoint, so the two always describe one file
        "best_val_bpb": bits_per_byte(best_loss, bpt) if best_loss is not None and bpt else None,
        # The history's, when a final trainer.validate() (a run without validation data) cleared the metric.
        "train_loss": metrics.get("train/loss", history.train[-1][1] if history.train else None),
        "steps": trainer.global_step,
        "train_tokens": history.tokens_seen(trainer),
        "tokens_per_s": throughput.average_tokens_per_s,
        "mfu": throughput.last_mfu,
        "n_params": lit.model.num_params(),
        "wall_s": wall_s,
        "checkpoint": str(ckpt_dir / "last.ckpt"),
        "best_checkpoint": best,
        "val_tokens": val_tokens,
        "threads": torch.get_num_threads(),
        "schedule_by": lit.optim.schedule_by,  # steps (deterministic) or time (trainer.max_time's budget)
    }


def _best_checkpoint(trainer) -> tuple[str | None, float | None]:
    """The best checkpoint and its validation loss, as ModelCheckpoint keeps them (restored on a resume in
    the same directory, so an earlier, better checkpoint stays the best)."""
    callback = trainer.checkpoint_callback
    if not (isinstance(callback, ModelCheckpoint) and callback.best_model_path):
        return None, None
    score = callback.best_model_score if callback.monitor == "val/loss" else None  # another metric's best
    return callback.best_model_path, None if score is None else float(score)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_closing_lines(summary: dict) -> None:
    tokens_per_s, mfu = _fmt(summary["tokens_per_s"], ",.0f"), _fmt(summary["mfu"], ".1%")
    say(
        f"\ndone: {summary['steps']} steps, {summary['train_tokens']:,} tokens in {summary['wall_s']:.1f} s "
        f"({tokens_per_s} tokens/s, MFU {mfu})"
    )
    say(
        f"validation: loss {_fmt(summary['val_loss'])} nats/token, {_fmt(summary['val_bpb'])} bits/byte "
        f"(best {_fmt(summary['best_val_loss'])} / {_fmt(summary['best_val_bpb'])})"
    )
    say(f'generate: gptmini generate ckpt={shlex.quote(summary["checkpoint"])} prompt="..."')


def print_resume_hint(run_dir: Path, step: int, signal_name: str) -> None:
    overrides = _task_overrides()
    command = " ".join(
        ["gptmini train", *map(shlex.quote, overrides), f"ckpt_path={shlex.quote(str(run_dir))}"]
    )
    say(f"\n{signal_name}: saved a resumable checkpoint at step {step} in {run_dir / 'checkpoints'}.")
    say(f"resume with: {command}")


def _task_overrides() -> list[str]:
    """The command-line overrides of this run, minus any earlier ckpt_path (so resuming can be repeated)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    # A named run directory is kept, so the resumed run continues in it (the cluster recipe).
    run_dir = [o for o in hydra.overrides.hydra if o.startswith("hydra.run.dir=")]
    return [*run_dir, *(o for o in hydra.overrides.task if not o.startswith("ckpt_path="))]
