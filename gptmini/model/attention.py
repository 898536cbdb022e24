"""Every attention computation in gptmini: chapter 3's ladder and the attention the model trains with.

The rungs of chapter 3 of "Build a Large Language Model (From Scratch)" keep the book's argument names and
order of building weights, so the book's seeds give the book's numbers; ``# new here:`` marks what each adds.

1. ``simplified_self_attention``: no trainable weights; softmax of dot-product similarities, weighted sum.
2. ``SelfAttentionV1``: trainable query/key/value matrices and scaled scores; ``SelfAttention``: the same
   with ``nn.Linear`` layers and an optional bias.
3. ``CausalAttention``: future positions masked, dropout on the attention weights, batched input.
4. Multi-head as the book writes it: ``StackedHeadsAttention`` (the book's ``MultiHeadAttentionWrapper``)
   concatenates causal heads; ``CompactMultiHeadAttention`` (the book's ``MultiHeadAttention``) splits one
   projection per query/key/value into heads by reshaping and mixes them with ``out_proj``.
5. ``GroupedQueryAttention``: several query heads share one key/value head, so a KV cache holds fewer heads.
6. The model's classes, by name in ``ATTENTION_CLASSES``: ``MultiHeadAttentionWrapper`` ("heads"),
   ``MultiHeadAttention`` ("mha") and ``CausalSelfAttention`` ("sdpa": PyTorch's fused kernel, a KV cache).
   They share ONE weight layout -- ``qkv`` (3·n_embd, n_embd), ``proj`` (n_embd, n_embd) -- and one
   constructor ``(n_embd, n_head, block_size, dropout, bias)``: n_embd = d_in = d_out, n_head = num_heads,
   block_size = context_length, bias = qkv_bias (and proj's bias). A state_dict loads into each of them.
   "mha" and "sdpa" also take the switches beyond GPT-2 as keywords: ``n_kv_head`` (grouped-query keys and
   values; ``qkv`` then has n_embd + 2·n_kv_head·hs rows), ``rope_base`` (rotary positions) and ``qk_norm``.
   Given a key/value cache (generation), all three decode through the SDPA path on their shared weights.

``python -m gptmini.model.walkthrough`` runs the worked example with the book's numbers.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptmini.common import GptMiniError
from gptmini.model.kv_cache import LayerKVCache

# ---------------------------------------------------------------------------------------------------------
# 1. Simplified self-attention (no trainable weights)
# ---------------------------------------------------------------------------------------------------------

# The chapter's running example: "Your journey starts with one step", one 3-d embedding per word.
EXAMPLE_WORDS = ["Your", "journey", "starts", "with", "one", "step"]
EXAMPLE_INPUTS = [
    [0.43, 0.15, 0.89],
    [0.55, 0.87, 0.66],
    [0.57, 0.85, 0.64],
    [0.22, 0.58, 0.33],
    [0.77, 0.25, 0.10],
    [0.05, 0.80, 0.55],
]


def simplified_self_attention(inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Attention without trainable weights: similarity scores, softmax, weighted sum.

    Args:
        inputs: (T, d) one embedding per token.

    Returns:
        scores (T, T) dot products x_i·x_j, weights (T, T) row-wise softmax of the scores (each row sums to
        1), and context (T, d) where row i is the weights-weighted sum of all inputs.
    """
    scores = inputs @ inputs.T  # (T, T): row i holds query i's similarity to every token
    weights = torch.softmax(scores, dim=-1)  # normalise each row so the weights are positive and sum to 1
    context = weights @ inputs  # (T, d): row i = sum_j weights[i, j] * inputs[j]
    return scores, weights, context


# ---------------------------------------------------------------------------------------------------------
# 2. Self-attention with trainable weights
# ---------------------------------------------------------------------------------------------------------


class SelfAttentionV1(nn.Module):
    """Scaled dot-product attention with trainable query, key and value matrices (one head, no mask)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        # new here: trainable d_in -> d_out matrices, uniform in [0, 1), drawn in the book's order (q, k, v)
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: Tensor) -> Tensor:
        """Map (T, d_in) to context vectors (T, d_out)."""
        queries, keys, values = x @ self.W_query, x @ self.W_key, x @ self.W_value  # (T, d_out) each
        scores = queries @ keys.T  # (T, T)
        # Dividing by sqrt(d_k) keeps the scores' spread independent of the key size, so the softmax does not
        # saturate into near one-hot weights (whose gradients vanish) as d_out grows.
        weights = torch.softmax(scores / math.sqrt(keys.size(-1)), dim=-1)
        return weights @ values  # (T, d_out)


class SelfAttention(nn.Module):
    """``SelfAttentionV1`` with ``nn.Linear`` projections: better initialisation, optional bias."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        # new here: nn.Linear layers (weights stored transposed, (d_out, d_in)) and qkv_bias
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map (..., T, d_in) to context vectors (..., T, d_out)."""
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)  # (..., T, d_out) each
        scores = queries @ keys.transpose(-2, -1)  # (..., T, T)
        weights = torch.softmax(scores / math.sqrt(keys.size(-1)), dim=-1)
        return weights @ values  # (..., T, d_out)


# ---------------------------------------------------------------------------------------------------------
# 3. Causal attention
# ---------------------------------------------------------------------------------------------------------


def causal_mask(size: int, device: torch.device | None = None) -> Tensor:
    """(size, size) bool mask, True above the diagonal: the future positions a query must not see."""
    return torch.triu(torch.ones(size, size, dtype=torch.bool, device=device), diagonal=1)


class CausalAttention(SelfAttention):
    """One causal attention head: each token attends only to itself and earlier tokens."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__(d_in, d_out, qkv_bias)  # W_query, W_key, W_value, built in that order
        self.dropout = nn.Dropout(dropout)  # new here: dropout on the attention weights
        # new here: the mask for up to context_length tokens. A buffer moves with .to(device) but is not
        # trained; not persistent because it is rebuilt from context_length and need not bloat checkpoints.
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, T, d_in) to (B, T, d_out); T may be at most context_length."""
        num_tokens = x.size(1)
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)  # (B, T, d_out) each
        scores = queries @ keys.transpose(1, 2)  # (B, T, T)
        # -inf before the softmax (rather than zeroing after it) keeps every row a proper distribution over
        # the visible tokens only.
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        weights = torch.softmax(scores / math.sqrt(keys.size(-1)), dim=-1)
        weights = self.dropout(weights)  # randomly drop attention links while training (regularisation)
        return weights @ values  # (B, T, d_out)


# ---------------------------------------------------------------------------------------------------------
# 4. Multi-head attention as the book writes it: separate weights, d_in -> d_out
# ---------------------------------------------------------------------------------------------------------


class StackedHeadsAttention(nn.Module):
    """The book's ``MultiHeadAttentionWrapper``: num_heads causal heads side by side, no output projection."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias=False
    ):
        super().__init__()
        # new here: num_heads independent heads, built one after another (head 0's weights come first)
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, T, d_in) to (B, T, num_heads·d_out): each head's d_out features, head 0 first."""
        return torch.cat([head(x) for head in self.heads], dim=-1)


class CompactMultiHeadAttention(CausalAttention):
    """The book's ``MultiHeadAttention``: num_heads causal heads of d_out // num_heads features each."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias=False
    ):
        if d_out % num_heads != 0:
            raise GptMiniError(f"d_out={d_out} is not divisible by num_heads={num_heads}")
        super().__init__(d_in, d_out, context_length, dropout, qkv_bias)
        # new here: the heads split d_out (rather than each producing d_out) ...
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        # ... and an output projection mixes their features (built last, as in the book; always with a bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, T, d_in) to (B, T, d_out)."""
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)  # head h owns features h·hd to (h+1)·hd
        queries = self.W_query(x).view(shape).transpose(1, 2)  # (B, nh, T, hd)
        keys = self.W_key(x).view(shape).transpose(1, 2)  # (B, nh, T, hd)
        values = self.W_value(x).view(shape).transpose(1, 2)  # (B, nh, T, hd)
        scores = queries @ keys.transpose(2, 3)  # (B, nh, T, T): all heads in one batched matmul
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        weights = self.dropout(torch.softmax(scores / math.sqrt(self.head_dim), dim=-1))
        context = (weights @ values).transpose(1, 2)  # (B, T, nh, hd)
        context = context.contiguous().view(B, T, self.d_out)  # (B, T, d_out): heads side by side
        return self.out_proj(context)


# ---------------------------------------------------------------------------------------------------------
# 5. Grouped-query attention: fewer key/value heads than query heads
# ---------------------------------------------------------------------------------------------------------


class GroupedQueryAttention(nn.Module):
    """``CompactMultiHeadAttention`` with ``num_kv_groups`` key/value heads shared by ``num_heads`` queries.

    Why: when a model generates, it keeps every past token's keys and values (the KV cache) and reads all of
    them for each new token. Decoding is bound by that memory traffic more than by arithmetic. Query heads
    in a group of num_heads // num_kv_groups share one key head and one value head, so the cache, and the
    bytes read per generated token, shrink by that factor; the queries keep their full variety. One group is
    multi-query attention (MQA); num_kv_groups = num_heads is multi-head attention again, and then this
    module computes exactly what ``CompactMultiHeadAttention`` does with the same weights.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        num_kv_groups: int,
        qkv_bias=False,
    ):
        super().__init__()
        if d_out % num_heads != 0 or num_heads % num_kv_groups != 0:
            raise GptMiniError(
                f"d_out={d_out} must be divisible by num_heads={num_heads}, and num_heads by "
                f"num_kv_groups={num_kv_groups}"
            )
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.num_kv_groups, self.group_size = num_kv_groups, num_heads // num_kv_groups
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        # new here: keys and values are only num_kv_groups heads wide
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_mask(context_length), persistent=False)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, T, d_in) to (B, T, d_out)."""
        B, T, _ = x.shape
        queries = self.W_query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        kv_shape = (B, T, self.num_kv_groups, self.head_dim)
        keys = self.W_key(x).view(kv_shape).transpose(1, 2)  # (B, ng, T, hd)
        values = self.W_value(x).view(kv_shape).transpose(1, 2)  # (B, ng, T, hd)
        # new here: each key/value head serves group_size consecutive query heads (query head h uses group
        # h // group_size); repeating them lines the groups up with the queries for one batched matmul.
        keys = keys.repeat_interleave(self.group_size, dim=1)  # (B, nh, T, hd)
        values = values.repeat_interleave(self.group_size, dim=1)  # (B, nh, T, hd)
        scores = queries @ keys.transpose(2, 3)  # (B, nh, T, T)
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        weights = self.dropout(torch.softmax(scores / math.sqrt(self.head_dim), dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(B, T, self.d_out)  # (B, T, d_out)
        return self.out_proj(context)

    def kv_cache_floats_per_token(self) -> int:
        """Numbers a KV cache keeps per token: keys and values of num_kv_groups heads (num_heads in MHA)."""
        return 2 * self.num_kv_groups * self.head_dim


# ---------------------------------------------------------------------------------------------------------
# 6. The model-facing multi-head attention: one weight layout, three ways to compute it
# ---------------------------------------------------------------------------------------------------------


def rope_tables(head_size: int, length: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotary angles, each (length, head_size // 2): position p, pair i: p·base^(-2i/hs)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (i, i + hs/2) of x (B, h, T, hs) by each position's angles, cos/sin (T, hs/2).

    A rotation by an angle proportional to the position makes the query·key product depend on the two
    positions only through their difference: attention sees relative positions, and no learned table caps
    the length.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, h, T, hs)


class _FusedMultiHead(nn.Module):
    """The parameters every multi-head variant shares, so one state_dict loads into each of them.

    ``qkv`` maps n_embd to [queries | keys | values] (3·n_embd outputs); within each third, head h owns
    features h·hs to (h+1)·hs where hs = n_embd // n_head. ``proj`` mixes the concatenated heads.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        block_size: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        n_kv_head: int | None = None,
        rope_base: float | None = None,
        qk_norm: bool = False,
    ):
        super().__init__()
        if n_embd % n_head != 0:
            raise GptMiniError(
                f"n_embd={n_embd} is not divisible by n_head={n_head}; pick n_head that divides n_embd"
            )
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head % n_kv_head != 0:
            raise GptMiniError(f"n_head={n_head} is not divisible by n_kv_head={n_kv_head}")
        self.n_embd = n_embd
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_size = n_embd // n_head
        self.kv_size = n_kv_head * self.head_size  # features of all key (or value) heads together
        self.block_size = block_size
        self.dropout = dropout
        self.qk_norm = qk_norm
        self.rope = rope_base is not None
        self.qkv = nn.Linear(n_embd, n_embd + 2 * self.kv_size, bias=bias)  # [queries | keys | values]
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        if self.rope:
            if self.head_size % 2:
                raise GptMiniError(f"RoPE needs an even head size, got {self.head_size}")
            # Rebuilt from the config, so not saved: checkpoints hold weights only.
            cos, sin = rope_tables(self.head_size, block_size, rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hs/2)

    def _heads_qkv(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Project (B, T, C) once and split into per-head queries (B, nh, T, hs) and keys, values
        (B, n_kv_head, T, hs); ``start`` is the position of the first token (for RoPE)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([self.n_embd, self.kv_size, self.kv_size], dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            # Unit RMS per head: the query·key logits can no longer grow without bound as weights grow.
            q, k = F.rms_norm(q, (self.head_size,)), F.rms_norm(k, (self.head_size,))
        if self.rope:
            if isinstance(start, Tensor):  # a decoding step's position, as a tensor (see GPT.decode_step)
                cos, sin = (table.index_select(0, start.view(1)) for table in (self.rope_cos, self.rope_sin))
            else:
                cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hs/2)
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under autocast q may be bf16
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _repeat_kv(self, k: Tensor) -> Tensor:
        """(B, nkv, T, hs) to (B, nh, T, hs): query head h reads key/value head h // (nh // nkv)."""
        if self.n_kv_head == self.n_head:
            return k
        return k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)

    def _merge_heads(self, y: Tensor) -> Tensor:
        """(B, nh, T, hs) back to (B, T, C), then the output projection and residual dropout."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)  # (B, T, C): heads side by side
        return self.resid_dropout(self.proj(y))

    def _sdpa(self, x: Tensor, kv_cache: "LayerKVCache | None" = None) -> Tensor:
        """Attention through PyTorch's SDPA kernel: (B, T, C) to (B, T, C).

        The "sdpa" variant's forward, and every variant's forward with a key/value cache: decoding one token
        at a time needs the cached keys and values, and all variants share these weights, so "heads" and
        "mha" decode through this path too (their explicit (T, T) form is the one to read and train).

        With ``kv_cache`` the T new tokens sit at positions cache.start..cache.start+T: their keys/values are
        appended and the queries attend to every cached position plus the new ones up to themselves.
        """
        start = 0 if kv_cache is None else kv_cache.start
        q, k, v = self._heads_qkv(x, start)  # (B, nh, T, hs), (B, nkv, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, nkv, start+T, hs)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head  # SDPA lines key/value head h // group up with query head h
        T = q.size(2)
        if kv_cache is not None and kv_cache.visible is not None:
            # A decoding step with fixed shapes: the whole cache buffer, its unfilled positions masked.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.visible, enable_gqa=gqa)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        elif T == 1:
            # One new token is the latest position: it may see everything, so no mask is needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
        else:
            # Several new tokens after a cached prefix: is_causal would align the triangle top-left (wrong
            # here), so spell out that query i (absolute position start+i) sees keys 0..start+i.
            visible = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=visible, dropout_p=dropout_p, enable_gqa=gqa
            )
        return self._merge_heads(y)  # (B, nh, T, hs) -> (B, T, C)

    def attention_weights(self, x: Tensor) -> Tensor:
        """Softmax attention weights (B, nh, T, T), computed explicitly and before dropout: attention maps."""
        q, k, _ = self._heads_qkv(x)  # (B, nh, T, hs), (B, nkv, T, hs)
        scores = q @ self._repeat_kv(k).transpose(-2, -1) / math.sqrt(self.head_size)  # (B, nh, T, T)
        scores = scores.masked_fill(causal_mask(x.size(1), x.device), float("-inf"))
        return torch.softmax(scores, dim=-1)


class MultiHeadAttentionWrapper(_FusedMultiHead):
    """``StackedHeadsAttention`` on the shared layout: n_head causal heads one after another, then ``proj``.

    Head h's query/key/value weights are row slices of the fused ``qkv`` matrix rather than separate Linear
    layers, so this variant has the same state_dict as the faster ones (and ``fused_from_stacked_heads`` in
    the walkthrough loads the book's heads into it). Slow on purpose: n_head small matmuls instead of one.
    """

    def __init__(
        self, n_embd: int, n_head: int, block_size: int, dropout: float = 0.0, bias: bool = True, **switches
    ):
        grouped = switches.get("n_kv_head") not in (None, n_head)
        if grouped or switches.get("rope_base") is not None or switches.get("qk_norm"):
            raise GptMiniError(
                "attention='heads' has GPT-2's attention only; use 'mha' or 'sdpa' for n_kv_head, "
                "RoPE or qk_norm"
            )
        super().__init__(n_embd, n_head, block_size, dropout, bias)
        self.register_buffer("mask", causal_mask(block_size), persistent=False)

    def _head(self, x: Tensor, h: int) -> Tensor:
        """Head h on its own: (B, T, C) to (B, T, hs)."""
        C, hs, T = self.n_embd, self.head_size, x.size(1)
        # Head h's rows of qkv.weight for its queries, keys and values (thirds starting at 0, C and 2C).
        rows = [slice(part * C + h * hs, part * C + (h + 1) * hs) for part in range(3)]
        bias = self.qkv.bias
        q, k, v = (F.linear(x, self.qkv.weight[r], None if bias is None else bias[r]) for r in rows)
        scores = q @ k.transpose(1, 2)  # (B, T, T)
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        weights = self.attn_dropout(torch.softmax(scores / math.sqrt(hs), dim=-1))
        return weights @ v  # (B, T, hs)

    def forward(self, x: Tensor, kv_cache: "LayerKVCache | None" = None) -> Tensor:
        """Map (B, T, C) to (B, T, C); with ``kv_cache`` (generation), through ``_sdpa``."""
        if kv_cache is not None:
            return self._sdpa(x, kv_cache)
        heads = [self._head(x, h) for h in range(self.n_head)]  # n_head tensors of (B, T, hs)
        return self.resid_dropout(self.proj(torch.cat(heads, dim=-1)))  # (B, T, C)


class MultiHeadAttention(_FusedMultiHead):
    """``CompactMultiHeadAttention`` on the shared layout: one fused projection, heads batched together."""

    def __init__(
        self, n_embd: int, n_head: int, block_size: int, dropout: float = 0.0, bias: bool = True, **switches
    ):
        super().__init__(n_embd, n_head, block_size, dropout, bias, **switches)
        self.register_buffer("mask", causal_mask(block_size), persistent=False)

    def forward(self, x: Tensor, kv_cache: "LayerKVCache | None" = None) -> Tensor:
        """Map (B, T, C) to (B, T, C); with ``kv_cache`` (generation), through ``_sdpa``."""
        if kv_cache is not None:
            return self._sdpa(x, kv_cache)
        T = x.size(1)
        q, k, v = self._heads_qkv(x)  # (B, nh, T, hs), (B, nkv, T, hs)
        k, v = self._repeat_kv(k), self._repeat_kv(v)  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1)  # (B, nh, T, T): all heads in one batched matmul
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        weights = self.attn_dropout(torch.softmax(scores / math.sqrt(self.head_size), dim=-1))
        return self._merge_heads(weights @ v)  # (B, nh, T, hs) -> (B, T, C)


class CausalSelfAttention(_FusedMultiHead):
    """Efficient causal multi-head attention: fused QKV projection + PyTorch's SDPA kernel + a KV cache.

    ``scaled_dot_product_attention`` picks a fused kernel (FlashAttention / memory-efficient on GPUs) that
    never materialises the (T, T) weight matrix; ``attention_weights`` is the explicit path for inspecting it.
    """

    def forward(self, x: Tensor, kv_cache: LayerKVCache | None = None) -> Tensor:
        """Map (B, T, C) to (B, T, C); with ``kv_cache``, as ``_sdpa`` describes."""
        return self._sdpa(x, kv_cache)


# The names the model config uses to pick an attention implementation.
ATTENTION_CLASSES: dict[str, type[_FusedMultiHead]] = {
    "heads": MultiHeadAttentionWrapper,
    "mha": MultiHeadAttention,
    "sdpa": CausalSelfAttention,
}
