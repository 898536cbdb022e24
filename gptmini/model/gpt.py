"""The GPT: feed-forward, transformer block, and the full language model, top to bottom.

Pure torch (no Lightning or Hydra), so it can be used, tested and exported on its own; each module uses only
the ones above it (and ``attention``). Shapes: B batch, T sequence length, C = n_embd, nh heads,
hs = C // nh head size, V vocabulary size.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptmini.common import GptMiniError
from gptmini.model.attention import CausalSelfAttention
from gptmini.model.config import GPTConfig, swiglu_hidden
from gptmini.model.kv_cache import CacheView, KVCache
from gptmini.model.loss import ChunkedLMHeadLoss


def make_norm(config: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm: scale by the root mean square only (no mean, no bias), one op less."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class ReLUSquared(torch.autograd.Function):
    """ReLU(x)² with its backward written out: grad · 2·ReLU(x), from the one tensor it saves.

    Autograd's chain for ``F.relu(x).square()`` runs five kernels backwards (square's pow and multiply,
    then ReLU's threshold) over the (B, T, 4·C) hidden activations; this runs two. On a 2-core CPU that is
    2-4% of ``experiment=shakespeare``'s training step (bench/cpu_step.py), with the same values and
    gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return (r + r).mul_(grad)  # d(r²)/dx = 2r where x > 0, and r = 0 elsewhere


def relu_squared(x: Tensor) -> Tensor:
    """ReLU(x)²: as cheap as ReLU, smoother at 0, and sparse (modded-nanogpt, Primer)."""
    return ReLUSquared.apply(x)


def swiglu(x: Tensor) -> Tensor:
    """SiLU(gate) · up, where ``fc`` produced [gate | up] side by side: (..., 2·H) to (..., H)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class FeedForward(nn.Module):
    """Position-wise MLP: expand, non-linearity, project back. Applied to each token independently.

    ``mlp="gelu"`` is GPT-2's (4·C hidden, tanh GELU), "relu2" swaps in ReLU², and "swiglu" gates: ``fc``
    makes a gate and a value for each of ``swiglu_hidden(C)`` hidden units, and the gate's SiLU scales the
    value. The layer names (``fc``, ``proj``) are the same for all three.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        hidden = swiglu_hidden(C) if config.mlp == "swiglu" else 4 * C
        fc_out = 2 * hidden if config.mlp == "swiglu" else hidden  # SwiGLU's fc makes [gate | up]
        self.fc = nn.Linear(C, fc_out, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU; using it keeps converted weights exact.
        activations = {"gelu": nn.GELU(approximate="tanh"), "relu2": relu_squared, "swiglu": swiglu}
        self.act = activations[config.mlp]
        self.proj = nn.Linear(hidden, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) to (B, T, C)."""
        return self.dropout(self.proj(self.act(self.fc(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + feed_forward(LN(x)).

    Normalising the input of each branch (not the sum) leaves the residual stream an identity path from
    embeddings to output, which keeps deep stacks trainable without warm-up tricks.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)  # RoPE, if on, lives inside attention
        self.ln_2 = make_norm(config)
        self.mlp = FeedForward(config)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: CacheView | None = None,
        maps: list[Tensor] | None = None,
        value_embed: Tensor | None = None,
    ) -> Tensor:
        """(B, T, C) to (B, T, C); the other arguments go to ``CausalSelfAttention.forward``."""
        x = x + self.attn(self.ln_1(x), positions, cache, maps, value_embed)  # tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # each token processes what it gathered
        return x


class GPT(nn.Module):
    """A GPT-2 style decoder-only language model."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)  # token embeddings
        # Learned position embeddings; with RoPE the positions are rotations inside attention instead.
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layer)])
        # Value embeddings: block i's own per-token vectors, added to its attention values. Outside the
        # blocks, so Muon (which takes the blocks' matrices) leaves these lookup tables to AdamW.
        kv_size = config.kv_heads * (config.n_embd // config.n_head)
        self.value_embeds = (
            nn.ModuleList(nn.Embedding(config.padded_vocab_size, kv_size) for _ in range(config.n_layer))
            if config.value_embeds
            else None
        )
        # U-net skips: one learned weight per (first-half block, mirrored second-half block) pair.
        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2)) if config.unet_skips else None
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying: the output layer scores tokens with the same vectors that embed them. It saves
            # V·C parameters (38.6M of GPT-2 small's 124M) and matches GPT-2. One Parameter, two uses.
            # Untied, the input and output vectors of a token may differ (modern recipes' choice).
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, scaled residual projections."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two branch outputs (attention, MLP) to the residual stream; scaling the layers that
        # write into it by 1/sqrt(2·n_layer) keeps the stream's variance from growing with depth.
        # zero_init_proj starts them at zero instead: every block is then the identity, and each branch
        # grows from nothing (the gradient of a zero projection is not zero: its input is not).
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                if self.config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def _trunk(
        self, idx: Tensor, positions: Tensor, caches: list[CacheView] | None, maps: list[Tensor] | None = None
    ) -> Tensor:
        """The one pass every entry point walks: embeddings, the blocks, the final norm. (B, T) to (B, T, C).

        ``positions`` (B or 1, T) are the tokens' positions; ``caches`` the layers' KV-cache views, if any;
        a ``maps`` list collects every layer's attention weights.
        """
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:  # with RoPE, positions enter in attention instead
            x = x + self.wpe(positions)  # (B or 1, T, C) broadcasts over the batch
        x = self.drop(x)
        n = len(self.blocks)
        half = 0 if self.skip_weights is None else n // 2
        skips = []  # U-net: the first half's outputs, last in first out
        for i, block in enumerate(self.blocks):
            if i >= n - half:  # block n-1-j takes block j's output
                x = x + self.skip_weights[n - 1 - i] * skips.pop()
            values = None if self.value_embeds is None else self.value_embeds[i](idx)  # (B, T, nkv·hs)
            x = block(x, positions, None if caches is None else caches[i], maps, values)  # (B, T, C)
            if i < half:
                skips.append(x)
        return self.ln_f(x)

    def _hidden(self, idx: Tensor, kv_cache: KVCache | None, maps: list[Tensor] | None = None) -> Tensor:
        """Final hidden states of tokens continuing ``kv_cache`` (or starting at 0): (B, T) to (B, T, C)."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            where = f"{start} cached + {T} new tokens" if kv_cache is not None else f"sequence length {T}"
            raise GptMiniError(
                f"{where} exceeds block_size={self.config.block_size}; crop the input to the last "
                f"{self.config.block_size} tokens (or reset the KV cache)"
            )
        if kv_cache is not None and B != kv_cache.batch_size:
            raise GptMiniError(
                f"batch size {B} does not match the KV cache's {kv_cache.batch_size}; "
                "make the cache with new_kv_cache(batch_size)"
            )
        positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)
        views = None if kv_cache is None else kv_cache.prefix_views(positions)  # the filled slots and T new
        x = self._trunk(idx, positions, views, maps)
        if kv_cache is not None:
            kv_cache.length = start + T
        return x

    def _logits(self, x: Tensor) -> Tensor:
        """The LM head: (..., C) to (..., padded V). With ``logit_softcap`` c the logits become c·tanh(l / c):
        smooth and bounded."""
        logits, cap = self.lm_head(x), self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Next-token logits, and the loss when targets are given.

        Args:
            idx: (B, T) int64 token ids.
            targets: (B, T) int64 next-token ids; -1 marks positions to ignore.
            kv_cache: from ``new_kv_cache``; the tokens continue the cached ones and are appended to it.

        Returns:
            logits (B, T, vocab_size) over the real vocabulary, and the mean cross-entropy (or None).
        """
        logits = self._logits(self._hidden(idx, kv_cache))  # (B, T, padded V)
        loss = None
        if targets is not None:
            # The loss uses the padded logits: padding rows are never targets, so they just learn to be
            # unlikely, and no slice-copy is needed for the backward pass.
            flat_logits = logits.view(-1, logits.size(-1))  # (B·T, padded V)
            loss = F.cross_entropy(flat_logits, targets.view(-1), ignore_index=-1)
        return logits[..., : self.config.vocab_size], loss  # a view: (B, T, V)

    def next_token_logits(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Logits for the token after the last position only: (B, T) to (B, vocab_size).

        What generation needs: the LM head runs on one position instead of T (a 1024-token GPT-2 prompt
        would otherwise make a 1024 x 50k logits tensor to keep one row of it).
        """
        x = self._hidden(idx, kv_cache)[:, -1, :]  # (B, C)
        return self._logits(x)[:, : self.config.vocab_size]  # (B, V)

    def decode_step(self, token: Tensor, position: Tensor, kv_cache: KVCache) -> Tensor:
        """Logits (B, vocab_size) for one new token per row, (B, 1), at ``position``: a 0-dim tensor, or (B,)
        when the rows sit at different positions.

        Generation's inner step. Its keys and values are written into ``kv_cache`` at ``position`` and the
        attention reads the whole cache under a mask, so every step has the same shapes and touches no Python
        state: ``torch.compile`` captures it once (on a GPU, as one CUDA graph), where ``next_token_logits``
        would see a new shape per token. The caller advances ``kv_cache.length``. Inference only (no dropout).
        """
        positions = position.view(-1, 1)  # (1, 1) or (B, 1)
        x = self._trunk(token, positions, kv_cache.views(positions, span=kv_cache.max_length))  # (B, 1, C)
        return self._logits(x[:, -1, :])[:, : self.config.vocab_size]  # (B, V)

    def loss(self, idx: Tensor, targets: Tensor, chunk_rows: int = 1024) -> Tensor:
        """The training loss alone, as ``forward(idx, targets)[1]``, without materialising the logits.

        The LM head and cross-entropy run ``chunk_rows`` rows at a time (``ChunkedLMHeadLoss``), so a 50k
        vocabulary costs chunk_rows x V floats instead of several B·T x V tensors. For training steps.
        """
        x = self._hidden(idx, None)  # (B, T, C)
        flat = x.view(-1, x.size(-1))  # (B·T, C)
        # Inside an autograd.Function grad mode is always off, so whether gradients are wanted is passed in.
        grads = torch.is_grad_enabled()
        cap = self.config.logit_softcap
        return ChunkedLMHeadLoss.apply(flat, self.lm_head.weight, targets.reshape(-1), chunk_rows, grads, cap)

    def new_kv_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty key/value cache for ``batch_size`` sequences of up to block_size tokens; device and dtype
        default to the model's parameters. Grouped-query attention caches only its key/value heads."""
        c, weight = self.config, self.wte.weight
        shape = (c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        return KVCache(*shape, device or weight.device, dtype or weight.dtype, n_kv_head=c.kv_heads)

    @torch.no_grad()
    def attention_maps(self, idx: Tensor) -> Tensor:
        """Softmax attention weights of every layer and head: (n_layer, B, n_head, T, T).

        The forward pass with the softmax spelled out (not fused), the weights kept before attention dropout;
        call ``eval()`` first so the embedding and residual dropout do not perturb them.
        """
        maps: list[Tensor] = []
        self._hidden(idx, None, maps)
        return torch.stack(maps)  # (n_layer, B, nh, T, T)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, the tied embedding/LM-head matrix counted once (padding rows included).

        ``non_embedding`` subtracts the position embeddings (if any). The token embeddings stay in because,
        tied, they are also the output layer's weights.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared Parameter once
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n
