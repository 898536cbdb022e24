"""Chapter 3's worked example, step by step, with every number the book prints.

Each step builds its module right after the book's ``torch.manual_seed`` call, in the book's order, so the
random initial weights -- and therefore the printed context vectors -- are the ones a reader of chapter 3
sees. ``chapter3_numbers`` computes them (the tests pin them); ``main`` prints them. Run it with
``python -m gptmini.book.walkthrough``.

The model's attention (``gptmini.model.attention.CausalSelfAttention``) stores all heads in one fused ``qkv``
matrix; ``fused_from_stacked_heads`` loads the book's separate heads into it, so the walkthrough can show
that the model computes the book's numbers.

One rung goes beyond chapter 3: grouped-query attention (``gqa_numbers``), which shares key/value heads
between query heads so that a KV cache holds fewer of them.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from gptmini.book.attention import (
    EXAMPLE_INPUTS,
    EXAMPLE_WORDS,
    CausalAttention,
    CompactMultiHeadAttention,
    GroupedQueryAttention,
    SelfAttention,
    SelfAttentionV1,
    StackedHeadsAttention,
    simplified_self_attention,
)
from gptmini.common import GptMiniError
from gptmini.model.attention import CausalSelfAttention
from gptmini.model.config import GPTConfig


def fused_from_stacked_heads(stacked: StackedHeadsAttention) -> CausalSelfAttention:
    """Copy the book's separate causal heads into the model's attention, with its fused layout.

    The fused layout is square: it reads and writes n_embd = num_heads·d_out features. The book's heads read
    d_in features (3 in the example, fewer than 2·2 = 4), so the extra input columns of ``qkv`` get zero
    weight: feed the result inputs zero-padded to n_embd features and the padding adds nothing to any dot
    product. ``proj`` becomes the identity because the book's wrapper just concatenates the heads. Outputs
    then equal ``stacked``'s (in eval mode or with dropout 0: the model also drops after ``proj``).
    """
    heads: list[CausalAttention] = list(stacked.heads)
    d_out, d_in = heads[0].W_query.weight.shape
    n_head, n_embd = len(heads), len(heads) * d_out
    if d_in > n_embd:
        raise GptMiniError(
            f"d_in={d_in} is wider than num_heads·d_out={n_embd}; the fused layout can't hold it"
        )
    bias = heads[0].W_query.bias is not None
    block_size, dropout = heads[0].mask.size(0), heads[0].dropout.p
    fused = CausalSelfAttention(
        GPTConfig(n_embd=n_embd, n_head=n_head, block_size=block_size, dropout=dropout, bias=bias)
    )
    with torch.no_grad():
        fused.qkv.weight.zero_()
        fused.proj.weight.copy_(torch.eye(n_embd))
        if bias:
            fused.qkv.bias.zero_()
            fused.proj.bias.zero_()
        for h, head in enumerate(heads):
            for part, layer in enumerate([head.W_query, head.W_key, head.W_value]):
                # qkv's rows are [queries | keys | values]; in each third, head h owns rows h·d_out onward.
                rows = slice(part * n_embd + h * d_out, part * n_embd + (h + 1) * d_out)
                fused.qkv.weight[rows, :d_in] = layer.weight  # (d_out, d_in) into (d_out, n_embd)
                if bias:
                    fused.qkv.bias[rows] = layer.bias
    return fused


@torch.no_grad()
def chapter3_numbers() -> dict[str, Tensor]:
    """Every number the walkthrough prints, keyed by name, computed with the book's seeds and order."""
    inputs = torch.tensor(EXAMPLE_INPUTS)  # (6, 3)
    batch = torch.stack([inputs, inputs])  # (2, 6, 3): two copies, to show batching
    scores, weights, context = simplified_self_attention(inputs)
    numbers = {"scores_2": scores[1], "weights_2": weights[1], "context_2": context[1]}

    torch.manual_seed(123)
    numbers["self_attention_v1_z2"] = SelfAttentionV1(3, 2)(inputs)[1]
    torch.manual_seed(789)
    numbers["self_attention_row1"] = SelfAttention(3, 2)(inputs)[0]
    torch.manual_seed(123)
    numbers["causal_row1"] = CausalAttention(3, 2, 6, 0.0)(batch)[0, 0]
    torch.manual_seed(123)
    stacked = StackedHeadsAttention(3, 2, 6, 0.0, num_heads=2)
    numbers["stacked_row1"] = stacked(batch)[0, 0]
    torch.manual_seed(123)
    numbers["compact_row1"] = CompactMultiHeadAttention(3, 2, 6, 0.0, num_heads=2)(batch)[0, 0]

    # The same two heads in the model's attention: its fused kernel, then its explicit softmax (maps).
    fused = fused_from_stacked_heads(stacked)
    padded = F.pad(batch, (0, fused.n_embd - batch.size(-1)))  # (2, 6, 4): a zero 4th feature
    numbers["model_row1"] = fused(padded)[0, 0]
    numbers["model_explicit_row1"] = fused(padded, maps=[])[0, 0]
    return numbers


@torch.no_grad()
def gqa_numbers() -> dict[str, Tensor | int]:
    """Grouped-query attention on the example: 2 query heads, first with 2 key/value heads, then 1.

    With as many key/value heads as query heads, GQA is the book's ``CompactMultiHeadAttention``: loaded
    with its seed-123 weights it gives the same first row. With one key/value head (multi-query attention)
    both query heads read the same keys and values, and a KV cache keeps half the numbers per token.
    """
    batch = torch.stack([torch.tensor(EXAMPLE_INPUTS)] * 2)  # (2, 6, 3)
    torch.manual_seed(123)
    compact = CompactMultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    as_mha = GroupedQueryAttention(3, 2, 6, 0.0, num_heads=2, num_kv_groups=2)
    as_mha.load_state_dict(compact.state_dict())
    torch.manual_seed(123)
    mqa = GroupedQueryAttention(3, 2, 6, 0.0, num_heads=2, num_kv_groups=1)
    return {
        "gqa_2_groups_row1": as_mha(batch)[0, 0],
        "gqa_1_group_row1": mqa(batch)[0, 0],
        "cache_floats_mha": as_mha.kv_cache_floats_per_token(),
        "cache_floats_mqa": mqa.kv_cache_floats_per_token(),
    }


def _fmt(t: Tensor) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in t.tolist()) + "]"


def main() -> None:
    """Print the worked example: query "journey" (x², row index 1) in step 1, then each rung's output."""
    n = chapter3_numbers()
    print('Inputs: one 3-d embedding per word of "Your journey starts with one step"')
    for word, row in zip(EXAMPLE_WORDS, EXAMPLE_INPUTS, strict=True):
        print(f"  {word:<8} {_fmt(torch.tensor(row))}")
    print('\n1. Simplified self-attention, query x² = "journey"')
    print(f"  scores  ω₂ = x²·xᵢ      {_fmt(n['scores_2'])}")
    print(f"  weights α₂ = softmax(ω₂) {_fmt(n['weights_2'])}  (sum {n['weights_2'].sum():.4f})")
    print(f"  context z² = Σ α₂ᵢ·xᵢ    {_fmt(n['context_2'])}")
    print("\n2. Trainable weights, d_in 3, d_out 2")
    print(f"  seed 123, SelfAttentionV1(3, 2) (nn.Parameter): context z²   {_fmt(n['self_attention_v1_z2'])}")
    print(f"  seed 789, SelfAttention(3, 2) (nn.Linear):      first row    {_fmt(n['self_attention_row1'])}")
    print("\n3. Causal attention on a batch of two copies (2, 6, 3), dropout 0.0")
    print(f"  seed 123, CausalAttention(3, 2, 6, 0.0):        first row    {_fmt(n['causal_row1'])}")
    print(
        "\n4. Multi-head attention, 2 heads, seed 123 (stacked: 2 features per head; compact: d_out 2 in all)"
    )
    print(f"  StackedHeadsAttention(3, 2, 6, 0.0, num_heads=2):     first row {_fmt(n['stacked_row1'])}")
    print(f"  CompactMultiHeadAttention(3, 2, 6, 0.0, num_heads=2): first row {_fmt(n['compact_row1'])}")
    g = gqa_numbers()
    print("\n5. Grouped-query attention (beyond chapter 3): query heads share key/value heads")
    print(f"  2 key/value heads, compact's seed-123 weights: first row {_fmt(g['gqa_2_groups_row1'])}")
    print(f"  1 key/value head (multi-query), seed 123:      first row {_fmt(g['gqa_1_group_row1'])}")
    print(
        f"  KV cache per token: {g['cache_floats_mha']} numbers with 2 key/value heads, "
        f"{g['cache_floats_mqa']} with 1: decoding reads that much less memory per token"
    )
    print("\n6. The stacked heads' weights in the model's attention (inputs zero-padded to 4 features)")
    print(f"  CausalSelfAttention, SDPA kernel:      first row {_fmt(n['model_row1'])}")
    print(f"  CausalSelfAttention, explicit softmax: first row {_fmt(n['model_explicit_row1'])}")


if __name__ == "__main__":
    main()
