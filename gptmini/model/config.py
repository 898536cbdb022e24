"""``GPTConfig`` and the one table of named model sizes (``model.size=...`` in the configs).

``GPTConfig.from_name("gpt2", block_size=256)`` starts from a row of ``MODEL_SIZES`` and lets any explicit
field win, as litgpt's ``Config.from_name`` does. The training config uses exactly this: ``model.size`` names
the row, and every ``model.<field>`` that is set overrides it.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field, fields
from typing import Any

from gptmini.common import GptMiniError, check_finite_floats

# The values of GPTConfig's switches (the first of each is GPT-2's).
CHOICES = {
    "pos_emb": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "relu2", "swiglu"),
}
# The attention option that once picked a rung of chapter 3's ladder; old checkpoints still hold one of these.
OLD_ATTENTIONS = ("heads", "mha", "sdpa")
ATTENTION_GONE = (
    "the GPT has one attention now, so there is nothing to choose; chapter 3's rungs (stacked heads, compact "
    "MHA) live in gptmini/book (gptmini walkthrough prints them). Drop model.attention."
)


def swiglu_hidden(n_embd: int) -> int:
    """SwiGLU's hidden size: 8·C/3 rounded up to a multiple of 32.

    SwiGLU has three C x hidden matrices where GELU's MLP has two C x 4·C ones; 8·C/3 gives both the same
    parameters and FLOPs (LLaMA's rule). Rounding up keeps the matmuls on friendly sizes (C=768 gives 2048).
    """
    return (8 * n_embd + 95) // 96 * 32  # ceil(8·C / 3 / 32) · 32, in integers


# Named model sizes: small ones that train in minutes on a laptop CPU, then GPT-2's four published sizes.
# Fields not named here take GPTConfig's defaults (GPT-2's: biases, no dropout).
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


# Each field declares what other code would otherwise keep a list of (read back with ``declared``):
#   finetune: what an init_from fine-tune may do to it: "same" (must match the weights), "shorter" (may be
#             cropped) or "free" (changes no tensor);
#   gpt2:     for a switch beyond GPT-2's recipe, the only value GPT-2's format holds: its default.
def _field(default: Any, finetune: str = "same", switch: bool = False) -> Any:
    return field(default=default, metadata={"finetune": finetune, **({"gpt2": default} if switch else {})})


def declared(key: str) -> dict[str, Any]:
    """Every GPTConfig field's declaration of ``key`` ("finetune" or "gpt2"), for the fields that make one."""
    return {f.name: f.metadata[key] for f in fields(GPTConfig) if key in f.metadata}


@dataclass
class GPTConfig:
    """Everything needed to build a ``GPT``; defaults are GPT-2 small (124M)."""

    vocab_size: int = _field(50257)
    """Real vocabulary size: the tokenizer's ``n_vocab``. Logits are returned over exactly these tokens."""
    block_size: int = _field(1024, finetune="shorter")
    """Context length: the most tokens the model sees at once (rows of the position embedding)."""
    n_layer: int = _field(12)
    """Number of transformer blocks."""
    n_head: int = _field(12)
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = _field(768)
    """Width of the residual stream (embedding size)."""
    dropout: float = _field(0.0, finetune="free")
    """Dropout probability on embeddings, attention weights and residual branches; in [0, 1)."""
    bias: bool = _field(True)  # GPT-2's format holds a model without biases: they export as zeros
    """Biases in Linear layers and LayerNorms (GPT-2 has them; without is slightly faster)."""
    attention: InitVar[str | None] = None
    """Gone: the GPT has one attention, and chapter 3's rungs live in gptmini/book. Configs saved before hold
    "heads", "mha" or "sdpa", which all shared today's weight layout: those are accepted and dropped."""
    pad_vocab_multiple: int = _field(64)
    """Embedding/LM-head rows are padded up to a multiple of this (faster matmuls on GPUs); 1 = no padding."""
    # Switches beyond GPT-2's 2019 recipe. Their defaults are GPT-2's, so old checkpoints and GPT-2's weights
    # load unchanged; docs/ablations.md measures what each buys.
    pos_emb: str = _field("learned", switch=True)
    """Positions: "learned" (GPT-2's table, ``wpe``) or "rope" (rotary, inside attention; no table)."""
    rope_base: float = _field(10000.0)
    """RoPE's base: pair i of a head turns by position · base^(-2i/head_size) radians."""
    norm: str = _field("layernorm", switch=True)
    """Normalisation: "layernorm" (GPT-2) or "rmsnorm" (no mean subtraction, no bias: cheaper, as LLaMA)."""
    qk_norm: bool = _field(False, switch=True)
    """RMS-normalise each head's queries and keys before their dot product (bounds the attention logits)."""
    mlp: str = _field("gelu", switch=True)
    """Feed-forward: "gelu" (GPT-2, hidden 4·C), "relu2" (ReLU squared, hidden 4·C) or "swiglu" (gated,
    hidden ``swiglu_hidden(C)`` = 8·C/3 rounded up to a multiple of 32: three matrices of that size hold
    about the parameters of GELU's two 4·C ones)."""
    n_kv_head: int | None = _field(None, switch=True)
    """Key/value heads: None = n_head (multi-head); fewer = grouped-query (1 = multi-query)."""
    tie_embeddings: bool = _field(True, switch=True)
    """The LM head reuses the token embedding matrix (GPT-2); false gives it its own weights."""
    logit_softcap: float | None = _field(None, switch=True)
    """None, or a cap c: logits become c·tanh(logits / c), so none exceeds ±c (Gemma 2, modded-nanogpt)."""
    unet_skips: bool = _field(False, switch=True)
    """U-net skips: the first half of the blocks' outputs are added to the second half's inputs in mirror
    order (block 0 feeds the last block), each scaled by a learned weight (modded-nanogpt)."""
    value_embeds: bool = _field(False, switch=True)
    """Value embeddings: each block has its own table of one vector per token (n_kv_head · head_size wide),
    added to that token's attention values; a cheap lookup that gives every layer direct access to the token
    it reads (modded-nanogpt). They train with the embeddings (``optim.embed_lr``)."""
    zero_init_proj: bool = _field(False, finetune="free")
    """Start the residual branches' output projections at zero, so every block begins as the identity
    (modded-nanogpt); false is GPT-2's small random start. Initialisation only: loaded weights ignore it."""

    def __post_init__(self, attention: str | None) -> None:
        """The invariants, checked once: every module that builds on a GPTConfig trusts them."""
        if attention not in (None, *OLD_ATTENTIONS):
            raise GptMiniError(f"GPTConfig.attention={attention!r}: {ATTENTION_GONE}")
        check_finite_floats(self, prefix="GPTConfig.")  # NaN passes every range check below; inf, "> 0"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            if not _positive_int(value := getattr(self, name)):
                raise GptMiniError(f"GPTConfig.{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise GptMiniError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "choose n_head that divides n_embd (each head gets n_embd // n_head dims)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptMiniError(f"GPTConfig.dropout={self.dropout!r} must be in [0, 1); use 0.0 to disable it")
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise GptMiniError(
                    f"GPTConfig.{name}={getattr(self, name)!r} is not known; valid: {', '.join(valid)}"
                )
        kv = self.n_kv_head
        if kv is not None and not _positive_int(kv):
            raise GptMiniError(f"GPTConfig.n_kv_head={kv!r} must be a positive integer, or null for n_head")
        if self.n_head % self.kv_heads != 0:
            raise GptMiniError(
                f"GPTConfig.n_head={self.n_head} is not divisible by n_kv_head={kv}; each key/value head "
                "serves the same number of query heads (try a divisor of n_head, e.g. 1 or n_head // 2)"
            )
        head_size = self.n_embd // self.n_head
        if self.pos_emb == "rope" and head_size % 2 != 0:
            raise GptMiniError(
                f"pos_emb='rope' needs an even head size, but n_embd // n_head = {head_size}; "
                "choose n_embd and n_head so that n_embd // n_head is even"
            )
        if not self.rope_base > 0:
            raise GptMiniError(f"GPTConfig.rope_base={self.rope_base!r} must be > 0; try 10000")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise GptMiniError(
                f"GPTConfig.logit_softcap={self.logit_softcap!r} must be > 0, or null for no cap; try 15"
            )

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
