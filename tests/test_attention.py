"""The chapter-3 attention ladder and the efficient attention: numbers, shapes, causality, weight layout."""

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
    KVCache,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention,
    simplified_self_attention,
)

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
def test_ladder_variants_refuse_a_cache(cls):
    cache = KVCache(1, 1, 4, 16, 8)
    with pytest.raises(GptMiniError, match="attention='sdpa'"):
        cls(32, 4, 16, 0.0, True)(torch.randn(1, 3, 32), kv_cache=cache.layer(0))


def test_bad_head_count():
    with pytest.raises(GptMiniError, match="n_embd=30 is not divisible by n_head=4"):
        CausalSelfAttention(30, 4, 16)
