"""The book beside the model (gptmini.book): chapter 3's rungs with the book's printed numbers, the
walkthrough, and each multi-head rung agreeing with the model's attention on the same weights."""

import inspect
import subprocess
import sys

import pytest
import torch

from gptmini.book.attention import (
    EXAMPLE_INPUTS,
    CausalAttention,
    CompactMultiHeadAttention,
    GroupedQueryAttention,
    SelfAttention,
    SelfAttentionV1,
    StackedHeadsAttention,
    simplified_self_attention,
)
from gptmini.book.walkthrough import chapter3_numbers, fused_from_stacked_heads, gqa_numbers, main
from gptmini.common import GptMiniError
from gptmini.model.attention import CausalSelfAttention
from gptmini.model.config import GPTConfig


def test_worked_example_numbers():
    scores, weights, context = simplified_self_attention(torch.tensor(EXAMPLE_INPUTS))
    expected_scores = [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]
    expected_weights = [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]
    expected_context = [0.4419, 0.6515, 0.5683]
    torch.testing.assert_close(scores[1], torch.tensor(expected_scores), atol=5e-5, rtol=0)
    torch.testing.assert_close(weights[1], torch.tensor(expected_weights), atol=5e-5, rtol=0)
    torch.testing.assert_close(context[1], torch.tensor(expected_context), atol=5e-5, rtol=0)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))


def _assert_causal(module: torch.nn.Module, x: torch.Tensor, t: int) -> None:
    """Changing inputs after position t must leave outputs at positions <= t unchanged."""
    module.eval()
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
    with torch.no_grad():
        before, after = module(x), module(changed)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=1e-5, atol=1e-6)
    if t + 1 < x.size(1):
        assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])  # the later outputs did change


def test_causal_attention_is_causal():
    torch.manual_seed(0)
    _assert_causal(CausalAttention(8, 4, context_length=16, dropout=0.0), torch.randn(2, 12, 8), t=3)


# ---------------------------------------------------------------------------------------------------------
# The book's numbers: chapter 3's notebook output on the six-word example, with the book's seeds
# ---------------------------------------------------------------------------------------------------------

BOOK_SELF_ATTENTION_V1 = [  # seed 123, SelfAttention_v1(3, 2); row 1 is z²
    [0.2996, 0.8053],
    [0.3061, 0.8210],
    [0.3058, 0.8203],
    [0.2948, 0.7939],
    [0.2927, 0.7891],
    [0.2990, 0.8040],
]
BOOK_SELF_ATTENTION_V2 = [  # seed 789, SelfAttention_v2(3, 2)
    [-0.0739, 0.0713],
    [-0.0748, 0.0703],
    [-0.0749, 0.0702],
    [-0.0760, 0.0685],
    [-0.0763, 0.0679],
    [-0.0754, 0.0693],
]
BOOK_CAUSAL = [  # seed 123, CausalAttention(3, 2, 6, 0.0), each copy of the batch
    [-0.4519, 0.2216],
    [-0.5874, 0.0058],
    [-0.6300, -0.0632],
    [-0.5675, -0.0843],
    [-0.5526, -0.0981],
    [-0.5299, -0.1081],
]
BOOK_WRAPPER = [  # seed 123, MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2): head 0 is BOOK_CAUSAL
    [-0.4519, 0.2216, 0.4772, 0.1063],
    [-0.5874, 0.0058, 0.5891, 0.3257],
    [-0.6300, -0.0632, 0.6202, 0.3860],
    [-0.5675, -0.0843, 0.5478, 0.3589],
    [-0.5526, -0.0981, 0.5321, 0.3428],
    [-0.5299, -0.1081, 0.5077, 0.3493],
]
BOOK_COMPACT = [  # seed 123, MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    [0.3190, 0.4858],
    [0.2943, 0.3897],
    [0.2856, 0.3593],
    [0.2693, 0.3873],
    [0.2639, 0.3928],
    [0.2575, 0.4028],
]


def _inputs() -> torch.Tensor:
    return torch.tensor(EXAMPLE_INPUTS)  # (6, 3)


def _batch() -> torch.Tensor:
    return torch.stack([_inputs(), _inputs()])  # (2, 6, 3)


def _assert_book(got: torch.Tensor, expected) -> None:
    """Equal to the book's printed value to 4 decimals."""
    torch.testing.assert_close(got.detach(), torch.tensor(expected).expand_as(got), atol=5e-5, rtol=0)


def test_self_attention_v1_book_numbers():
    torch.manual_seed(123)
    out = SelfAttentionV1(3, 2)(_inputs())
    _assert_book(out, BOOK_SELF_ATTENTION_V1)
    _assert_book(out[1], [0.3061, 0.8210])  # z²


def test_self_attention_linear_book_numbers():
    torch.manual_seed(789)
    out = SelfAttention(3, 2)(_inputs())
    _assert_book(out, BOOK_SELF_ATTENTION_V2)
    _assert_book(out[0], [-0.0739, 0.0713])


def test_causal_attention_book_numbers():
    torch.manual_seed(123)
    out = CausalAttention(3, 2, 6, 0.0)(_batch())
    assert out.shape == (2, 6, 2)
    _assert_book(out, BOOK_CAUSAL)
    _assert_book(out[0, 0], [-0.4519, 0.2216])


def test_stacked_heads_book_numbers():
    torch.manual_seed(123)
    out = StackedHeadsAttention(3, 2, 6, 0.0, num_heads=2)(_batch())
    assert out.shape == (2, 6, 4)
    _assert_book(out, BOOK_WRAPPER)
    _assert_book(out[0, 0], [-0.4519, 0.2216, 0.4772, 0.1063])


def test_compact_multihead_book_numbers():
    torch.manual_seed(123)
    mha = CompactMultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    assert mha.head_dim == 1
    # The book builds W_query, W_key, W_value, then out_proj; the parameter order records the build order.
    assert [name for name, _ in mha.named_parameters()] == [
        "W_query.weight",
        "W_key.weight",
        "W_value.weight",
        "out_proj.weight",
        "out_proj.bias",
    ]
    out = mha(_batch())
    _assert_book(out, BOOK_COMPACT)
    _assert_book(out[0, 0], [0.3190, 0.4858])


# ---------------------------------------------------------------------------------------------------------
# The rungs agree with the model's attention on the same weights
# ---------------------------------------------------------------------------------------------------------


def test_book_heads_in_the_models_attention_give_book_numbers():
    torch.manual_seed(123)
    stacked = StackedHeadsAttention(3, 2, 6, 0.0, num_heads=2)
    fused = fused_from_stacked_heads(stacked)
    assert isinstance(fused, CausalSelfAttention)
    assert (fused.n_embd, fused.n_head, fused.block_size) == (4, 2, 6)
    padded = torch.nn.functional.pad(_batch(), (0, 1))  # (2, 6, 4): the zero 4th feature meets zero weights
    expected = stacked(_batch())
    for got in (fused(padded), fused(padded, maps=[])):  # the SDPA kernel, then the explicit softmax
        _assert_book(got, BOOK_WRAPPER)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _model_attention_from(book: GroupedQueryAttention | CompactMultiHeadAttention) -> CausalSelfAttention:
    """The model's attention holding a book module's weights (d_in == d_out): ``qkv`` stacks the query, key
    and value layers (which have no bias, so qkv's is zero) and ``proj`` is ``out_proj``."""
    n_kv_head = getattr(book, "num_kv_groups", book.num_heads)
    config = GPTConfig(n_embd=book.d_out, n_head=book.num_heads, block_size=16, n_kv_head=n_kv_head)
    model = CausalSelfAttention(config)
    qkv_weight = torch.cat([book.W_query.weight, book.W_key.weight, book.W_value.weight])
    model.load_state_dict(
        {
            "qkv.weight": qkv_weight,
            "qkv.bias": torch.zeros(qkv_weight.size(0)),
            "proj.weight": book.out_proj.weight,
            "proj.bias": book.out_proj.bias,
        }
    )
    return model.eval()


def test_compact_book_weights_give_the_models_attention():
    torch.manual_seed(0)
    book = CompactMultiHeadAttention(8, 8, 16, 0.0, num_heads=4)
    x = torch.randn(3, 10, 8)
    torch.testing.assert_close(_model_attention_from(book)(x), book(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gqa_rung_gives_the_models_grouped_query_attention(groups):
    torch.manual_seed(0)
    book = GroupedQueryAttention(8, 8, 16, 0.0, num_heads=4, num_kv_groups=groups).eval()
    model = _model_attention_from(book)
    x = torch.randn(3, 10, 8)
    torch.testing.assert_close(model(x), book(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x, maps=[]), book(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d_in", [3, 6])
def test_fused_from_stacked_heads_with_bias(d_in):
    torch.manual_seed(0)
    stacked = StackedHeadsAttention(d_in, 3, 8, 0.1, num_heads=2, qkv_bias=True).eval()
    fused = fused_from_stacked_heads(stacked).eval()
    x = torch.randn(2, 7, d_in)
    got = fused(torch.nn.functional.pad(x, (0, 6 - d_in)))
    torch.testing.assert_close(got, stacked(x), rtol=1e-5, atol=1e-6)


def test_fused_from_stacked_heads_refuses_wide_inputs():
    with pytest.raises(GptMiniError, match="d_in=5 is wider than num_heads·d_out=4"):
        fused_from_stacked_heads(StackedHeadsAttention(5, 2, 6, 0.0, num_heads=2))


def test_compact_multihead_bad_head_count():
    with pytest.raises(GptMiniError, match="d_out=6 is not divisible by num_heads=4"):
        CompactMultiHeadAttention(3, 6, 8, 0.0, num_heads=4)


def test_book_rungs_shapes_and_causality():
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    assert SelfAttentionV1(3, 2)(x).shape == (6, 2)
    assert StackedHeadsAttention(3, 2, 8, 0.1, num_heads=3)(x.expand(4, 6, 3)).shape == (4, 6, 6)
    compact = CompactMultiHeadAttention(3, 6, 8, 0.1, num_heads=3, qkv_bias=True)
    assert compact(x.expand(4, 6, 3)).shape == (4, 6, 6)
    _assert_causal(StackedHeadsAttention(8, 2, 16, 0.0, num_heads=2), torch.randn(2, 12, 8), t=4)
    _assert_causal(CompactMultiHeadAttention(8, 8, 16, 0.0, num_heads=4), torch.randn(2, 12, 8), t=4)


def test_rungs_share_argument_names():
    # Each rung keeps the previous rung's argument names, in order, and only appends new ones.
    ladder = [
        SelfAttentionV1,
        SelfAttention,
        CausalAttention,
        StackedHeadsAttention,
        CompactMultiHeadAttention,
    ]
    names = [list(inspect.signature(cls).parameters) for cls in ladder]
    assert names[0] == ["d_in", "d_out"]
    assert names[-1] == ["d_in", "d_out", "context_length", "dropout", "num_heads", "qkv_bias"]
    for before, after in zip(names, names[1:], strict=False):
        assert [n for n in after if n in before] == before, (before, after)


BOOK_WALKTHROUGH = {
    "scores_2": [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865],
    "weights_2": [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581],
    "context_2": [0.4419, 0.6515, 0.5683],
    "self_attention_v1_z2": [0.3061, 0.8210],
    "self_attention_row1": [-0.0739, 0.0713],
    "causal_row1": [-0.4519, 0.2216],
    "stacked_row1": [-0.4519, 0.2216, 0.4772, 0.1063],
    "compact_row1": [0.3190, 0.4858],
    "model_row1": [-0.4519, 0.2216, 0.4772, 0.1063],
    "model_explicit_row1": [-0.4519, 0.2216, 0.4772, 0.1063],
}


def test_walkthrough_numbers_are_the_books():
    numbers = chapter3_numbers()
    assert set(numbers) == set(BOOK_WALKTHROUGH)
    for key, expected in BOOK_WALKTHROUGH.items():
        _assert_book(numbers[key], expected)


def _book_strings() -> list[str]:
    return ["[" + ", ".join(f"{v:.4f}" for v in values) + "]" for values in BOOK_WALKTHROUGH.values()]


def test_walkthrough_prints_the_books_numbers(capsys):
    main()
    printed = capsys.readouterr().out
    for text in _book_strings():
        assert text in printed, text
    assert printed.count("[-0.4519, 0.2216, 0.4772, 0.1063]") == 3  # the book's heads, then the model's twice


def test_walkthrough_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "gptmini.book.walkthrough"], capture_output=True, text=True, check=True
    )
    for text in _book_strings():
        assert text in result.stdout, text


# ---------------------------------------------------------------------------------------------------------
# Grouped-query attention (the rung after multi-head attention) and the switches beyond GPT-2
# ---------------------------------------------------------------------------------------------------------


def test_gqa_with_as_many_groups_as_heads_is_multi_head_attention():
    torch.manual_seed(0)
    mha = CompactMultiHeadAttention(6, 8, 10, 0.0, num_heads=4, qkv_bias=True).eval()
    gqa = GroupedQueryAttention(6, 8, 10, 0.0, num_heads=4, num_kv_groups=4, qkv_bias=True).eval()
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 10, 6)
    torch.testing.assert_close(gqa(x), mha(x))


def test_gqa_equals_multi_head_attention_with_each_groups_keys_repeated():
    """A query head of group g reads key/value head g: MHA whose heads copy their group's keys and values."""
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(6, 8, 10, 0.0, num_heads=4, num_kv_groups=2).eval()
    mha = CompactMultiHeadAttention(6, 8, 10, 0.0, num_heads=4).eval()
    state = gqa.state_dict()
    for name in ("W_key.weight", "W_value.weight"):  # (2 groups · 2, 6) -> (4 heads · 2, 6): groups 0,0,1,1
        state[name] = state[name].view(2, 2, 6).repeat_interleave(2, dim=0).reshape(8, 6)
    mha.load_state_dict(state)
    x = torch.randn(2, 10, 6)
    torch.testing.assert_close(gqa(x), mha(x))
    assert gqa.kv_cache_floats_per_token() * 2 == 2 * 8  # half the cache of 4 key/value heads


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gqa_rung_is_causal(groups):
    torch.manual_seed(0)
    module = GroupedQueryAttention(6, 8, 16, 0.0, num_heads=4, num_kv_groups=groups)
    _assert_causal(module, torch.randn(2, 12, 6), t=4)


def test_gqa_rung_bad_group_count():
    with pytest.raises(GptMiniError, match="num_heads by num_kv_groups=3"):
        GroupedQueryAttention(6, 8, 16, 0.0, num_heads=4, num_kv_groups=3)


def test_walkthrough_shows_the_gqa_rung(capsys):
    numbers = gqa_numbers()
    torch.testing.assert_close(numbers["gqa_2_groups_row1"], chapter3_numbers()["compact_row1"])
    assert (numbers["cache_floats_mha"], numbers["cache_floats_mqa"]) == (4, 2)
    main()
    printed = capsys.readouterr().out
    assert "5. Grouped-query attention" in printed
    assert "[" + ", ".join(f"{v:.4f}" for v in numbers["gqa_1_group_row1"].tolist()) + "]" in printed
