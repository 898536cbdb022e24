"""``train(cfg) -> metrics``: the whole training run, importable, so tests call exactly what train.py calls.

The data flows one way: text → tokenizer → token cache → DataModule → GPTTrainingModule → checkpoint.
Everything the run writes goes into its run directory: checkpoints/, metrics.csv, samples.txt,
loss_curve.png, summary.json.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from gptmini.checkpoint import (
    GPTMINI_KEY,
    atomic_torch_save,
    check_weights_fit,
    load_weights,
    model_state_dict,
    read_checkpoint,
    resolve_checkpoint,
)
from gptmini.common import GptMiniError
from gptmini.data.corpus import DataConfig
from gptmini.data.datamodule import TextDataModule
from gptmini.data.tokenizer import TokenizerConfig
from gptmini.model.config import GPTConfig
from gptmini.model.gpt import GPT
from gptmini.training.callbacks import (
    GracefulInterrupt,
    LossHistory,
    TextSamples,
    Throughput,
    TrainingInterrupted,
)
from gptmini.training.config import SampleConfig
from gptmini.training.module import GPTTrainingModule
from gptmini.training.optim import OptimConfig


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, writing through a temporary file and reading with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path, map_location=map_location or "cpu")


class StopAtMaxSteps(L.Callback):
    """Ask Lightning to stop on the last step, which also runs a final validation (and so a checkpoint).

    Without it a run shorter than the validation interval would end with no validation loss at all.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class LastSavedStep(L.Callback):
    """Remembers the step of the newest checkpoint written, so train() can tell whether one is missing."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.step = trainer.global_step


# ---------------------------------------------------------------------------------------------------------
# Building the pieces from the config.
# ---------------------------------------------------------------------------------------------------------


def build_configs(cfg: DictConfig) -> tuple[DataConfig, TokenizerConfig, OptimConfig]:
    """Typed configs; their ``__post_init__`` rejects nonsensical values with a clear message."""
    data = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    tokenizer = TokenizerConfig(**OmegaConf.to_container(cfg.tokenizer, resolve=True))
    optim = OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
    return data, tokenizer, optim


def model_config_from(cfg: DictConfig, tokenizer_vocab: int | None) -> GPTConfig:
    """The GPTConfig for this run: the named ``model.size``, every ``model.<field>`` that is set, and the
    tokenizer's vocabulary. ``tokenizer_vocab=None`` checks the values before the tokenizer exists."""
    values = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if v is not None}
    size = values.pop("size")
    requested = values.pop("vocab_size", None)
    if requested is not None and tokenizer_vocab is not None and requested != tokenizer_vocab:
        multiple = values.get("pad_vocab_multiple", 64)
        padded = GPTConfig(vocab_size=tokenizer_vocab, pad_vocab_multiple=multiple).padded_vocab_size
        raise GptMiniError(
            f"model.vocab_size={requested} differs from the tokenizer's {tokenizer_vocab} tokens, so the "
            "model would predict ids the tokenizer cannot decode (or miss ids it produces). Leave "
            "model.vocab_size=null: the embedding is already padded for fast matmuls "
            f"({tokenizer_vocab} → {padded} rows, model.pad_vocab_multiple)."
        )
    return GPTConfig.from_name(size, vocab_size=tokenizer_vocab or requested or 1, **values)


def sample_config_from(cfg: DictConfig) -> SampleConfig:
    """The validation-time sample settings: generate.py's sampling options, checked before training."""
    try:
        return SampleConfig(**OmegaConf.to_container(cfg.sample, resolve=True))
    except GptMiniError as error:
        raise GptMiniError(f"sample.{error}") from None


def resolve_precision(precision: Any, accelerator: str = "auto") -> Any:
    """``auto`` = bf16-mixed on a GPU that supports bf16, else full fp32. Decided here, not at import."""
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if on_cuda and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def trainer_arguments(cfg: DictConfig, run_dir: Path) -> dict:
    """``cfg.trainer`` as ``L.Trainer`` keyword arguments: precision resolved, root dir = the run dir."""
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args["precision"] = resolve_precision(args["precision"], args["accelerator"])
    args["default_root_dir"] = args["default_root_dir"] or str(run_dir)
    return args


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    """The callbacks of ``cfg.callbacks`` (each a ``_target_`` node; null entries are switched off)."""
    callbacks = []
    for name, node in (cfg.callbacks or {}).items():
        if node is None or (name == "progress_bar" and not cfg.trainer.enable_progress_bar):
            continue
        overrides = {}
        if name == "model_checkpoint" and node.get("dirpath") is None:
            overrides["dirpath"] = str(run_dir / "checkpoints")
        callbacks.append(instantiate(node, **overrides))
    return callbacks


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for node in (cfg.logger or {}).values():
        if node is None:
            continue
        overrides = {} if node.get("save_dir") is not None else {"save_dir": str(run_dir)}
        try:
            loggers.append(instantiate(node, **overrides))
        except Exception as exc:  # an optional logger's package is missing, most often
            raise GptMiniError(f"cannot create logger {node.get('_target_')}: {exc}") from None
    return loggers


def run_directory(out_dir: str | Path | None) -> Path:
    """The Hydra run directory, or ``out_dir`` when train() is called outside of Hydra."""
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise GptMiniError("train() outside of Hydra needs out_dir=PATH for what the run writes.")
        out_dir = HydraConfig.get().runtime.output_dir
    path = Path(out_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------


def train(cfg: DictConfig, out_dir: str | Path | None = None, extra_callbacks: list | None = None) -> dict:
    """Train a GPT as ``cfg`` says; return the run summary (also written to ``summary.json``).

    Args:
        cfg: the composed ``configs/train.yaml``.
        out_dir: the run directory; default: Hydra's output directory.
        extra_callbacks: more Lightning callbacks (tests and notebooks use this to look inside a run).
    """
    run_dir = run_directory(out_dir)
    data_cfg, tok_cfg, optim_cfg = build_configs(cfg)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise GptMiniError(f"threads={cfg.threads} must be >= 1 (or null for torch's default).")
        torch.set_num_threads(cfg.threads)
    # Reject bad model values before spending time on data.
    shape = model_config_from(cfg, tokenizer_vocab=None)
    sample = sample_config_from(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = TextDataModule(data_cfg, tok_cfg, block_size=shape.block_size, seed=cfg.seed)
    datamodule.prepare_data()  # tokenize now (once), so the model knows its vocabulary
    datamodule.setup("fit")

    model_config = model_config_from(cfg, datamodule.vocab_size)
    lit = GPTTrainingModule(
        model_config=asdict(model_config),
        optim=asdict(optim_cfg),
        val_bytes_per_token=datamodule.bytes_per_token("val"),
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        tokenizer_spec=datamodule.tokenizer_spec,
        run_info={"data": data_cfg.name, "tokenizer_name": tok_cfg.name, "name": cfg.name},
    )
    if cfg.init_from:
        source = resolve_checkpoint(cfg.init_from)
        load_weights(lit.model, model_state_dict(read_checkpoint(source)), source=source)

    ckpt_path = str(resolve_checkpoint(cfg.ckpt_path)) if cfg.ckpt_path else None
    if ckpt_path:
        _check_resumable(ckpt_path, model_config, datamodule.tokenizer_spec)
        # A resumed run writes into its own new run directory by design; Lightning warns about that.
        warnings.filterwarnings("ignore", message="The dirpath has changed from")

    ckpt_dir = run_dir / "checkpoints"
    interrupt, history, saved = GracefulInterrupt(ckpt_dir / "last.ckpt"), LossHistory(), LastSavedStep()
    throughput = Throughput(cfg.throughput_every_n_steps, cfg.peak_flops)
    samples = TextSamples(datamodule.tokenizer, run_dir, sample, seed=cfg.seed)
    callbacks = build_callbacks(cfg, run_dir) + [
        throughput,
        history,
        samples,
        StopAtMaxSteps(),
        saved,
        *(extra_callbacks or []),
        interrupt,  # last: every other callback has seen the step before it saves and leaves the loop
    ]
    trainer = L.Trainer(
        **trainer_arguments(cfg, run_dir),
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir),
        plugins=[AtomicCheckpointIO()],
    )

    _print(f"run directory: {run_dir}")
    _print(
        f"model: {model_config.n_layer} layers × {model_config.n_head} heads × {model_config.n_embd}, "
        f"{lit.model.num_params():,} parameters; vocabulary {model_config.vocab_size}"
    )
    started = time.perf_counter()
    try:
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingInterrupted as stop:
        _print_resume_hint(run_dir, trainer.global_step, str(stop))
        raise SystemExit(130) from None
    wall_s = time.perf_counter() - started
    _finish(trainer, lit, datamodule, history, saved, ckpt_dir / "last.ckpt")

    summary = _summary(trainer, lit, throughput, history, ckpt_dir, wall_s, datamodule)
    if trainer.is_global_zero:
        history.plot(run_dir / "loss_curve.png")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_closing_lines(summary, samples.last_sample)
    return summary


def _finish(trainer, lit, datamodule, history, saved: LastSavedStep, last_ckpt: Path) -> None:
    """Make sure the run ends with a checkpoint and a validation of its final weights.

    StopAtMaxSteps asks Lightning for both on the last step, but Lightning skips that validation in some
    resumed runs (when the resumed checkpoint was written just before a due validation), so check.
    """
    if saved.step != trainer.global_step:
        trainer.save_checkpoint(last_ckpt)
    if history.last_val_step != trainer.global_step:
        trainer.validate(lit, datamodule=datamodule, verbose=False)


def _check_resumable(ckpt_path: str, model_config: GPTConfig, tokenizer_spec: dict) -> None:
    """Fail before training starts if the checkpoint is unreadable, of another shape or another tokenizer."""
    checkpoint = read_checkpoint(ckpt_path, mmap=True)  # mapped, not read: Lightning loads it next
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = GPT(model_config)
    check_weights_fit(model, model_state_dict(checkpoint), source=ckpt_path)
    saved_spec = checkpoint.get(GPTMINI_KEY, {}).get("tokenizer")
    if saved_spec and saved_spec != tokenizer_spec:
        raise GptMiniError(
            f"{ckpt_path} was trained with another tokenizer than this run's "
            f"({saved_spec.get('name')!r} vs {tokenizer_spec.get('name')!r}, or the same kind trained on "
            "other text): its token ids would mean other things. Resume with the run's data and tokenizer "
            "settings."
        )


def _summary(trainer, lit, throughput, history, ckpt_dir: Path, wall_s: float, datamodule) -> dict:
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    best = _best_checkpoint(trainer)
    val_losses = [loss for _, loss in history.val]
    return {
        "val_loss": metrics.get("val/loss"),
        "val_bpb": metrics.get("val/bpb"),
        "val_ppl": metrics.get("val/ppl"),
        "best_val_loss": min(val_losses) if val_losses else None,
        "best_val_bpb": _bpb(min(val_losses), lit.val_bytes_per_token) if val_losses else None,
        "train_loss": metrics.get("train/loss"),
        "steps": trainer.global_step,
        "train_tokens": history.tokens_seen(trainer),
        "tokens_per_s": throughput.average_tokens_per_s,
        "mfu": throughput.last_mfu,
        "n_params": lit.model.num_params(),
        "wall_s": wall_s,
        "checkpoint": str(ckpt_dir / "last.ckpt"),
        "best_checkpoint": best,
        "val_tokens": datamodule.meta.get("val_tokens"),
    }


def _bpb(loss: float, bytes_per_token: float | None) -> float | None:
    return loss / math.log(2) / bytes_per_token if bytes_per_token else None


def _best_checkpoint(trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
        return callback.best_model_path
    return None


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _print_closing_lines(summary: dict, sample: str | None) -> None:
    tokens_per_s = _fmt(summary["tokens_per_s"], ",.0f")
    mfu = "n/a" if summary["mfu"] is None else f"{summary['mfu']:.1%}"
    _print(
        f"\ndone: {summary['steps']} steps, {summary['train_tokens']:,} tokens in {summary['wall_s']:.1f} s "
        f"({tokens_per_s} tokens/s, MFU {mfu})"
    )
    _print(
        f"validation: loss {_fmt(summary['val_loss'])} nats/token, {_fmt(summary['val_bpb'])} bits/byte "
        f"(best {_fmt(summary['best_val_loss'])} / {_fmt(summary['best_val_bpb'])})"
    )
    _print(f'generate: python generate.py ckpt={shlex.quote(summary["checkpoint"])} prompt="..."')


def _print_resume_hint(run_dir: Path, step: int, signal_name: str) -> None:
    overrides = _task_overrides()
    command = " ".join(
        ["python train.py", *map(shlex.quote, overrides), f"ckpt_path={shlex.quote(str(run_dir))}"]
    )
    _print(f"\n{signal_name}: saved a resumable checkpoint at step {step} in {run_dir / 'checkpoints'}.")
    _print(f"resume with: {command}")


def _task_overrides() -> list[str]:
    """The command-line overrides of this run, minus any earlier ckpt_path (so resuming can be repeated)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
