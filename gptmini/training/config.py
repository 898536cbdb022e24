"""Structured-config schemas for ``configs/train.yaml``, registered with Hydra's ConfigStore.

With a schema, Hydra checks every key and type when it composes the config: ``model.n_layr=4`` or
``optim.lr=fast`` fails before anything runs, naming the key. Every default lives here (and in the configs
these schemas hold); the YAML files only choose groups and override. Value checks (``n_embd % n_head``,
``lr > 0``) happen in each config's ``__post_init__``, when ``check_settings`` converts the nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from datetime import timedelta
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from gptmini.common import CONFIG_DIR, GptMiniError, check_finite_floats
from gptmini.data.corpus import DataConfig
from gptmini.data.tokenizer import TokenizerConfig
from gptmini.eval.config import HellaSwagConfig
from gptmini.generation.sampling import SamplingOptions
from gptmini.model.config import GPTConfig
from gptmini.model.lora import FinetuneConfig
from gptmini.training.optim import OptimConfig


def _model_schema() -> type:
    """The ``model`` node, derived from ``GPTConfig`` so a new model field is settable with no second edit:
    ``size`` (a row of ``MODEL_SIZES``) and every GPTConfig field, each null unless set. A null field comes
    from the size's row (or GPTConfig's default); a set one always wins. ``size: null`` = tiny, or, with
    init_from, the shape of those weights; ``vocab_size: null`` = the tokenizer's vocabulary (the usual case).
    GPTConfig's field docstrings describe each one."""
    hints = get_type_hints(GPTConfig)
    optional = [(f.name, hints[f.name] | None, None) for f in fields(GPTConfig)]
    # ``attention`` is no field any more (chapter 3's rungs live in gptmini/book), but a command line that
    # still names it gets gptmini's one line saying so rather than Hydra's "key not in ModelSchema".
    gone = [("attention", str | None, None)]
    return make_dataclass("ModelSchema", [("size", str | None, None), *optional, *gone])


ModelSchema = _model_schema()


@dataclass
class TrainerSchema:
    """Lightning ``Trainer`` arguments; only these keys are accepted. Lightning's docs describe each one;
    the notes below say what they mean in a step-based run on an endless stream of random windows."""

    accelerator: str = "auto"
    """auto (CUDA, MPS or CPU), cpu, cuda/gpu or mps."""
    devices: Any = 1
    """How many devices; several need a strategy (trainer=ddp or trainer=fsdp)."""
    num_nodes: int = 1
    """Machines, for multi-node runs."""
    strategy: Any = "auto"
    """auto, ddp, fsdp, ..."""
    precision: Any = "auto"
    """auto = bf16-mixed on a bf16-capable GPU, else 32-true; or any Lightning precision."""
    max_steps: int = 600
    """Optimizer steps to train; also the length of the learning-rate schedule unless optim.decay_steps."""
    max_time: Any = None
    """A wall-clock limit, "DD:HH:MM:SS"; the run stops (with a checkpoint) when it is reached. With
    optim.schedule_by=time it is the run's length: the schedule spans it and max_steps is ignored."""
    max_epochs: int | None = -1
    """-1: epochs mean nothing on an endless stream of windows."""
    val_check_interval: Any = 300
    """Validate every this many training batches (a whole number; the run also validates at its end)."""
    check_val_every_n_epoch: int | None = None
    """null: count val_check_interval across epochs."""
    limit_val_batches: Any = None
    """null = the whole validation split; an int caps the batches (faster, noisier)."""
    num_sanity_val_steps: int = 0
    """Validation batches run before training (0: validation runs at the end anyway)."""
    log_every_n_steps: int = 10
    """Logging interval in optimizer steps; also when the gradient norm and non-finite losses are checked."""
    gradient_clip_val: float | None = 1.0
    """Clip the global gradient norm to this; null = no clipping."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    enable_progress_bar: bool = True
    """The Rich progress bar."""
    enable_model_summary: bool = True
    """The table of layers and parameter counts at the start."""
    deterministic: Any = False
    """true = deterministic kernels (slower); "warn" warns where none exists."""
    benchmark: bool | None = None
    """cuDNN's autotuner."""
    default_root_dir: str | None = None
    """null = the run directory."""

    def __post_init__(self) -> None:
        # Lightning accepts these values at construction and fails minutes later, or silently misbehaves.
        check_finite_floats(self, "trainer.")  # gradient_clip_val=nan would pass the range check below
        for name in ("accumulate_grad_batches", "log_every_n_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GptMiniError(f"trainer.{name}={value!r} must be an integer >= 1.")
        interval = self.val_check_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise GptMiniError(
                f"trainer.val_check_interval={interval!r} must be a whole number of optimizer steps >= 1: "
                "the training stream has no epochs, so a fraction of one means nothing. "
                "Try trainer.val_check_interval=250."
            )
        if self.gradient_clip_val is not None and self.gradient_clip_val < 0:
            raise GptMiniError(
                f"trainer.gradient_clip_val={self.gradient_clip_val} must be >= 0, or null for no clipping."
            )
        if self.max_time is not None:
            max_time_seconds(self.max_time)
        if self.deterministic not in (True, False, "warn"):
            raise GptMiniError(f"trainer.deterministic={self.deterministic!r} must be true, false or warn.")


_DURATION_FIX = 'give a duration "DD:HH:MM:SS", e.g. trainer.max_time=00:00:10:00 (ten minutes), or null'
_DURATION_UNITS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}  # in seconds


def max_time_seconds(value: Any) -> float:
    """``trainer.max_time`` in seconds: "DD:HH:MM:SS" or a mapping like {minutes: 10}, as Lightning's Timer
    takes it, and more than zero. Anything else is one line (Lightning fails on a number mid-setup)."""
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 4 or not all(part.strip().isdigit() for part in parts):
            raise GptMiniError(f"trainer.max_time={value!r} is not DD:HH:MM:SS; {_DURATION_FIX}.")
        seconds = sum(int(part) * size for part, size in zip(parts, _DURATION_UNITS.values(), strict=True))
    elif isinstance(value, Mapping):
        known = all(key in _DURATION_UNITS for key in value)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values())
        if not (known and numbers) or any(not math.isfinite(v) or v < 0 for v in value.values()):
            raise GptMiniError(
                f"trainer.max_time={dict(value)!r} must map {', '.join(_DURATION_UNITS)} to numbers >= 0; "
                f"{_DURATION_FIX}."
            )
        seconds = sum(count * _DURATION_UNITS[unit] for unit, count in value.items())
    else:
        raise GptMiniError(f"trainer.max_time={value!r} has no unit; {_DURATION_FIX}.")
    if seconds <= 0:
        raise GptMiniError(f"trainer.max_time={value!r} is no time at all; {_DURATION_FIX}.")
    if seconds > timedelta.max.total_seconds():  # Lightning's Timer holds it as a timedelta
        raise GptMiniError(f"trainer.max_time={value!r} is too long for a duration; {_DURATION_FIX}.")
    return seconds


MAX_SAMPLE_TOKENS = 4096


@dataclass
class SampleConfig(SamplingOptions):
    """The text sample printed at each validation: generate.py's sampling options plus a prompt."""

    top_k: int | None = 50
    """Sample only among the k most likely tokens; null = no limit."""
    prompt: str = ""
    """The text to continue; "" starts a new document (from <|endoftext|>)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # generate.py may run until a stop; a sample at every validation must stay short.
        if self.max_new_tokens > MAX_SAMPLE_TOKENS:
            raise GptMiniError(
                f"max_new_tokens={self.max_new_tokens} is too long for a sample at each validation (at most "
                f"{MAX_SAMPLE_TOKENS}); use generate.py for long texts, or 0 to switch samples off."
            )


@dataclass
class TrainConfig:
    """The whole training config (``configs/train.yaml``)."""

    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    sample: SampleConfig = field(default_factory=SampleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: HellaSwagConfig = field(default_factory=HellaSwagConfig)
    """Evaluation during training: HellaSwag every eval.hellaswag_every steps (0 = never)."""
    seed: int = 1337
    """Seeds model init, the data windows, dropout and the samples (0 .. 2**32 - 1)."""
    ckpt_path: str | None = None
    """Resume everything (weights, optimizer, schedule, step, data order, RNG) from a .ckpt or a run dir."""
    init_from: str | None = None
    """Start a new run from these weights only (fine-tuning), with their tokenizer: a .ckpt, a run dir, a
    GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face folder."""
    compile: bool = False
    """torch.compile the model in place (checkpoint keys unchanged)."""
    compile_mode: str | None = None
    """torch.compile mode: null (default), max-autotune or reduce-overhead."""
    loss: str = "auto"
    """The training step's loss: chunked (LM head + cross-entropy in row chunks: no B·T x V logits tensor),
    standard (forward's full logits) or auto (standard on a GPU, where it measured faster; chunked else)."""
    threads: Any = "auto"
    """CPU threads for torch: auto (time a few training steps with 1, 2, 4 … cores and keep the fastest;
    within 5%, the fewer), a number, or null (torch's default: one per core)."""
    peak_flops: float | None = None
    """The device's peak FLOP/s for MFU; null = look it up by device name (n/a when unknown)."""
    throughput_every_n_steps: int = 50
    """tokens/s and MFU are measured over windows of this many optimizer steps."""
    name: str = "default"
    """A label stored in the checkpoint and the summary."""
    run_dir: str = "${hydra:runtime.output_dir}"
    """Where the run writes everything; Hydra's run directory (train(cfg, out_dir=...) sets it)."""


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """``configs/<config_name>.yaml`` composed exactly as train.py composes it, for tests, notebooks and
    benchmarks: ``train(compose_config(["debug=smoke"]), out_dir="runs/x")``."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def register_configs() -> None:
    """Make ``train_schema`` available to ``configs/train.yaml``'s defaults list."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
