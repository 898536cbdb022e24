"""How many CPU threads torch should use, decided by timing (``threads=auto``), not by counting cores.

torch starts with one thread per core. On a quiet machine that is right; on a busy one (a browser, another
training job on the same two cores) its worker threads spin-wait for each other and a step can take several
times longer than with fewer threads. Core counts cannot tell the two cases apart, a stopwatch can:
``choose_threads`` runs the caller's own step (a training step, a decoding step) a few times with each
candidate count and keeps the fastest, where "faster" means by more than the probe's noise: a larger count
must beat the best smaller one by ``MORE_THREADS_MARGIN``.

The steps it times live here too (``training_step_probe``, ``decode_probe``): they call the model's own
``loss`` and ``next_token_logits``, so this module still imports only torch and ``gptmini.common``, and
training and generation both use it.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptmini.common import GptMiniError

AUTO = "auto"

# How much faster (a fraction of the step's time) a larger thread count must be to be chosen over the best
# smaller one. Within it the difference is the probe's noise: a generation step of the default model is
# ~3 ms with 1 or 2 threads alike, and a 2-second probe picked either by chance (2 was in fact 5% slower over
# 256 tokens). Fewer threads then win the tie: they do not wait for each other and leave cores free.
MORE_THREADS_MARGIN = 0.05


@dataclass
class ThreadChoice:
    """The thread count in use and how it was decided."""

    threads: int
    how: str
    """"auto" (timed), "set" (the config named it), "default" (torch's), or "checkpoint" (a resumed run's)."""
    step_ms: dict[int, float] = field(default_factory=dict)
    """Median milliseconds of the timed step per candidate thread count (``how == "auto"`` only)."""

    def describe(self) -> str:
        """One line for the run's log, e.g. ``threads=auto: 1 (1: 41 ms/step, 2: 95 ms/step)``."""
        if self.how == "checkpoint":
            return f"threads=auto: {self.threads}, the count the resumed checkpoint was trained with"
        if self.how != "auto":
            return f"threads: {self.threads} ({self.how})"
        timings = ", ".join(f"{n}: {ms:.1f} ms" for n, ms in sorted(self.step_ms.items()))
        return f"threads=auto: {self.threads} (timed per step: {timings})"

    def as_dict(self) -> dict:
        """For summary.json."""
        step_ms = {str(n): ms for n, ms in self.step_ms.items()}  # JSON keys are strings
        return {"threads": self.threads, "how": self.how, "step_ms": step_ms}


def check_threads_setting(value, key: str = "threads") -> None:
    """``auto``, null (torch's default) or a positive whole number; anything else is one line."""
    if value is None or value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GptMiniError(
            f"{key}={value!r} must be auto (timed), null (torch's default) or a whole number >= 1; "
            f"try {key}=auto."
        )
    cores = available_cores()
    if value > cores:
        # More threads than cores only makes them wait for each other: never what was meant.
        raise GptMiniError(
            f"{key}={value} is more than the {cores} CPU cores this process may use; "
            f"use {key}=auto (timed) or at most {key}={cores}."
        )


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def thread_candidates(cores: int | None = None) -> list[int]:
    """1, 2, 4, ... up to ``cores``, and ``cores`` itself: few enough to time in a second or two."""
    cores = available_cores() if cores is None else cores
    candidates, n = [], 1
    while n < cores:
        candidates.append(n)
        n *= 2
    return [*candidates, cores]


def time_step(step: Callable[[], object], threads: int, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``step()`` with ``threads`` threads, after ``warmup`` untimed calls."""
    torch.set_num_threads(threads)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose_threads(
    step: Callable[[], object], candidates: list[int] | None = None, repeats: int = 2
) -> ThreadChoice:
    """Time ``step`` with each candidate count, set torch to the fastest and return the choice. A larger
    count is the faster only if it beats the best smaller one by ``MORE_THREADS_MARGIN``.

    ``step`` must be the work that will follow (same model, same shapes): its own speed is what is compared.
    Candidates are timed in two interleaved passes, so a load that comes and goes during the measurement
    hits them all alike; each count keeps its faster pass. The first pass warms each count up once (thread
    pools start, caches fill): 5 calls of ``step`` per candidate in all, about 1% of the default run.
    """
    candidates = thread_candidates() if candidates is None else candidates
    if len(candidates) == 1:
        torch.set_num_threads(candidates[0])
        return ThreadChoice(candidates[0], "auto", {})
    seconds: dict[int, float] = {}
    for first_pass in (True, False):
        for n in candidates:
            measured = time_step(step, n, repeats, warmup=1 if first_pass else 0)
            seconds[n] = min(seconds.get(n, measured), measured)
    best = min(candidates)
    for n in sorted(candidates):
        if seconds[n] < (1 - MORE_THREADS_MARGIN) * seconds[best]:
            best = n
    torch.set_num_threads(best)
    return ThreadChoice(best, "auto", {n: round(s * 1000, 2) for n, s in seconds.items()})


def apply_threads(setting, probe: Callable[[], object] | None = None) -> ThreadChoice:
    """Apply ``threads=<n> | null | auto``; ``auto`` times ``probe`` (on a CPU) to choose the count.

    Without a probe (e.g. the model runs on a GPU, where torch's CPU threads barely matter), ``auto`` keeps
    torch's default.
    """
    check_threads_setting(setting)
    if isinstance(setting, int):
        torch.set_num_threads(setting)
        return ThreadChoice(setting, "set")
    if setting == AUTO and probe is not None:
        return choose_threads(probe)
    return ThreadChoice(torch.get_num_threads(), "default")


def training_step_probe(model: torch.nn.Module, batch_size: int, precision: str) -> Callable[[], None]:
    """One forward + backward of a training batch's shape on a copy of ``model``: what ``threads=auto`` times.

    A copy, and its own random source, so timing it changes neither the weights nor the run's random
    numbers; no optimizer step, which costs the same whatever the thread count.
    """
    probe = copy.deepcopy(model).train()
    config = probe.config
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    bf16 = str(precision).startswith("bf16")

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = probe.loss(inputs, targets)
        loss.backward()
        probe.zero_grad(set_to_none=True)

    return step


def decode_probe(model: torch.nn.Module, new_tokens: int = 4) -> Callable[[], None]:
    """A one-token prompt and a few cached one-token steps: what ``threads=auto`` times for generation.

    Short on purpose: a GPT-2 small step takes tens of milliseconds on a CPU, and each thread count is timed
    several times. The steps are generation's eager ones (``next_token_logits`` with the KV cache).
    """
    device = next(model.parameters()).device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)

    @torch.no_grad()
    def decode() -> None:
        cache = model.new_kv_cache(1)
        for _ in range(1 + new_tokens):
            model.next_token_logits(token, kv_cache=cache)

    return decode
