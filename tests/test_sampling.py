"""The next-token choice and the KV-cache decoding loop (gptmini.generation.sampling)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptmini import GPT, GPTConfig
from gptmini.common import GptMiniError
from gptmini.generation.sampling import (
    SamplingOptions,
    apply_repetition_penalty,
    sample_next_token,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)

VOCAB = 257  # a byte-level vocabulary plus <|endoftext|>
BLOCK = 16


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)).eval()


def _options(n: int, **kwargs) -> SamplingOptions:
    """Sampling options; unlike SamplingOptions' own defaults, temperature 1 and no filters."""
    return SamplingOptions(max_new_tokens=n, **{"temperature": 1.0, **kwargs})


def _tokens(model, prompt, n, use_cache=True, generator=None, eot_id=None, vocab_limit=None, **kwargs):
    tokens = sample_tokens(
        model,
        prompt,
        _options(n, **kwargs),
        use_cache=use_cache,
        generator=generator,
        eot_id=eot_id,
        vocab_limit=vocab_limit,
    )
    return [int(t) for t in tokens]


# ---------------------------------------------------------------------------------------------------------
# The decoding loop
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 5, BLOCK])
@pytest.mark.parametrize("penalty", [1.0, 2.0])
def test_greedy_is_identical_with_and_without_cache(model, prompt_len, penalty):
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    n = 3 * BLOCK  # crosses block_size several times, so the context slides and the cache is rebuilt
    kwargs = dict(temperature=0.0, repetition_penalty=penalty)
    cached = _tokens(model, prompt, n, use_cache=True, **kwargs)
    assert len(cached) == n
    assert cached == _tokens(model, prompt, n, use_cache=False, **kwargs)
    if penalty > 1:
        # A random model's greedy text repeats one token; the penalty forces varied tokens, so the
        # comparison above really exercised different contexts.
        assert len(set(cached)) > n // 2


# Greedy continuations of two seeded models (GPT-2's switches, then every switch beyond them), pinned
# before the model's trunk was unified: prefill, cached steps and full recomputation must keep choosing
# these tokens.
BEYOND_GPT2 = {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "n_kv_head": 1,
               "tie_embeddings": False, "logit_softcap": 15.0}  # fmt: skip
PINNED_GREEDY = {
    "gpt2": (
        {},
        [
            "47 124 159 139 205 227 160 45 251 234 114 249 98 66 66 66 108 211 113 207 84 131 29 215",
            "30 141 47 102 44 215 189 189 180 113 207 110 110 205 227 160 132 53 53 176 217 178 20 20",
        ],
    ),
    "modern": (
        BEYOND_GPT2,
        [
            "161 156 111 162 31 211 113 254 250 53 235 200 96 130 20 191 2 44 129 226 63 64 86 85",
            "11 57 175 183 22 114 153 123 195 165 13 191 24 76 32 35 250 53 40 256 49 188 207 96",
        ],
    ),
}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", PINNED_GREEDY)
def test_greedy_continuation_of_a_seeded_model_is_pinned(name, use_cache):
    switches, expected = PINNED_GREEDY[name]
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, **switches)
    model = GPT(config).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    greedy = SamplingOptions(max_new_tokens=24, temperature=0.0, repetition_penalty=2.0)  # slides once
    tokens = torch.cat(list(sample_tokens(model, prompt, greedy, use_cache=use_cache)), dim=1)
    assert tokens.tolist() == [[int(t) for t in row.split()] for row in expected]


def test_seeded_sampling_is_identical_with_and_without_cache(model):
    prompt = torch.tensor([[1, 2, 3]])

    def run(use_cache):
        generator = torch.Generator().manual_seed(7)
        return _tokens(model, prompt, 3 * BLOCK, temperature=1.0, use_cache=use_cache, generator=generator)

    assert run(True) == run(False)


def test_cache_matches_full_forward_before_the_context_is_full(model):
    prompt = torch.tensor([[1, 2, 3]])
    out = _tokens(model, prompt, BLOCK - 3, temperature=0.0)
    # Below block_size no sliding happens: each token is the argmax of a plain forward pass.
    ids = prompt[0].tolist()
    for token in out:
        logits, _ = model(torch.tensor([ids]))
        assert token == int(logits[0, -1].argmax())
        ids.append(token)


def test_same_seed_same_tokens_and_different_seeds_differ(model):
    prompt = torch.tensor([[10, 20, 30]])

    def run(seed):
        return _tokens(model, prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_batched_rows_match_single_rows(model):
    prompts = torch.tensor([[5, 6, 7, 8], [100, 101, 102, 103]])
    batched = torch.cat(list(sample_tokens(model, prompts, _options(20, temperature=0.0))), dim=1)
    for row in range(2):
        assert batched[row].tolist() == _tokens(model, prompts[row : row + 1], 20, temperature=0.0)


def test_long_prompt_keeps_the_last_block_size_tokens(model):
    prompt = torch.arange(3 * BLOCK).view(1, -1)
    assert _tokens(model, prompt, 5, temperature=0.0) == _tokens(
        model, prompt[:, -BLOCK:], 5, temperature=0.0
    )


def test_stops_after_eot(model):
    first = _tokens(model, torch.tensor([[1, 2]]), 1, temperature=0.0)[0]
    # Declaring the first greedy token the end-of-text id makes generation stop right after it.
    assert _tokens(model, torch.tensor([[1, 2]]), 10, temperature=0.0, eot_id=first) == [first]


def test_zero_new_tokens_and_empty_prompt(model):
    assert _tokens(model, torch.tensor([[1]]), 0) == []
    with pytest.raises(GptMiniError, match="no tokens"):
        _tokens(model, torch.zeros(1, 0, dtype=torch.long), 3)


# ---------------------------------------------------------------------------------------------------------
# Choosing a token
# ---------------------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, temperature=0.0), expected)
    assert torch.equal(sample_next_token(logits, temperature=0.0, top_k=3, top_p=0.5), expected)


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[0, 1, 1]])  # a positive and a (repeated) negative logit
    before = torch.softmax(logits, -1)
    after = torch.softmax(apply_repetition_penalty(logits, seen, 1.5), -1)
    assert after[0, 0] < before[0, 0] and after[0, 1] < before[0, 1]
    assert after[0, 2] > before[0, 2] and after[0, 3] > before[0, 3]  # the mass goes to unseen tokens
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert int(sample_next_token(logits, temperature=0.0)) == 0
    chosen = sample_next_token(
        logits, temperature=0.0, repetition_penalty=2.0, previous_tokens=torch.tensor([[0]])
    )
    assert int(chosen) == 1


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -2.0, 1.0, 2.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))[0].tolist()
    assert kept == [False, True, False, False, True]
    assert torch.equal(top_k_filter(logits, 100), logits)  # k above the vocabulary keeps everything


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = lambda p: torch.isfinite(top_p_filter(probs.log(), p))[0].tolist()  # noqa: E731
    assert kept(0.45) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(0.99) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-6) == [True, False, False, False]  # the most likely token always stays


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=40),
    top_k=st.one_of(st.none(), st.integers(1, 50)),
    top_p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_sampled_tokens_stay_inside_the_top_k_top_p_support(logits, top_k, top_p, seed):
    row = torch.tensor([logits])
    probs = torch.softmax(row, -1)[0]
    draws = sample_next_token(
        row.expand(64, -1),
        temperature=1.0,
        top_k=top_k,
        top_p=top_p,
        generator=torch.Generator().manual_seed(seed),
    )[:, 0]
    for token in draws.tolist():
        if top_k is not None:
            # Inside the top k: fewer than k tokens have a strictly larger logit.
            assert int((row[0] > row[0, token]).sum()) < top_k
        if top_k is None:
            # Inside the nucleus: the tokens strictly more likely than it hold less than top_p.
            assert float(probs[probs > probs[token]].sum()) <= top_p + 1e-5


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("temperature", -0.1),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("max_new_tokens", -1),
    ],
)
def test_bad_options_raise_naming_the_option(option, value):
    with pytest.raises(GptMiniError, match=option):
        SamplingOptions(**{option: value})


@pytest.mark.parametrize("option", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_options_are_refused_naming_the_default(option, value):
    """NaN passed ``temperature < 0`` and ``repetition_penalty <= 0``; inf passed both: torch failed later."""
    default = getattr(SamplingOptions(), option)
    message = rf"^{option}={value} must be a finite number, not nan or inf; the default is {default}\.$"
    with pytest.raises(GptMiniError, match=message):
        SamplingOptions(**{option: value})


@pytest.mark.parametrize(("option", "value"), [("top_k", 2.5), ("top_k", True), ("max_new_tokens", 1.5)])
def test_counts_must_be_whole_numbers(option, value):
    with pytest.raises(GptMiniError, match=rf"^{option} must be .*a whole number"):
        SamplingOptions(**{option: value})


def test_good_options_pass():
    SamplingOptions(temperature=0.0, top_k=1, top_p=1.0, repetition_penalty=0.5, max_new_tokens=0)


# ---------------------------------------------------------------------------------------------------------
# Extremes: a padded vocabulary, an unbounded max_new_tokens
# ---------------------------------------------------------------------------------------------------------


def test_vocab_limit_never_yields_an_id_past_the_tokenizer():
    """A model vocabulary padded past the tokenizer's (GPT-2: 50304 vs 50257) must not produce those ids."""
    torch.manual_seed(0)
    padded = GPT(GPTConfig(vocab_size=VOCAB + 43, block_size=BLOCK, n_layer=1, n_head=2, n_embd=32)).eval()
    prompt = torch.tensor([[1, 2, 3]])

    def run(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return _tokens(padded, prompt, 4 * BLOCK, temperature=2.0, generator=generator, **kwargs)

    assert max(run()) >= VOCAB  # without the limit the padding ids do come up
    limited = run(vocab_limit=VOCAB)
    assert len(limited) == 4 * BLOCK and max(limited) < VOCAB
    # Greedy and the penalty path too: the argmax is taken among the allowed ids only.
    greedy = _tokens(padded, prompt, BLOCK, temperature=0.0, repetition_penalty=1.5, vocab_limit=VOCAB)
    assert max(greedy) < VOCAB


def test_huge_max_new_tokens_streams_without_allocating_for_it(model):
    """Memory does not grow with max_new_tokens: 10**18 just means "until stopped"."""
    tokens = sample_tokens(model, torch.tensor([[1, 2, 3]]), _options(10**18, temperature=0.0))
    first = [int(t) for t in itertools.islice(tokens, 3 * BLOCK)]  # crosses block_size: slides
    tokens.close()
    assert first == _tokens(model, torch.tensor([[1, 2, 3]]), 3 * BLOCK, temperature=0.0)
