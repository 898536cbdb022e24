"""A run's settings, every one checked before any data is read, so a mistake costs seconds, not minutes.

``check_settings(cfg)`` turns the composed Hydra config into typed values: the data, tokenizer, optimizer
and sample configs (each validates itself), the model shape, the seed, the thread count and the Lightning
Trainer arguments. Lightning's own checks run here too, on a throwaway Trainer, and whatever it rejects comes
back as one line naming the ``trainer.`` key, instead of a traceback after minutes of tokenizing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gptmini.common import GptMiniError, as_config
from gptmini.data.corpus import DataConfig
from gptmini.data.tokenizer import TokenizerConfig
from gptmini.model.config import GPTConfig
from gptmini.training.config import SampleConfig, TrainerSchema
from gptmini.training.optim import OptimConfig

MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are unsigned 32-bit


@dataclass
class RunSettings:
    """The checked, typed settings of one run."""

    data: DataConfig
    tokenizer: TokenizerConfig
    optim: OptimConfig
    model_shape: GPTConfig  # the model as configured; its vocabulary is set once the tokenizer exists
    sample: SampleConfig
    trainer_args: dict[str, Any]


def check_settings(cfg: DictConfig, run_dir: Path) -> RunSettings:
    """Check everything the config says; raise ``GptMiniError`` naming the first bad value."""
    check_seed(cfg.seed)
    if cfg.threads is not None and cfg.threads < 1:
        raise GptMiniError(f"threads={cfg.threads} must be >= 1 (or null for torch's default).")
    if cfg.ckpt_path and cfg.init_from:
        raise GptMiniError(
            "ckpt_path and init_from are both set: ckpt_path resumes a run (weights, optimizer, step, data "
            "order), init_from starts a new run from weights only. Keep the one you mean."
        )
    settings = RunSettings(
        data=as_config(_plain(cfg.data), DataConfig, "data"),
        tokenizer=as_config(_plain(cfg.tokenizer), TokenizerConfig, "tokenizer"),
        optim=as_config(_plain(cfg.optim), OptimConfig, "optim"),
        model_shape=model_config_from(cfg, tokenizer_vocab=None),
        sample=sample_config_from(cfg),
        trainer_args=trainer_arguments(cfg, run_dir),
    )
    check_trainer_arguments(settings.trainer_args)
    return settings


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise GptMiniError(f"seed={seed!r} must be an integer in 0..{MAX_SEED}; try seed=1337.")


def model_config_from(cfg: DictConfig, tokenizer_vocab: int | None) -> GPTConfig:
    """The GPTConfig for this run: the named ``model.size``, every ``model.<field>`` that is set, and the
    tokenizer's vocabulary. ``tokenizer_vocab=None`` checks the values before the tokenizer exists."""
    values = {k: v for k, v in _plain(cfg.model).items() if v is not None}
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
    """The validation-time sample settings: generate.py's sampling options plus a prompt."""
    try:
        return SampleConfig(**_plain(cfg.sample))
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
    args = _plain(cfg.trainer)
    TrainerSchema(**args)  # the value checks Lightning leaves to the middle of a run
    args["precision"] = resolve_precision(args["precision"], args["accelerator"])
    args["default_root_dir"] = args["default_root_dir"] or str(run_dir)
    return args


def check_trainer_arguments(args: dict) -> None:
    """Build a throwaway Trainer, so Lightning rejects bad accelerators, devices, precisions, strategies and
    durations now; its exception becomes one line naming the argument."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "GPU available: ..." lines are printed by the real Trainer
    try:
        L.Trainer(
            **{**args, "enable_progress_bar": False, "enable_model_summary": False},
            logger=False,
            enable_checkpointing=False,
            callbacks=[],
        )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as error:
        raise GptMiniError(f"Lightning rejects the trainer settings: {_first_line(error)}") from None
    finally:
        quiet.setLevel(level)


# Words in Lightning's messages, the trainer key each points at (most specific first: a message about
# devices also names the accelerator) and a value that works.
_KEY_HINTS = [
    ("Timer", "max_time", 'trainer.max_time="00:01:00:00" (DD:HH:MM:SS) or null'),
    ("devices", "devices", "trainer.devices=1"),
    ("num_nodes", "num_nodes", "trainer.num_nodes=1"),
    ("recision", "precision", "trainer.precision=auto"),
    ("strategy", "strategy", "trainer.strategy=auto"),
    ("torch_xla", "accelerator", "trainer.accelerator=auto"),
    ("ccelerator", "accelerator", "trainer.accelerator=auto"),
    ("gpu", "accelerator", "trainer.accelerator=auto"),
]


def _first_line(error: BaseException) -> str:
    """Lightning's first line, the ``trainer.`` key it is about, and a value that works."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for hint, key, fix in _KEY_HINTS:
        if hint in text:
            return f"{text} (trainer.{key}); try {fix}."
    return text


def apply_threads(threads: int | None) -> None:
    """``threads`` for torch's CPU kernels; None keeps torch's default (all cores)."""
    if threads is not None:
        torch.set_num_threads(threads)
