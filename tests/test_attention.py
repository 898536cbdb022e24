"""The chapter-3 attention ladder and the efficient attention: numbers, shapes, causality, weight layout."""

import inspect
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptmini.common import GptMiniError
from gptmini.model.attention import (
    ATTENTION_CLASSES,
    EXAMPLE_INPUTS,
    CausalAttention,
    CausalSelfAttention,
    CompactMultiHeadAttention,
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention,
    SelfAttentionV1,
    StackedHeadsAttention,
    apply_rope,
    rope_tables,
    simplified_self_attention,
)
from gptmini.model.kv_cache import KVCache
from gptmini.model.walkthrough import chapter3_numbers, fused_from_stacked_heads, gqa_numbers, main

KINDS = list(ATTENTION_CLASSES)


def test_worked_example_numbers():
    scores, weights, context = simplified_self_attention(torch.tensor(EXAMPLE_INPUTS))
    expected_scores = [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]
    expected_weights = [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]
    expected_context = [0.4419, 0.6515, 0.5683]
    torch.testing.assert_close(scores[1], torch.tensor(expected_scores), atol=5e-5, rtol=0)
    torch.testing.assert_close(weights[1], torch.tensor(expected_weights), atol=5e-5, rtol=0)
    torch.testing.assert_close(context[1], torch.tensor(expected_context), atol=5e-5, rtol=0)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))


def test_ladder_shapes():
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    assert SelfAttention(3, 2)(x).shape == (6, 2)
    assert SelfAttention(3, 2, qkv_bias=True)(x.expand(4, 6, 3)).shape == (4, 6, 2)
    assert CausalAttention(3, 2, context_length=8, dropout=0.1)(x.expand(4, 6, 3)).shape == (4, 6, 2)
    for cls in ATTENTION_CLASSES.values():
        assert cls(32, 4, 16, 0.0, True)(torch.randn(2, 10, 32)).shape == (2, 10, 32)


def test_mask_is_not_saved():
    # The mask is rebuilt from block_size, so every variant saves the same keys.
    shared = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    for cls in ATTENTION_CLASSES.values():
        assert set(cls(32, 4, 16, 0.0, True).state_dict()) == shared
    single_head = {"W_query.weight", "W_key.weight", "W_value.weight"}
    assert set(CausalAttention(3, 2, 6, 0.0).state_dict()) == single_head


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


@pytest.mark.parametrize("kind", KINDS)
def test_multihead_is_causal(kind):
    torch.manual_seed(0)
    _assert_causal(ATTENTION_CLASSES[kind](32, 4, 16, 0.0, True), torch.randn(2, 12, 32), t=5)


def test_causal_attention_is_causal():
    torch.manual_seed(0)
    _assert_causal(CausalAttention(8, 4, context_length=16, dropout=0.0), torch.randn(2, 12, 8), t=3)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    n_head=st.integers(1, 4),
    head_size=st.integers(1, 8),
    batch=st.integers(1, 3),
    length=st.integers(1, 12),
    data=st.data(),
)
def test_causality_property(kind, n_head, head_size, batch, length, data):
    t = data.draw(st.integers(0, length - 1), label="t")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    n_embd = n_head * head_size
    module = ATTENTION_CLASSES[kind](n_embd, n_head, 12, 0.0, True)
    _assert_causal(module, torch.randn(batch, length, n_embd), t)


def test_one_state_dict_loads_into_every_variant():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 64)
    reference = CausalSelfAttention(64, 8, 16, 0.0, True).eval()
    expected = reference(x)
    for cls in (MultiHeadAttentionWrapper, MultiHeadAttention):
        other = cls(64, 8, 16, 0.0, True).eval()
        other.load_state_dict(reference.state_dict())
        got = other(x)
        assert (got - expected).norm() / expected.norm() < 1e-5, cls.__name__


@pytest.mark.parametrize("kind", KINDS)
def test_attention_weights_are_causal_distributions(kind):
    torch.manual_seed(0)
    weights = ATTENTION_CLASSES[kind](32, 4, 16, 0.0, True).attention_weights(torch.randn(2, 7, 32))
    assert weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    assert torch.all(weights.triu(diagonal=1) == 0)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 16, 0.0, True).eval()
    x = torch.randn(2, 12, 32)
    cache = KVCache(1, 2, 4, 16, 8)
    outputs = []
    with torch.no_grad():
        expected = attn(x)
        # Prefill 5, then a chunk of 3 (several new tokens after a prefix), then single tokens.
        for lo, hi in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11), (11, 12)]:
            outputs.append(attn(x[:, lo:hi], kv_cache=cache.layer(0)))
            cache.length = hi
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [MultiHeadAttentionWrapper, MultiHeadAttention])
def test_ladder_variants_decode_with_a_cache_as_their_own_forward(cls):
    torch.manual_seed(0)
    attn = cls(32, 4, 16, 0.0, True).eval()
    x = torch.randn(2, 12, 32)
    cache = KVCache(1, 2, 4, 16, 8)
    outputs = []
    with torch.no_grad():
        expected = attn(x)  # the explicit (T, T) path
        for lo, hi in [(0, 5), (5, 8), (8, 9), (9, 12)]:
            outputs.append(attn(x[:, lo:hi], kv_cache=cache.layer(0)))  # the SDPA path on the same weights
            cache.length = hi
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_bad_head_count():
    with pytest.raises(GptMiniError, match="n_embd=30 is not divisible by n_head=4"):
        CausalSelfAttention(30, 4, 16)


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


def test_book_heads_in_fused_layout_give_book_numbers():
    torch.manual_seed(123)
    stacked = StackedHeadsAttention(3, 2, 6, 0.0, num_heads=2)
    fused = fused_from_stacked_heads(stacked)
    assert isinstance(fused, MultiHeadAttentionWrapper)
    assert (fused.n_embd, fused.n_head, fused.block_size) == (4, 2, 6)
    padded = torch.nn.functional.pad(_batch(), (0, 1))  # (2, 6, 4): the zero 4th feature meets zero weights
    expected = stacked(_batch())
    for cls in ATTENTION_CLASSES.values():  # the fused layout's state_dict loads into every model class
        other = cls(4, 2, 6, 0.0, False)
        other.load_state_dict(fused.state_dict())
        got = other(padded)
        _assert_book(got, BOOK_WRAPPER)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


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


def test_compact_book_weights_load_into_fused_mha():
    # With d_in == d_out the book's compact MHA is the model's MultiHeadAttention: qkv stacks the three
    # projections, proj is out_proj (the book's query/key/value layers have no bias, so qkv's is zero).
    torch.manual_seed(0)
    book = CompactMultiHeadAttention(8, 8, 16, 0.0, num_heads=4)
    fused = MultiHeadAttention(8, 4, 16, 0.0, True)
    qkv_weight = torch.cat([book.W_query.weight, book.W_key.weight, book.W_value.weight])  # (24, 8)
    fused.load_state_dict(
        {
            "qkv.weight": qkv_weight,
            "qkv.bias": torch.zeros(24),
            "proj.weight": book.out_proj.weight,
            "proj.bias": book.out_proj.bias,
        }
    )
    x = torch.randn(3, 10, 8)
    torch.testing.assert_close(fused(x), book(x), rtol=1e-5, atol=1e-6)


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
    "fused_heads_row1": [-0.4519, 0.2216, 0.4772, 0.1063],
    "fused_mha_row1": [-0.4519, 0.2216, 0.4772, 0.1063],
    "fused_sdpa_row1": [-0.4519, 0.2216, 0.4772, 0.1063],
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
    assert printed.count("[-0.4519, 0.2216, 0.4772, 0.1063]") == 4  # the book's heads, then 3 fused classes


def test_walkthrough_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "gptmini.model.walkthrough"], capture_output=True, text=True, check=True
    )
    for text in _book_strings():
        assert text in result.stdout, text


# ---------------------------------------------------------------------------------------------------------
# Grouped-query attention (the rung after multi-head attention) and the switches beyond GPT-2
# ---------------------------------------------------------------------------------------------------------

SWITCHES = [
    {"n_kv_head": 2},
    {"n_kv_head": 1},
    {"rope_base": 10000.0},
    {"qk_norm": True},
    {"n_kv_head": 2, "rope_base": 100.0, "qk_norm": True},
]


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


@pytest.mark.parametrize("kind", ["mha", "sdpa"])
@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_every_switch_keeps_attention_causal(kind, switches):
    torch.manual_seed(0)
    module = ATTENTION_CLASSES[kind](32, 4, 16, 0.0, True, **switches)
    _assert_causal(module, torch.randn(2, 12, 32), t=5)
    weights = module.attention_weights(torch.randn(2, 7, 32))
    assert weights.shape == (2, 4, 7, 7)
    assert torch.all(weights.triu(diagonal=1) == 0)


@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_sdpa_and_explicit_attention_agree_with_every_switch(switches):
    torch.manual_seed(0)
    sdpa = CausalSelfAttention(32, 4, 16, 0.0, True, **switches).eval()
    mha = MultiHeadAttention(32, 4, 16, 0.0, True, **switches).eval()
    mha.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(sdpa(x), mha(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_kv_cache_matches_full_forward_with_every_switch(switches):
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 16, 0.0, True, **switches).eval()
    x = torch.randn(2, 12, 32)
    cache = KVCache(1, 2, 4, 16, 8, n_kv_head=attn.n_kv_head)
    outputs = []
    with torch.no_grad():
        expected = attn(x)
        for lo, hi in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 12)]:
            outputs.append(attn(x[:, lo:hi], kv_cache=cache.layer(0)))
            cache.length = hi
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_kv_cache_holds_only_the_key_value_heads():
    mha, gqa = KVCache(2, 3, 4, 16, 8), KVCache(2, 3, 4, 16, 8, n_kv_head=1)
    assert mha.keys[0].shape == (3, 4, 16, 8) and gqa.keys[0].shape == (3, 1, 16, 8)
    assert gqa.nbytes * 4 == mha.nbytes == 2 * 2 * 3 * 4 * 16 * 8 * 4


def test_rope_scores_depend_on_relative_position_only():
    """q·k after RoPE at positions (p, p') equals the same q·k at (p + s, p' + s)."""
    torch.manual_seed(0)
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(p: int, p2: int) -> torch.Tensor:
        return (
            apply_rope(q, cos[p : p + 1], sin[p : p + 1]) * apply_rope(k, cos[p2 : p2 + 1], sin[p2 : p2 + 1])
        ).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    assert not torch.allclose(score(5, 2), score(5, 3))
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)  # position 0 is not rotated


def test_stacked_heads_refuse_the_switches():
    with pytest.raises(GptMiniError, match="attention='heads' has GPT-2's attention only"):
        MultiHeadAttentionWrapper(32, 4, 16, 0.0, True, n_kv_head=2)
    with pytest.raises(GptMiniError, match="n_head=4 is not divisible by n_kv_head=3"):
        CausalSelfAttention(32, 4, 16, n_kv_head=3)
