"""Chapter 3's attention ladder, rung by rung: the book beside the model.

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

The model trains with none of these classes: ``gptmini.model.attention.CausalSelfAttention`` computes rung 5
with one fused ``qkv`` projection and PyTorch's SDPA kernel. The walkthrough (``python -m
gptmini.book.walkthrough``) loads the book's heads into it and gets the book's numbers.
"""

import math

import torch
from torch import Tensor, nn

from gptmini.common import GptMiniError

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
