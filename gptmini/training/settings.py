"""A run's settings, every one checked before any data is read, so a mistake costs seconds, not minutes.

``check_settings(cfg)`` is the validation boundary: where Hydra hands the config over, each node becomes its
dataclass one way (``as_config``, whose ``__post_init__`` checks the values), plus the model shape
(``GPTConfig`` checks its invariants), the seed and the thread count. Code past it trusts the types. Only
Lightning's own checks need more: ``check_trainer_arguments`` builds a throwaway Trainer, and whatever
it rejects comes back as one line naming the ``trainer.`` key, not a traceback after minutes of tokenizing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gptmini.common import GptMiniError, as_config, check_seed
from gptmini.data.corpus import DataConfig
from gptmini.data.tokenizer import TokenizerConfig
from gptmini.eval.config import HellaSwagConfig
from gptmini.model.config import ATTENTION_GONE, MODEL_SIZES, GPTConfig, declared
from gptmini.model.lora import FinetuneConfig
from gptmini.threads import check_threads_setting
from gptmini.training.config import SampleConfig, TrainerSchema
from gptmini.training.finetune import check_finetune
from gptmini.training.optim import OptimConfig


@dataclass
class RunSettings:
    """The checked, typed settings of one run."""

    data: DataConfig
    tokenizer: TokenizerConfig
    optim: OptimConfig
    model_shape: GPTConfig  # the model as configured; its vocabulary is set once the tokenizer exists
    sample: SampleConfig
    trainer_args: dict[str, Any]
    finetune: FinetuneConfig
    hellaswag: HellaSwagConfig  # the eval node: HellaSwag during training
    world_size: int = 1  # the processes the Trainer will train with (data.epochs counts steps with it)


def check_settings(cfg: DictConfig, run_dir: Path) -> RunSettings:
    """Check everything the config says; raise ``GptMiniError`` naming the first bad value."""
    check_seed(cfg.seed)
    check_threads_setting(cfg.threads)
    check_weight_average(cfg.get("callbacks") or {})
    resolve_loss(cfg.loss)  # a bad name fails here, before any data is read
    settings = RunSettings(
        data=as_config(cfg.data, DataConfig, "data"),
        tokenizer=as_config(cfg.tokenizer, TokenizerConfig, "tokenizer"),
        optim=as_config(cfg.optim, OptimConfig, "optim"),
        model_shape=model_config_from(cfg, tokenizer_vocab=None),
        sample=sample_config_from(cfg),
        trainer_args=trainer_arguments(cfg, run_dir),
        finetune=as_config(cfg.get("finetune") or {}, FinetuneConfig, "finetune"),
        hellaswag=as_config(cfg.get("eval") or {}, HellaSwagConfig, "eval"),
    )
    settings.world_size = check_trainer_arguments(settings.trainer_args)
    check_finetune(cfg, settings.finetune)
    if settings.data.epochs is not None and settings.optim.schedule_by == "time":
        raise GptMiniError(
            f"data.epochs={settings.data.epochs} sets the run's length in steps, but optim.schedule_by=time "
            "ends it by trainer.max_time; use one of the two."
        )
    if settings.optim.name == "muon" and settings.finetune.method == "lora":
        # Muon orthogonalises a network's hidden weight matrices; LoRA trains only rank-r factors of
        # frozen ones, where that update has no meaning (and AdamW would be left with nothing to train).
        raise GptMiniError(
            "optim=muon trains a GPT's hidden matrices, but finetune=lora trains only low-rank adapters; "
            "use optim=adamw with finetune=lora."
        )
    return settings


def check_weight_average(callbacks) -> None:
    """``callbacks.ema``'s decay, which Lightning passes on unchecked: at 1 or more the average never
    follows the weights, or runs away from them."""
    node = callbacks.get("ema")
    decay = node.get("decay") if node is not None and hasattr(node, "get") else None
    if decay is None:
        return
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
        raise GptMiniError(f"callbacks.ema.decay={decay!r} must be a number in [0, 1); try 0.98.")


def model_config_from(
    cfg: DictConfig, tokenizer_vocab: int | None, source: GPTConfig | None = None
) -> GPTConfig:
    """The GPTConfig for this run: the named ``model.size``, every ``model.<field>`` that is set, and the
    tokenizer's vocabulary. ``tokenizer_vocab=None`` checks the values before the tokenizer exists.

    With ``source`` (the config of the ``init_from`` weights) the source's shape wins instead: a set
    ``model.<field>`` that contradicts it is an error, except ``block_size`` (may be cropped shorter),
    ``dropout`` (free: it changes no tensor).
    """
    model = OmegaConf.to_container(cfg.model, resolve=True)
    values = {k: v for k, v in model.items() if v is not None}
    if "attention" in values:  # the option is gone; refused rather than silently ignored
        raise GptMiniError(f"model.attention={values['attention']}: {ATTENTION_GONE}")
    size = values.pop("size", None) or "tiny"  # null in the YAML: a source's shape is not contradicted
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
    if source is not None:
        return _from_source(source, values, model.get("size"), tokenizer_vocab)
    return GPTConfig.from_name(size, vocab_size=tokenizer_vocab or requested or 1, **values)


def _from_source(source: GPTConfig, values: dict, size: str | None, tokenizer_vocab: int | None) -> GPTConfig:
    """The source's config with the free fields and a cropped block_size applied; contradictions refused.
    What a fine-tune may change is each GPTConfig field's ``finetune`` declaration."""
    if size is not None:  # a named size counts as setting its fields
        GPTConfig.from_name(size)  # an unknown name: the usual message
        values = {**MODEL_SIZES[size], **values}
    if tokenizer_vocab is not None and tokenizer_vocab != source.vocab_size:
        raise GptMiniError(
            f"the init_from weights have {source.vocab_size} vocabulary rows but their tokenizer has "
            f"{tokenizer_vocab} tokens; use weights whose vocab_size matches GPT-2's tokenizer (50257)."
        )
    rules = declared("finetune")
    changes = {}
    for name, value in values.items():
        current = getattr(source, name, None)
        rule = rules[name]  # every GPTConfig field declares one (model/config.py)
        if rule == "free" or value == current or (rule == "shorter" and value < current):
            changes[name] = value  # a shorter block_size: the first rows of the position table
        else:
            more = " (it may only be cropped shorter)" if rule == "shorter" else ""
            raise GptMiniError(
                f"model.{name}={value!r} contradicts the init_from weights, which have {name}={current!r}"
                f"{more}; drop model.{name} (the imported shape is used)."
            )
    return replace(source, **changes)


def sample_config_from(cfg: DictConfig) -> SampleConfig:
    """The validation-time sample settings: generate.py's sampling options plus a prompt."""
    try:
        return as_config(cfg.sample, SampleConfig, "sample")
    except GptMiniError as error:
        raise GptMiniError(f"sample.{error}") from None


def resolve_precision(precision: Any, accelerator: str = "auto") -> Any:
    """``auto`` = bf16-mixed on a GPU that supports bf16, else full fp32. Decided here, not at import."""
    if precision != "auto":
        return precision
    if _on_cuda(accelerator) and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


LOSSES = ("auto", "chunked", "standard")


def resolve_loss(loss: str, accelerator: str = "auto") -> str:
    """``auto`` = the standard loss on a GPU, the chunked one elsewhere.

    Measured on an H100 (GPT-2 small, B=32, compiled): the compiler fuses the standard cross-entropy over the
    full logits well, so it is faster there, and an H100 has the memory for the logits. On a CPU the chunked
    loss (``ChunkedLMHeadLoss``) saves the B·T x V logits and their gradient.
    """
    if loss not in LOSSES:
        raise GptMiniError(f"loss={loss!r} must be one of {', '.join(LOSSES)}; try loss=auto.")
    if loss != "auto":
        return loss
    return "standard" if _on_cuda(accelerator) else "chunked"


def _on_cuda(accelerator: str) -> bool:
    return accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()


def trainer_arguments(cfg: DictConfig, run_dir: Path) -> dict:
    """``cfg.trainer`` as ``L.Trainer`` keyword arguments: precision resolved, root dir = the run dir."""
    args = asdict(as_config(cfg.trainer, TrainerSchema, "trainer"))  # checks what Lightning checks late
    by_time = cfg.optim.get("schedule_by") == "time"
    if by_time and not args.get("max_time"):
        raise GptMiniError(
            "optim.schedule_by=time needs the time budget its schedule spans: set trainer.max_time, "
            "e.g. trainer.max_time=00:00:02:00."
        )
    by_epochs = cfg.data.get("epochs") is not None  # data=chat: the length follows from the data
    if not by_time and not by_epochs and (args["max_steps"] or -1) <= 0 and not cfg.optim.get("decay_steps"):
        raise GptMiniError(
            "the cosine schedule needs a length: set trainer.max_steps (e.g. trainer.max_steps=2000) "
            "or optim.decay_steps."
        )
    args["precision"] = resolve_precision(args["precision"], args["accelerator"])
    args["default_root_dir"] = args["default_root_dir"] or str(run_dir)
    return args


def check_trainer_arguments(args: dict) -> int:
    """Build a throwaway Trainer, so Lightning rejects bad accelerators, devices, precisions, strategies and
    durations now; its exception becomes one line naming the argument. Returns the Trainer's world size
    (devices × nodes, as Lightning counts them), known before the real Trainer exists."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "GPU available: ..." lines are printed by the real Trainer
    try:
        trainer = L.Trainer(
            **{**args, "enable_progress_bar": False, "enable_model_summary": False},
            logger=False,
            enable_checkpointing=False,
            callbacks=[],
        )
        return trainer.world_size
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as error:
        raise GptMiniError(f"Lightning rejects the trainer settings: {_first_line(error)}") from None
    finally:
        quiet.setLevel(level)


# Words in Lightning's messages, the trainer key each points at (most specific first: a message about
# devices also names the accelerator) and a value that works.
_KEY_HINTS = [
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
