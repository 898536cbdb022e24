"""Text generation from a checkpoint: the ``generate(cfg)`` behind ``python generate.py``.

stdout carries only the generated text, so it can be piped; everything else (what was loaded, warnings,
speed) goes to stderr. The token loop itself lives in ``gptmini.generation.sampling``.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from gptmini.checkpoint import load_checkpoint
from gptmini.common import GptMiniError, pick_device
from gptmini.data.tokenizer import EOT  # the document separator; generation always stops on it
from gptmini.generation.sampling import generate_tokens, validate_sampling_options

SCHEMA_NAME = "generate_schema"


@dataclass
class GenerateConfig:
    """Options of ``python generate.py``; configs/generate.yaml gives each a one-line description."""

    ckpt: str = "latest"
    """A .ckpt file, a run directory (its checkpoints/last.ckpt), or ``latest`` (newest under outputs/)."""
    prompt: str = ""
    """The text to continue; ``@file.txt`` reads a file, ``-`` reads stdin, empty starts a new document."""
    max_new_tokens: int = 200
    """Most tokens to generate per sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy (always the most likely token)."""
    top_k: Optional[int] = None  # noqa: UP045 - OmegaConf reads typing.Optional, not `int | None`
    """Sample only among the k most likely tokens; null = no limit."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this much probability; 1.0 = off."""
    repetition_penalty: float = 1.0
    """Above 1 makes tokens already in the context less likely; 1.0 = off."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample (not printed); <|endoftext|> always ends one."""
    num_samples: int = 1
    """How many samples to draw for the prompt."""
    seed: Optional[int] = None  # noqa: UP045
    """Random seed: the same seed gives the same text; null = different every run."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda or mps."""
    stream: bool = True
    """Print text as it is produced (false: print each sample when it is complete)."""
    use_cache: bool = True
    """Decode with the KV cache; false recomputes the whole context for every token (slow, for checking)."""
    interactive: bool = False
    """Ask for prompts in a loop, keeping the model loaded; an empty line or Ctrl-D quits."""
    attention_plot: Optional[str] = None  # noqa: UP045
    """Write a PNG of the attention maps over the prompt to this path; null = no plot."""


def register_config() -> None:
    """Register ``GenerateConfig`` with Hydra so configs/generate.yaml is checked against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=GenerateConfig)


# ---------------------------------------------------------------------------------------------------------
# Small pieces: messages, device, prompt text.
# ---------------------------------------------------------------------------------------------------------


def info(message: str) -> None:
    """Everything that is not generated text goes to stderr."""
    print(message, file=sys.stderr, flush=True)


def quote_prompt_argument(argv: list[str]) -> list[str]:
    """Quote a raw ``prompt=...`` command-line argument for Hydra's override grammar.

    Hydra rejects unquoted values with brackets, commas, colons and such (``prompt=def main(`` is a
    parse error), and OmegaConf would resolve ``${...}`` in a prompt. A prompt value that is not already
    quoted is wrapped in single quotes with the few escapes the two grammars need, so it arrives as typed.
    """
    return [_quote_prompt(arg) for arg in argv]


def _quote_prompt(arg: str) -> str:
    key, sep, value = arg.partition("=")
    if key != "prompt" or not sep or not value or value[0] in "'\"":
        return arg
    # OmegaConf: "\${" is a literal "${" (backslashes before it are doubled to stay literal too).
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    # Hydra quoted strings: backslashes are escapes only before a quote or at the end.
    value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"prompt='{value}'"


def read_prompt(prompt: str) -> str:
    """The prompt text: ``-`` reads stdin, ``@path`` reads a file, anything else is the text itself."""
    if prompt == "-":
        return sys.stdin.read()
    if prompt.startswith("@"):
        path = Path(prompt[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GptMiniError(f"prompt file not found: {path} (from prompt={prompt}).") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise GptMiniError(f"cannot read prompt file {path}: {exc}. Pass a UTF-8 text file.") from None
    return prompt


def encode_prompt(text: str, enc, block_size: int) -> list[int]:
    """Token ids of the prompt: <|endoftext|> for an empty one, the last block_size for a long one."""
    ids = enc.encode(text, allowed_special="all")  # a literal <|endoftext|> in the prompt is the token
    if not ids:
        if EOT not in enc.special_tokens_set:
            raise GptMiniError("the prompt is empty and the tokenizer has no <|endoftext|>; pass a prompt.")
        ids = [enc.encode_single_token(EOT)]
    if len(ids) > block_size:
        info(
            f"warning: the prompt has {len(ids)} tokens but the model sees at most {block_size}; "
            f"using the last {block_size}."
        )
        ids = ids[-block_size:]
    return ids


# ---------------------------------------------------------------------------------------------------------
# Streaming text: bytes to characters without splitting one, and holding back possible stop strings.
# ---------------------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turn token ids into text one token at a time.

    A token may end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK across tokens);
    the incremental decoder keeps the incomplete bytes until the character is whole.
    """

    def __init__(self, enc):
        self.enc = enc
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token ("" while a character is still partial)."""
        return self.decoder.decode(self.enc.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is left; a truncated character becomes U+FFFD."""
        return self.decoder.decode(b"", final=True)


class StopFilter:
    """Release text only when it cannot be the start of a stop string; report when one is complete."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return the part that is safe to print now."""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self.pending = self.pending[:cut], ""
            return released
        hold = self._held_back_length()
        released = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(released) :]
        return released

    def flush(self) -> str:
        """The held-back tail once generation ends without a stop."""
        released, self.pending = self.pending, ""
        return released

    def _held_back_length(self) -> int:
        """Length of the longest end of ``pending`` that some stop string starts with."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest


# ---------------------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------------------


def generate(cfg) -> list[str]:
    """Run generation as configured (a ``GenerateConfig`` or the DictConfig Hydra composed).

    Returns the generated samples (also written to stdout). Raises ``GptMiniError`` for bad input.
    """
    validate_sampling_options(
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        max_new_tokens=cfg.max_new_tokens,
        num_samples=cfg.num_samples,
    )
    device = pick_device(cfg.device)
    prompt = None if cfg.interactive else read_prompt(cfg.prompt)  # a bad prompt file fails before loading
    loaded = load_checkpoint(cfg.ckpt, device=device)
    model = _cacheable(loaded.model) if cfg.use_cache else loaded.model
    step = f"step {loaded.global_step}, " if loaded.global_step is not None else ""
    info(f"loaded {loaded.path} ({step}{model.num_params() / 1e6:.2f}M parameters) on {device}")
    generator = torch.Generator(device=device)
    if cfg.seed is None:
        generator.seed()
    else:
        generator.manual_seed(cfg.seed)
    session = _Session(cfg, model, loaded.tokenizer, generator)
    if cfg.interactive:
        return _interactive(session)
    return session.run(prompt)


def _cacheable(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in the SDPA attention, the one implementation with a KV cache."""
    if model.config.attention == "sdpa":
        return model
    sdpa = type(model)(dataclasses.replace(model.config, attention="sdpa"))
    sdpa.load_state_dict(model.state_dict())
    return sdpa.to(model.wte.weight.device).eval()


def _interactive(session: _Session) -> list[str]:
    """Prompt, generate, repeat: an empty line, Ctrl-D or Ctrl-C at the prompt quits."""
    info("interactive: type a prompt and press Enter; an empty line or Ctrl-D quits, Ctrl-C stops a sample.")
    texts = []
    while True:
        sys.stderr.write("> ")  # the prompt marker is not generated text: stderr, like every message
        sys.stderr.flush()
        try:
            line = input()
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            break
        texts += session.run(line)
    return texts


class _Session:
    """A loaded model and the options: turns a prompt into samples on stdout."""

    def __init__(self, cfg, model: torch.nn.Module, enc, generator: torch.Generator):
        self.cfg = cfg
        self.model = model
        self.enc = enc
        self.generator = generator
        self.eot_id = enc.encode_single_token(EOT) if EOT in enc.special_tokens_set else None
        self.device = model.wte.weight.device

    def run(self, prompt: str) -> list[str]:
        """Generate ``num_samples`` continuations of ``prompt``; print them and return them."""
        ids = encode_prompt(prompt, self.enc, self.model.config.block_size)
        if self.cfg.attention_plot:
            self._plot_attention(ids)
        prompt_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        texts, n_tokens, started = [], 0, time.perf_counter()
        for i in range(self.cfg.num_samples):
            if self.cfg.num_samples > 1:
                info(f"--- sample {i + 1}/{self.cfg.num_samples}")
            text, n = self._sample(prompt_ids)
            texts.append(text)
            n_tokens += n
        elapsed = time.perf_counter() - started
        info(f"{n_tokens} tokens in {elapsed:.2f} s ({n_tokens / max(elapsed, 1e-9):.1f} tokens/s)")
        return texts

    def _sample(self, prompt_ids: torch.Tensor) -> tuple[str, int]:
        """One sample, streamed to stdout; returns its text and how many tokens it took."""
        cfg = self.cfg
        decoder, stops = StreamDecoder(self.enc), StopFilter(list(cfg.stop))
        pieces, n_tokens = [], 0
        tokens = generate_tokens(
            self.model,
            prompt_ids,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            repetition_penalty=cfg.repetition_penalty,
            use_cache=cfg.use_cache,
            generator=self.generator,
            eot_id=self.eot_id,
        )
        try:
            for token in tokens:
                n_tokens += 1
                token_id = int(token)
                if token_id == self.eot_id:
                    break
                self._emit(stops.feed(decoder.push(token_id)), pieces)
                if stops.stopped:
                    break
        except KeyboardInterrupt:
            if not cfg.interactive:
                raise
            info("\n[stopped]")
        finally:
            tokens.close()  # leave the inference-mode loop even when we stop early
        if not stops.stopped:
            self._emit(stops.feed(decoder.flush()) + stops.flush(), pieces)
        text = "".join(pieces)
        # Streamed text is already out; otherwise the whole sample now. The newline ends the sample's line.
        sys.stdout.write(("" if cfg.stream else text) + "\n")
        sys.stdout.flush()
        return text, n_tokens

    def _emit(self, text: str, pieces: list[str]) -> None:
        """Keep the text for the sample, and print it at once when streaming."""
        if not text:
            return
        pieces.append(text)
        if self.cfg.stream:
            sys.stdout.write(text)
            sys.stdout.flush()

    def _plot_attention(self, ids: list[int]) -> None:
        from gptmini.generation.attention_plot import plot_attention

        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        maps = self.model.attention_maps(idx)[:, 0]  # (n_layer, n_head, T, T)
        labels = [self.enc.decode_single_token_bytes(t).decode("utf-8", errors="replace") for t in ids]
        path = self.cfg.attention_plot
        plot_attention(maps, labels, path)
        info(f"wrote attention maps ({maps.size(0)} layers x {maps.size(1)} heads) to {path}")
