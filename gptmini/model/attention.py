"""The model's attention: causal multi-head self-attention with a fused QKV projection and PyTorch's SDPA.

Chapter 3 builds this up rung by rung (``gptmini.book.attention``); the model keeps only the last rung.
``qkv`` maps n_embd to [queries | keys | values] (within each part, head h owns features h·hs to (h+1)·hs)
and ``proj`` mixes the concatenated heads. With grouped-query attention (``n_kv_head`` < n_head) ``qkv`` has
n_embd + 2·n_kv_head·hs rows. Every shape comes from a ``GPTConfig``, which has checked them.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptmini.model.config import GPTConfig
from gptmini.model.kv_cache import CacheView


def rope_tables(head_size: int, length: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotary angles, each (length, head_size // 2): position p, pair i: p·base^(-2i/hs)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (i, i + hs/2) of x (B, h, T, hs) by each position's angles cos, sin (.., T, hs/2).

    A rotation by an angle proportional to the position makes the query·key product depend on the two
    positions only through their difference: attention sees relative positions, and no learned table caps
    the length.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, h, T, hs)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention: fused QKV projection, PyTorch's SDPA kernel, an optional KV cache.

    ``scaled_dot_product_attention`` picks a fused kernel (FlashAttention / memory-efficient on GPUs) that
    never materialises the (T, T) weight matrix; asked for attention maps, the same pass spells the softmax
    out instead, so the weights can be kept.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        c = config
        self.n_embd, self.n_head, self.n_kv_head = c.n_embd, c.n_head, c.kv_heads
        self.head_size = c.n_embd // c.n_head
        self.kv_size = self.n_kv_head * self.head_size  # features of all key (or value) heads together
        self.block_size, self.dropout, self.qk_norm = c.block_size, c.dropout, c.qk_norm
        self.rope = c.pos_emb == "rope"
        self.qkv = nn.Linear(c.n_embd, c.n_embd + 2 * self.kv_size, bias=c.bias)  # [queries | keys | values]
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.attn_dropout = nn.Dropout(c.dropout)
        self.resid_dropout = nn.Dropout(c.dropout)
        if self.rope:
            # Rebuilt from the config, so not saved: checkpoints hold weights only.
            cos, sin = rope_tables(self.head_size, c.block_size, c.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hs/2)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: CacheView | None = None,
        maps: list[Tensor] | None = None,
        value_embed: Tensor | None = None,
    ) -> Tensor:
        """(B, T, C) to (B, T, C).

        Args:
            x: the T new tokens' (normalised) hidden states.
            positions: (B or 1, T) each token's position, for RoPE; None = 0..T-1.
            cache: this layer's ``CacheView``: the new keys/values are written into it and the queries attend
                to its slots under its mask. Without one, attention is causal over x.
            maps: a list to append the softmax weights (B, nh, T, S) to (attention maps); they are then
                computed explicitly, before dropout, instead of inside the fused kernel.
            value_embed: (B, T, nkv·hs) the tokens' value embeddings (``value_embeds``), added to the values.
        """
        B, T, _ = x.shape
        q, k, v = self._project(x, positions, value_embed)  # (B, nh, T, hs), (B, nkv, T, hs) twice
        # None: causal, the T queries being the last T keys, which lets SDPA use its fastest kernels
        mask = None
        if cache is not None:
            k, v = cache.write(k, v)  # (B, nkv, S, hs): the cached tokens' and the new ones'
            mask = cache.mask  # (B, 1, T, S), or None (one new token over the filled slots, or S == T)
        if maps is None:
            dropout_p = self.dropout if self.training else 0.0
            gqa = self.n_kv_head != self.n_head  # SDPA lines key/value head h // group up with query head h
            causal = mask is None and T > 1  # a single query sees every key: nothing to mask
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa
            )
        else:
            y = self._explicit(q, k, v, mask, maps)
        y = y.transpose(1, 2).reshape(B, T, self.n_embd)  # (B, T, C): heads side by side
        return self.resid_dropout(self.proj(y))

    def _project(
        self, x: Tensor, positions: Tensor | None, value_embed: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project (B, T, C) once and split into per-head queries (B, nh, T, hs) and keys, values
        (B, nkv, T, hs); normalised and rotated when those switches are on, the value embeddings added."""
        B, T, _ = x.shape
        # split_with_sizes: Tensor.split's Python wrapper costs twice the split itself, per layer and token
        q, k, v = self.qkv(x).split_with_sizes([self.n_embd, self.kv_size, self.kv_size], dim=2)
        if value_embed is not None:
            v = v + value_embed  # (B, T, nkv·hs): what the token is, straight into what it passes on
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            # Unit RMS per head: the query·key logits can no longer grow without bound as weights grow.
            q, k = F.rms_norm(q, (self.head_size,)), F.rms_norm(k, (self.head_size,))
        if self.rope:
            if positions is None:
                positions = torch.arange(T, device=x.device).view(1, T)
            # (B or 1, 1, T, hs/2): one angle table row per token, shared by the heads; q's dtype (autocast)
            cos, sin = (table[positions].unsqueeze(1).to(q.dtype) for table in (self.rope_cos, self.rope_sin))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, maps: list[Tensor]) -> Tensor:
        """softmax(q·kᵀ / √hs)·v spelled out, the weights appended to ``maps``: (B, nh, T, hs)."""
        group = self.n_head // self.n_kv_head  # query head h reads key/value head h // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, S, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_size)  # (B, nh, T, S)
        if mask is None:  # causal, the T queries being the last T of the S keys
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
        # -inf before the softmax keeps every row a distribution over the visible keys only.
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        maps.append(weights)
        return self.attn_dropout(weights) @ v
