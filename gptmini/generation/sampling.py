"""Choosing the next token, and ``sample_tokens``: the one decoding loop that feeds a GPT one token at a time.

Pure computation: no files, no printing, no config loading; ``text`` does the I/O around it and the training
samples call it too. Imports only torch and ``gptmini.common``; must not import ``training``, ``checkpoint``
or ``data`` (the model is passed in).

The loop uses the model's KV cache: one forward pass over the prompt ("prefill"), then one single-token
pass per new token. A GPT cannot see more than ``block_size`` positions, so when the context is full it
*slides*: the cache is reset and the last ``block_size // 2`` tokens are prefilled again ("recompute").
Keeping half a block (not ``block_size - 1`` tokens) means a re-prefill every ``block_size // 2`` steps
instead of every step. ``use_cache=False`` runs the full window at every step with the same sliding rule,
so both modes see the same context and greedy decoding gives identical tokens. ``compile=True`` runs each
one-token step through ``GPT.decode_step`` compiled (fixed shapes: compiled once, a CUDA graph on a GPU).

Memory does not grow with ``max_new_tokens``: the loop keeps only the window the model sees and, for the
repetition penalty, one flag per vocabulary entry saying whether it has appeared. A huge ``max_new_tokens``
therefore just means "until <|endoftext|>, a stop string or Ctrl-C".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gptmini.common import GptMiniError, check_finite_floats


@dataclass
class SamplingOptions:
    """How the next token is chosen; one type for generate.py, the samples during training and the loop.

    Validated on construction, so a bad value fails before any model is loaded or any step is trained.
    """

    max_new_tokens: int = 200
    """Most tokens to generate per sample; 0 generates nothing."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy (always the most likely token)."""
    top_k: int | None = None
    """Sample only among the k most likely tokens; null = no limit."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this much probability; 1.0 = off."""
    repetition_penalty: float = 1.0
    """Above 1 makes tokens already in the context less likely; 1.0 = off."""

    def __post_init__(self) -> None:
        check_finite_floats(self, prefix="")  # NaN passes every range check below; inf, every lower bound
        if not _whole(self.max_new_tokens) or self.max_new_tokens < 0:
            raise GptMiniError(
                f"max_new_tokens must be a whole number >= 0, got {self.max_new_tokens}. "
                "Try max_new_tokens=200."
            )
        if self.temperature < 0:
            raise GptMiniError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature}. Try temperature=0.8."
            )
        if self.top_k is not None and (not _whole(self.top_k) or self.top_k < 1):
            raise GptMiniError(
                f"top_k must be >= 1 (a whole number), got {self.top_k}. "
                "Use top_k=null to turn the filter off."
            )
        if not 0 < self.top_p <= 1:
            raise GptMiniError(
                f"top_p must be in (0, 1], got {self.top_p}. Use top_p=1.0 to turn the filter off."
            )
        if self.repetition_penalty <= 0:
            raise GptMiniError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}. "
                "1.0 turns it off; values above 1 discourage repeats."
            )


def _whole(value: object) -> bool:
    """An int, and not a bool (True would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------
# Logit transforms: each takes (B, V) logits and returns new (B, V) logits.
# ---------------------------------------------------------------------------------------------------------


def penalize_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token flagged in ``seen`` (B, V) bool less likely (CTRL-style penalty).

    A positive logit is divided by ``penalty`` and a negative one multiplied by it, so for ``penalty > 1``
    a seen token always loses probability whatever the sign of its logit.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_repetition_penalty(
    logits: torch.Tensor, previous_tokens: torch.Tensor, penalty: float
) -> torch.Tensor:
    """``penalize_seen`` for the token ids ``previous_tokens`` (B, n); a token seen twice counts once."""
    if penalty == 1.0 or previous_tokens.numel() == 0:
        return logits
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, previous_tokens, True)
    return penalize_seen(logits, seen, penalty)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (and any tied with the k-th); the rest become -inf."""
    if k >= logits.size(-1):  # keeps every token: skip the top-k (a sort of the vocabulary) altogether
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability adds up to at least ``p`` (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    # A token is needed only while the more likely ones hold less than p; the first token always stays.
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    previous_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V); returns (B, 1) token ids.

    ``temperature == 0`` is greedy: the argmax after the repetition penalty (top-k/top-p cannot change it).
    """
    logits = logits.float()  # softmax and the filters in fp32, whatever dtype the model ran in
    if previous_tokens is not None:
        logits = apply_repetition_penalty(logits, previous_tokens, repetition_penalty)
    return _draw(logits, temperature, top_k, top_p, generator)


def _draw(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Temperature, top-k and top-p on fp32 ``logits`` (B, V), then one draw per row: (B, 1)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if temperature != 1.0:  # dividing by 1 changes no bit: skip the pass over the vocabulary
        logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ---------------------------------------------------------------------------------------------------------
# The decoding loop.
# ---------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def sample_tokens(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    options: SamplingOptions,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    eot_id: int | None = None,
    vocab_limit: int | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield each new token, (B, 1), as soon as it is chosen.

    Args:
        model: an eval-mode GPT; ``model.config.block_size`` bounds the context.
        prompt_ids: (T,) or (B, T) token ids, at least one per row; only the last ``block_size`` are used.
        options: how many tokens at most, and how each is chosen (see ``SamplingOptions``).
        use_cache: decode with the KV cache (fast) or recompute the whole window every step.
        generator: the random source for sampling (seed it for reproducible text).
        eot_id: stop once every row has produced this token; finished rows repeat it.
        vocab_limit: never choose an id >= this. A model's vocabulary may be padded past its tokenizer's
            (e.g. 50304 rows for GPT-2's 50257 tokens); pass the tokenizer's ``n_vocab`` so every id decodes.
        compile: run the one-token step through ``torch.compile`` (with the cache only). It compiles once per
            model, for seconds to a minute, then each token costs less: worth it for long or many samples.

    The caller may stop early (stop strings, Ctrl-C) by leaving the loop; no work is done ahead.
    """
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")
    block_size = model.config.block_size
    keep = slide_keep(block_size)  # tokens kept when the context slides
    ids = prompt_ids.view(1, -1) if prompt_ids.dim() == 1 else prompt_ids
    if ids.size(1) == 0:
        raise GptMiniError("the prompt has no tokens; start from <|endoftext|> for unconditional text.")
    context = ids[:, -block_size:]  # the tokens the model sees now: at most block_size
    batch, length = context.shape
    # The visible window, preallocated once (one spare slot): a step writes its token, never allocates.
    window = torch.empty(batch, block_size + 1, dtype=context.dtype, device=context.device)
    window[:, :length] = context
    seen = None  # (B, V) bool: which tokens appeared, for the repetition penalty
    if options.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=ids.device)
        seen.scatter_(1, context, True)
    finished = torch.zeros(batch, 1, dtype=torch.bool, device=ids.device)
    cache = model.new_kv_cache(batch, device=ids.device) if use_cache else None
    compiled_step = compiled_decode_step(model, cache) if use_cache and compile else None
    logits = model.next_token_logits(context, kv_cache=cache)  # the prompt at once ("prefill")

    for step in range(options.max_new_tokens):
        token = choose_next_token(logits, options, seen, generator, vocab_limit)
        if eot_id is not None:
            token = token.masked_fill(finished, eot_id)
            finished |= token == eot_id
        if seen is not None:
            seen.scatter_(1, token, True)
        window[:, length] = token[:, 0]
        length += 1
        yield token
        if step == options.max_new_tokens - 1 or (eot_id is not None and bool(finished.all())):
            return
        if length > block_size:
            # Slide: keep the last ``keep`` tokens at the front; the cache restarts from them.
            window[:, :keep] = window[:, length - keep : length].clone()
            length = keep
            if cache is not None:
                cache.reset()
                logits = model.next_token_logits(window[:, :length], kv_cache=cache)
                continue
        if compiled_step is not None:
            # One position through the compiled fixed-shape step (GPT.decode_step).
            logits = compiled_step(token, cache.positions[cache.length], cache)
            cache.length += 1
        elif cache is not None:
            # One position; the cache holds the rest. Eager, the variable-shape path measured faster than
            # the fixed-shape one (which attends over the whole buffer): 428 against 401 tokens/s.
            logits = model.next_token_logits(token, kv_cache=cache)
        else:
            logits = model.next_token_logits(window[:, :length])  # the whole window again


def compiled_decode_step(model: torch.nn.Module, cache) -> Callable:
    """``torch.compile`` of ``model.decode_step``, made once per model and kept on it.

    The step has fixed shapes, so it compiles once. On a GPU it compiles with CUDA graphs ("reduce-overhead"):
    a token then costs one graph launch instead of a few hundred kernel launches; the cache's tensors are
    marked as fixed addresses so that the graph may write into them.
    """
    cuda = cache.keys[0].is_cuda
    if cuda:
        for tensor in (*cache.keys, *cache.values, cache.positions):
            torch._dynamo.mark_static_address(tensor)
    compiled = getattr(model, "_compiled_decode_step", None)
    if compiled is None:
        mode = "reduce-overhead" if cuda else None
        compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)
        model._compiled_decode_step = compiled  # a plain attribute: not a parameter, not in the state dict
    return compiled


def slide_keep(block_size: int) -> int:
    """How many tokens the context keeps when it slides past ``block_size`` (see the module docstring)."""
    return max(1, block_size // 2)


def choose_next_token(
    logits: torch.Tensor,
    options: SamplingOptions,
    seen: torch.Tensor | None,
    generator: torch.Generator | None,
    vocab_limit: int | None,
) -> torch.Tensor:
    """The next token (B, 1) from the model's logits (B, V), never an id >= ``vocab_limit``.

    ``seen`` (B, V) bool flags the tokens in the context (for the repetition penalty; None when it is off).
    The one choice both ``sample_tokens`` and the server's batches make: the server calls it per row, with
    each request's own options and generator, so a request draws exactly what generate.py would.
    """
    logits = logits[:, :vocab_limit].float()  # ids past the limit are simply not candidates
    if seen is not None:
        logits = penalize_seen(logits, seen[:, : logits.size(-1)], options.repetition_penalty)
    return _draw(logits, options.temperature, options.top_k, options.top_p, generator)
