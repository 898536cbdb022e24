"""Structured-config schemas for ``configs/train.yaml``, registered with Hydra's ConfigStore.

With a schema, Hydra checks every key and type when it composes the config: ``model.n_layr=4`` or
``optim.lr=fast`` fails before anything runs, naming the key. Value checks (``n_embd % n_head``, ``lr > 0``)
happen in each config's ``__post_init__`` when ``train()`` builds the real objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from gptmini.data.corpus import DataConfig
from gptmini.data.tokenizer import TokenizerConfig
from gptmini.generation.sampling import SamplingOptions
from gptmini.training.optim import OptimConfig


@dataclass
class ModelSchema:
    """The ``model`` node: a named size, and any ``GPTConfig`` field that should differ from it.

    A field left null comes from the size's row of ``gptmini.model.config.MODEL_SIZES`` (or GPTConfig's
    default); a field that is set always wins. ``GPTConfig``'s field docstrings describe each one.
    """

    size: str = "tiny"
    """A row of MODEL_SIZES: tiny, mini, small-cpu, gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
    vocab_size: int | None = None
    """null = the tokenizer's vocabulary (the usual case); the embedding is padded by pad_vocab_multiple."""
    block_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    attention: str | None = None
    pad_vocab_multiple: int | None = None


@dataclass
class TrainerSchema:
    """Lightning ``Trainer`` arguments (see Lightning's docs for each); only these keys are accepted."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Any = "auto"
    max_steps: int = 1000
    max_time: Any = None
    max_epochs: int | None = -1
    val_check_interval: Any = 250
    check_val_every_n_epoch: int | None = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    deterministic: Any = False
    benchmark: bool | None = None
    default_root_dir: str | None = None


@dataclass
class SampleConfig(SamplingOptions):
    """The text sample printed at each validation: generate.py's sampling options plus a prompt."""

    top_k: int | None = 50
    """Sample only among the k most likely tokens; null = no limit."""
    prompt: str = ""
    """The text to continue; "" starts a new document (from <|endoftext|>)."""


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
    seed: int = 1337
    ckpt_path: str | None = None
    init_from: str | None = None
    compile: bool = False
    compile_mode: str | None = None
    threads: int | None = None
    peak_flops: float | None = None
    throughput_every_n_steps: int = 50
    name: str = "default"


def register_configs() -> None:
    """Make ``train_schema`` available to ``configs/train.yaml``'s defaults list."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
