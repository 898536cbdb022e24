"""``GPTConfig`` and the one table of named model sizes (``model.size=...`` in the configs).

``GPTConfig.from_name("gpt2", block_size=256)`` starts from a row of ``MODEL_SIZES`` and lets any explicit
field win, as litgpt's ``Config.from_name`` does. The training config uses exactly this: ``model.size`` names
the row, and every ``model.<field>`` that is set overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from gptmini.common import GptMiniError
from gptmini.model.attention import ATTENTION_CLASSES

# Named model sizes: small ones that train in minutes on a laptop CPU, then GPT-2's four published sizes.
# Fields not named here take GPTConfig's defaults (GPT-2's: biases, no dropout, sdpa attention).
MODEL_SIZES: dict[str, dict] = {
    # The default run: trains in about 4 minutes on 2 CPU cores.
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
    # nanoGPT's CPU recipe shape (shakespeare_char on a laptop): the same width, context 64.
    "mini": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
    "small-cpu": {"n_layer": 6, "n_head": 6, "n_embd": 192, "block_size": 256},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},  # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},  # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "block_size": 1024},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600, "block_size": 1024},  # 1558M
}


@dataclass
class GPTConfig:
    """Everything needed to build a ``GPT``; defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    """Real vocabulary size: the tokenizer's ``n_vocab``. Logits are returned over exactly these tokens."""
    block_size: int = 1024
    """Context length: the most tokens the model sees at once (rows of the position embedding)."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 768
    """Width of the residual stream (embedding size)."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches; in [0, 1)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms (GPT-2 has them; without is slightly faster)."""
    attention: str = "sdpa"
    """Attention implementation: "heads" (stacked wrapper), "mha" (compact) or "sdpa" (efficient, default).
    All three share one weight layout, so a checkpoint loads into any of them."""
    pad_vocab_multiple: int = 64
    """Embedding/LM-head rows are padded up to a multiple of this (faster matmuls on GPUs); 1 = no padding."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GptMiniError(f"GPTConfig.{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise GptMiniError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "choose n_head that divides n_embd (each head gets n_embd // n_head dims)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptMiniError(f"GPTConfig.dropout={self.dropout!r} must be in [0, 1); use 0.0 to disable it")
        if self.attention not in ATTENTION_CLASSES:
            raise GptMiniError(
                f"GPTConfig.attention={self.attention!r} is not known; valid: {', '.join(ATTENTION_CLASSES)}"
            )

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up to a multiple of ``pad_vocab_multiple``."""
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """The config of a named size (a row of ``MODEL_SIZES``); any field in ``overrides`` wins over it."""
        if name not in MODEL_SIZES:
            raise GptMiniError(
                f"unknown model size {name!r}; valid: {', '.join(MODEL_SIZES)}. "
                "Pick one (model.size=tiny), then change any field (model.n_layer=6)."
            )
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise GptMiniError(f"unknown GPTConfig field(s) {unknown}; valid: {', '.join(sorted(valid))}")
        return cls(**{**MODEL_SIZES[name], **overrides})
