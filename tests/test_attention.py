"""The model's attention (gptmini.model.attention): shapes, causality, weight layout, the explicit path for
attention maps, the KV-cache views (prefill, steps, the fixed-shape span, per-row positions), RoPE."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptmini.common import GptMiniError
from gptmini.model.attention import CausalSelfAttention, apply_rope, rope_tables
from gptmini.model.config import GPTConfig
from gptmini.model.kv_cache import KVCache

SWITCHES = [
    {},
    {"n_kv_head": 2},
    {"n_kv_head": 1},
    {"pos_emb": "rope"},
    {"qk_norm": True},
    {"n_kv_head": 2, "pos_emb": "rope", "rope_base": 100.0, "qk_norm": True},
]


def _attention(**switches) -> CausalSelfAttention:
    torch.manual_seed(0)
    return CausalSelfAttention(GPTConfig(n_embd=32, n_head=4, block_size=16, **switches)).eval()


def _assert_causal(module: torch.nn.Module, x: torch.Tensor, t: int, **kwargs) -> None:
    """Changing inputs after position t must leave outputs at positions <= t unchanged."""
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
    with torch.no_grad():
        before, after = module(x, **kwargs), module(changed, **kwargs)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=1e-5, atol=1e-6)
    if t + 1 < x.size(1):
        assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])  # the later outputs did change


def test_shapes_and_saved_weights():
    attn = _attention()
    assert attn(torch.randn(2, 10, 32)).shape == (2, 10, 32)
    # The RoPE tables are rebuilt from the config, so checkpoints hold the two projections only.
    expected = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert set(_attention(pos_emb="rope").state_dict()) == expected
    assert _attention(n_kv_head=1).qkv.weight.shape == (32 + 2 * 8, 32)  # queries, then one key/value head


@settings(max_examples=25, deadline=None)
@given(
    n_head=st.integers(1, 4),
    head_size=st.integers(1, 8),
    batch=st.integers(1, 3),
    length=st.integers(1, 12),
    explicit=st.booleans(),
    data=st.data(),
)
def test_causality_property(n_head, head_size, batch, length, explicit, data):
    t = data.draw(st.integers(0, length - 1), label="t")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    n_embd = n_head * head_size
    module = CausalSelfAttention(GPTConfig(n_embd=n_embd, n_head=n_head, block_size=12)).eval()
    _assert_causal(module, torch.randn(batch, length, n_embd), t, maps=[] if explicit else None)


@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_every_switch_is_causal_and_its_maps_are_causal_distributions(switches):
    attn = _attention(**switches)
    _assert_causal(attn, torch.randn(2, 12, 32), t=5)
    maps = []
    attn(torch.randn(2, 7, 32), maps=maps)
    (weights,) = maps
    assert weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    assert torch.all(weights.triu(diagonal=1) == 0)


@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_sdpa_and_explicit_softmax_agree_with_every_switch(switches):
    attn = _attention(**switches)
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(attn(x), attn(x, maps=[]), rtol=1e-5, atol=1e-5)


def _cached_outputs(attn: CausalSelfAttention, x: torch.Tensor, chunks, fixed_span: bool = False):
    """attn over x in chunks [lo, hi) through a KV cache, as the GPT drives it."""
    cache = KVCache(1, x.size(0), attn.n_head, 16, attn.head_size, n_kv_head=attn.n_kv_head)
    outputs = []
    for lo, hi in chunks:
        positions = torch.arange(lo, hi).unsqueeze(0)
        (view,) = cache.views(positions, span=cache.max_length if fixed_span else hi)
        outputs.append(attn(x[:, lo:hi], positions, view))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("fixed_span", [False, True], ids=["filled-prefix", "whole-buffer"])
@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_kv_cache_matches_full_forward_with_every_switch(switches, fixed_span):
    attn = _attention(**switches)
    x = torch.randn(2, 12, 32)
    # Prefill 5, then a chunk of 3 (several new tokens after a prefix), then single tokens.
    chunks = [(0, 5), (5, 8), (8, 9), (9, 10), (10, 12)]
    with torch.no_grad():
        torch.testing.assert_close(
            _cached_outputs(attn, x, chunks, fixed_span), attn(x), rtol=1e-5, atol=1e-5
        )


def test_rows_of_a_batch_may_sit_at_different_positions():
    """A view's positions are per row: one step may extend sequences of different lengths (serving)."""
    attn = _attention(pos_emb="rope", n_kv_head=2)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        expected = attn(x)  # (2, 9, 32)
        cache = KVCache(1, 2, 4, 16, 8, n_kv_head=2)
        (view,) = cache.views(torch.arange(9).unsqueeze(0), span=16)
        attn(x, torch.arange(9).unsqueeze(0), view)  # both rows hold 9 positions' keys and values
        # Row 0 redoes position 4, row 1 position 8: each sees only its own position and earlier ones.
        positions = torch.tensor([[4], [8]])
        (view,) = cache.views(positions, span=16)
        got = attn(torch.stack([x[0, 4:5], x[1, 8:9]]), positions, view)
    torch.testing.assert_close(got[:, 0], torch.stack([expected[0, 4], expected[1, 8]]), rtol=1e-5, atol=1e-5)


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


def test_bad_head_counts_are_refused_by_the_config_the_attention_is_built_from():
    with pytest.raises(GptMiniError, match="n_embd=30 is not divisible by n_head=4"):
        CausalSelfAttention(GPTConfig(n_embd=30, n_head=4, block_size=16))
    with pytest.raises(GptMiniError, match="n_head=4 is not divisible by n_kv_head=3"):
        CausalSelfAttention(GPTConfig(n_embd=32, n_head=4, block_size=16, n_kv_head=3))
