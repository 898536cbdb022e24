"""Continuous batching: one model, a KV cache with ``max_batch`` slots, and a scheduler thread.

Each turn of the engine's loop:
  1. drops the requests whose client went away (their slots are free again at once);
  2. admits waiting requests into free slots;
  3. prefills every request that needs it, alone, through its slot's row of the cache (a new prompt, or a
     context that slid past block_size), and chooses its next token;
  4. decodes one token for every other active request in one batched step, each row at its own position.

Why a request's tokens do not depend on what else runs: the prefill always has one row (the shapes of
generate.py's prefill), and the batched step always has ``max_batch`` rows over the whole cache, whatever the
load. Rows never mix in a transformer, and with fixed shapes the kernels add up each row in the same order,
so a row computes the same numbers next to any other rows (an idle slot decodes a dummy token in its own
row). Greedy text under load therefore equals the text alone, exactly.

Tokens are chosen per row with generation's ``choose_next_token`` (each request's options and its own
``torch.Generator``) and turned into text with generation's ``TextStream``: the sampler is generate.py's.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptmini.common import say
from gptmini.data.tokenizer import EOT
from gptmini.generation.sampling import choose_next_token, slide_keep
from gptmini.generation.streaming import TextStream
from gptmini.serve.protocol import ApiError, GenerationRequest

RETRY_AFTER_S = 1  # what a 503 tells a client to wait before retrying


@dataclass
class Event:
    """What a request's client receives: new text, and at the end why it ended and the token counts."""

    text: str
    finish_reason: str | None = (
        None  # stop, length, abort (server shutting down), cancelled (client gone), error
    )
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Job:
    """One request inside the engine: the tokens the model sees, its sampling state, where its text goes."""

    def __init__(self, request: GenerationRequest, sink: Callable[[Event], None], engine: Engine):
        self.options = request.options
        self.sink = sink
        self.prompt_tokens = len(request.prompt_ids)
        self.window = list(request.prompt_ids)  # the context, at most block_size tokens before decoding
        self.generator = torch.Generator(device=engine.device)
        if request.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.seed)  # as generate.py seeds its generator
        self.seen = None  # (1, V) bool: tokens in the context, for the repetition penalty (as generate.py)
        if self.options.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, engine.vocab_size, dtype=torch.bool, device=engine.device)
            self.seen[0, self.window] = True
        self.text = TextStream(engine.enc, request.stop, engine.eot_id)
        self.produced = 0  # tokens chosen so far
        self.slot: int | None = None
        self.needs_prefill = True
        self.cancelled = False  # set from the web server's thread when the client goes away
        self.produced_at_cancel: int | None = None
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        """The client is gone: the engine frees the slot before its next step."""
        if not self.cancelled:
            self.produced_at_cancel = self.produced
            self.cancelled = True


class Engine:
    """The scheduler and the batched decoding step; ``submit`` from any thread, results go to each sink."""

    def __init__(self, model: torch.nn.Module, enc, max_batch: int, max_queue: int):
        self.model = model
        self.enc = enc
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.device = model.wte.weight.device
        self.vocab_size = model.config.vocab_size
        self.block_size = model.config.block_size
        self.eot_id = enc.encode_single_token(EOT) if EOT in enc.special_tokens_set else None
        self.cache = model.new_kv_cache(max_batch)
        self.slots: list[Job | None] = [None] * max_batch
        self.waiting: deque[Job] = deque()
        self.steps = 0  # batched decoding steps run
        self.peak_batch = 0  # the most requests one step has decoded together
        self.closing = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="gptmini-engine", daemon=True)

    # ----- the web server's side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Job:
        """Queue a request; a full queue (or a server shutting down) is a 503 with Retry-After."""
        with self._wake:
            if self.closing:
                raise ApiError(503, "the server is shutting down.", kind="server_error")
            if self.active + len(self.waiting) >= self.max_batch + self.max_queue:
                raise ApiError(
                    503,
                    f"the server is busy: {self.max_batch} requests are running and {len(self.waiting)} "
                    f"waiting (max_queue={self.max_queue}); retry in a moment.",
                    kind="server_error",
                    code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            job = Job(request, sink, self)
            self.waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._wake:
            self._wake.notify()

    def shutdown(self, wait: float | None = None) -> None:
        """Stop taking requests; every running or waiting one ends with finish_reason "abort"."""
        with self._wake:
            self.closing = True
            self._wake.notify()
        if wait is not None and self._thread.is_alive():
            self._thread.join(wait)

    @property
    def active(self) -> int:
        return sum(job is not None for job in self.slots)

    # ----- the engine's thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.closing or self.waiting or self.active):
                    self._wake.wait()
                if self.closing:
                    break
            try:
                with torch.inference_mode():
                    self._turn()
            except Exception as error:  # a bug or an out-of-memory: fail the running requests, keep serving
                say(f"error in a decoding step:\n{traceback.format_exc()}")
                for job in self.running():
                    self._finish(job, "error", error=f"{type(error).__name__}: {error}")
        for job in [*self.running(), *self.waiting]:
            self._finish(job, "abort")
        self.waiting.clear()

    def running(self) -> list[Job]:
        return [job for job in self.slots if job is not None]

    def _turn(self) -> None:
        """One turn: drop the gone, admit, prefill, one batched step."""
        self._drop_cancelled()  # their slots are free for this very turn's admissions
        self._admit()
        for job in self.running():
            if job.needs_prefill:
                self._take(job, self._prefill(job))
        self._drop_cancelled()  # a client gone during the prefills costs no step
        decoding = [job for job in self.running() if not job.needs_prefill]
        if decoding:
            logits = self._decode(decoding)
            for job in decoding:
                self._take(job, logits[job.slot : job.slot + 1])

    def _drop_cancelled(self) -> None:
        for job in self.running():
            if job.cancelled:
                self._finish(job, "cancelled")

    def _admit(self) -> None:
        with self._wake:
            while self.waiting and None in self.slots:
                job = self.waiting.popleft()
                if job.cancelled:
                    self._finish(job, "cancelled")
                    continue
                job.slot = self.slots.index(None)
                self.slots[job.slot] = job

    def _prefill(self, job: Job) -> torch.Tensor:
        """The job's whole context through its slot's row: (1, V) logits for its next token."""
        context = torch.tensor([job.window], dtype=torch.long, device=self.device)
        job.needs_prefill = False
        return self.model.next_token_logits(context, kv_cache=self.cache.row(job.slot))

    def _decode(self, jobs: list[Job]) -> torch.Tensor:
        """One token for each job at its own position, over all max_batch rows: (max_batch, V) logits."""
        tokens = [0] * self.max_batch  # idle slots decode token 0 at position 0 of their own row
        positions = [0] * self.max_batch
        for job in jobs:
            tokens[job.slot] = job.window[-1]
            positions[job.slot] = len(job.window) - 1
        token = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        position = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(jobs))
        return self.model.decode_step(token, position, self.cache)

    def _take(self, job: Job, logits: torch.Tensor) -> None:
        """Choose the job's next token from its (1, V) logits, send its text, and end or slide it."""
        token = int(choose_next_token(logits, job.options, job.seen, job.generator, self.enc.n_vocab))
        job.produced += 1
        if job.seen is not None:
            job.seen[0, token] = True
        text = job.text.push(token)
        if text:
            job.sink(Event(text))
        if job.text.ended:
            self._finish(job, "stop")
        elif job.produced >= job.options.max_new_tokens:
            self._finish(job, "length")
        else:
            job.window.append(token)
            if len(job.window) > self.block_size:
                # generate.py's slide: keep the last half block; the slot is prefilled again from it.
                job.window = job.window[-slide_keep(self.block_size) :]
                job.needs_prefill = True

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        self._free(job)
        job.finish_reason = reason
        tail = "" if error else job.text.close()
        job.sink(Event(tail, reason, job.prompt_tokens, job.produced, error))

    def _free(self, job: Job) -> None:
        if job.slot is not None and self.slots[job.slot] is job:
            self.slots[job.slot] = None
