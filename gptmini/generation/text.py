"""Text from a checkpoint: ``generate_text(cfg)``, what ``python generate.py`` runs, and its config.

One concern: the run around the token loop: check the options and paths, load the checkpoint, stream each
sample to stdout, and draw the attention plot. stdout carries only the generated text, so it can be piped;
everything else (what was loaded, warnings, speed) goes to stderr. The loop itself is ``sampling``; prompts
are ``prompt``, streaming text is ``streaming``, the picture is ``attention_plot``, a conversation
(``chat=true``) is ``chat``.

May import ``model``, ``data.tokenizer``, ``checkpoint``, ``common`` and the other generation modules; must
not import ``training``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from gptmini.common import GptMiniError, check_seed, pick_device, say, typed_config
from gptmini.data.tokenizer import EOT  # the document separator; generation always stops on it
from gptmini.generation.attention_plot import MAX_TOKENS, plot_attention, plot_path, save_figure, token_window
from gptmini.generation.chat import Conversation, chat_interactive, checkpoint_template
from gptmini.generation.prompt import encode_prompt, read_line, read_prompt
from gptmini.generation.sampling import SamplingOptions, sample_tokens
from gptmini.generation.streaming import TextStream
from gptmini.threads import AUTO, apply_threads, check_threads_setting, decode_probe
from gptmini.weights import load_checkpoint

SCHEMA_NAME = "generate_schema"


@dataclass
class GenerateTextConfig(SamplingOptions):
    """Options of ``python generate.py``: the sampling options plus what to load, print and draw.

    Each field's docstring describes it and its default (configs/generate.yaml only picks this schema).
    Validated on construction (``OmegaConf.to_object`` constructs it from Hydra's config), so a bad value
    fails before the checkpoint loads.
    """

    ckpt: str = "latest"
    """A .ckpt file, a run directory (its checkpoints/last.ckpt), ``latest`` (newest under outputs/), a GPT-2
    name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; from the Hugging Face cache) or a Hugging Face folder. A
    LoRA checkpoint is merged into its base."""
    prompt: str = ""
    """The text to continue; ``@file.txt`` reads a file, ``-`` reads stdin (at most 4 MiB of UTF-8, see
    ``prompt.MAX_PROMPT_BYTES``), empty starts a new document."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample (not printed); <|endoftext|> always ends one."""
    num_samples: int = 1
    """How many samples to draw for the prompt."""
    seed: Optional[int] = None  # noqa: UP045 - OmegaConf reads typing.Optional, not `int | None`
    """Random seed in 0..2**32-1 (train.py's range): the same seed gives the same text; null = different every
    run."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda or mps."""
    stream: bool = True
    """Print text as it is produced (false: print each sample when it is complete)."""
    use_cache: bool = True
    """Decode with the KV cache; false recomputes the whole context for every token (slow, for checking)."""
    compile: bool = False
    """Compile the one-token decoding step (torch.compile; CUDA graphs on a GPU). Compiling takes seconds to
    a minute once; each token then costs less. Worth it for long texts, many samples or interactive use."""
    threads: Any = "auto"
    """CPU threads: auto (time a few decoding steps with 1, 2, 4 … threads and keep the fastest), a number,
    or null (torch's default: one per core). A busy CPU can make torch's default many times slower."""
    interactive: bool = False
    """Ask for prompts in a loop, keeping the model loaded; an empty line or Ctrl-D quits."""
    chat: bool = False
    """Chat instead of continuing text: the prompt (with interactive=true, each line) is a user turn, rendered
    with the checkpoint's own chat template (the one it was trained with; the ``chat`` template for a
    checkpoint without one, said on stderr), and only the assistant's reply is printed. A reply ends at
    <|endoftext|>, the template's stop strings or ``stop``. Interactive chat keeps the conversation;
    ``/reset`` starts over, and the oldest turns are dropped when the prompt would leave less than
    min(max_new_tokens, block_size // 2) tokens of the context for the reply."""
    system: Optional[str] = None  # noqa: UP045
    """With chat=true: the system message, kept for the whole conversation; null = none (the alpaca template
    then uses its own opening sentence)."""
    attention_plot: Optional[str] = None  # noqa: UP045
    """Image path (.png, .pdf, .svg, ...; a folder gets attention.png) for the attention maps over the prompt
    and the first sample's text, at most 48 tokens; null = no plot."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_threads_setting(self.threads)
        if self.seed is not None:
            check_seed(self.seed)  # train.py's rule: a seed either command accepts, the other accepts too
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise GptMiniError(f"num_samples must be >= 1, got {self.num_samples}. Try num_samples=1.")
        self._check_chat()

    def _check_chat(self) -> None:
        """chat=true's options: system needs it; one reply per turn; a prompt unless interactive."""
        if self.system is not None and not self.chat:
            raise GptMiniError(
                f"system={self.system!r} is the system message of a chat; add chat=true (or leave system "
                "unset)."
            )
        if not self.chat:
            return
        if self.interactive and self.num_samples != 1:
            raise GptMiniError(
                f"chat=true interactive=true keeps one reply per turn, so num_samples must be 1, got "
                f"{self.num_samples}; leave num_samples out (prompt=... without interactive gives several)."
            )
        if not self.interactive and not self.prompt:
            raise GptMiniError(
                'chat=true needs the user\'s message: prompt="..." (or interactive=true to type the turns).'
            )


def register_config() -> None:
    """Register ``GenerateTextConfig`` with Hydra so configs/generate.yaml is checked against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=GenerateTextConfig)


# ---------------------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------------------


def generate_text(cfg: GenerateTextConfig | Mapping) -> list[str]:
    """Run generation as configured (a ``GenerateTextConfig``, or the DictConfig Hydra composed).

    Returns the generated samples (also written to stdout). Raises ``GptMiniError`` for bad input, and
    checks every option and the plot path before the checkpoint is loaded.
    """
    cfg = _validated(cfg)
    device = pick_device(cfg.device)
    plot_file = plot_path(cfg.attention_plot) if cfg.attention_plot else None
    prompt = None if cfg.interactive else read_prompt(cfg.prompt)  # a bad prompt file fails before loading
    loaded = load_checkpoint(cfg.ckpt, device=device)
    model = loaded.model
    step = f"step {loaded.global_step}, " if loaded.global_step is not None else ""
    say(f"loaded {loaded.path} ({step}{model.num_params() / 1e6:.2f}M parameters) on {device}")
    template = checkpoint_template(loaded.info) if cfg.chat else None  # a foreign one fails here
    if device.type == "cpu":  # on a GPU the CPU threads barely matter
        probe = decode_probe(model) if cfg.threads == AUTO else None
        say(apply_threads(cfg.threads, probe).describe())
    generator = torch.Generator(device=device)
    if cfg.seed is None:
        generator.seed()
    else:
        generator.manual_seed(cfg.seed)
    session = _Session(cfg, model, loaded.tokenizer, generator, plot_file)
    if cfg.chat:
        conversation = Conversation(session, template, cfg.system)
        return chat_interactive(conversation) if cfg.interactive else conversation.reply(prompt)
    if cfg.interactive:
        return _interactive(session)
    return session.run(prompt)


def _validated(cfg) -> GenerateTextConfig:
    """The config as a validated ``GenerateTextConfig`` (constructing it runs every check)."""
    return typed_config(cfg, GenerateTextConfig, "generate")


def _interactive(session: _Session) -> list[str]:
    """Prompt, generate, repeat: an empty line, Ctrl-D or Ctrl-C at the prompt quits."""
    say("interactive: type a prompt and press Enter; an empty line or Ctrl-D quits, Ctrl-C stops a sample.")
    texts = []
    while True:
        line = read_line()
        if line is None or not line.strip():
            break
        texts += session.run(line)
    return texts


class _Session:
    """A loaded model and the options: turns a prompt into samples on stdout."""

    def __init__(
        self, cfg: GenerateTextConfig, model: torch.nn.Module, enc, generator: torch.Generator, plot_file
    ):
        self.cfg = cfg
        self.model = model
        self.enc = enc
        self.generator = generator
        self.plot_file: Path | None = plot_file
        self.eot_id = enc.encode_single_token(EOT) if EOT in enc.special_tokens_set else None
        self.device = model.wte.weight.device

    def run(self, prompt: str) -> list[str]:
        """Generate ``num_samples`` continuations of ``prompt``; print them and return them."""
        ids = encode_prompt(prompt, self.enc, self.model.config.block_size)
        return self.run_ids(ids, list(self.cfg.stop))

    def run_ids(self, ids: list[int], stops: list[str]) -> list[str]:
        """Generate ``num_samples`` continuations of the token ids, each ending at <|endoftext|> or one of
        ``stops``; print them and return them. (Chat renders its prompt to ids itself: ``chat``.)"""
        prompt_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        texts, n_tokens, elapsed = [], 0, 0.0
        for i in range(self.cfg.num_samples):
            if self.cfg.num_samples > 1:
                say(f"--- sample {i + 1}/{self.cfg.num_samples}")
            started = time.perf_counter()
            text, new_ids = self._sample(prompt_ids, stops)
            elapsed += time.perf_counter() - started  # the speed of generating, not of drawing
            texts.append(text)
            n_tokens += len(new_ids)
            if i == 0 and self.plot_file is not None:
                self._plot_attention(ids, new_ids)
        say(f"{n_tokens} tokens in {elapsed:.2f} s ({n_tokens / max(elapsed, 1e-9):.1f} tokens/s)")
        return texts

    def _sample(self, prompt_ids: torch.Tensor, stops: list[str]) -> tuple[str, list[int]]:
        """One sample, streamed to stdout; returns its text and the token ids the model produced."""
        cfg = self.cfg
        stream = TextStream(self.enc, stops, self.eot_id)
        pieces, new_ids = [], []
        tokens = sample_tokens(
            self.model,
            prompt_ids,
            cfg,  # the config is a SamplingOptions: passed whole
            use_cache=cfg.use_cache,
            compile=cfg.compile and cfg.use_cache,
            generator=self.generator,
            eot_id=self.eot_id,
            vocab_limit=self.enc.n_vocab,  # a padded model vocabulary must not yield undecodable ids
        )
        try:
            for token in tokens:
                new_ids.append(int(token))
                self._emit(stream.push(new_ids[-1]), pieces)
                if stream.ended:
                    break
        except KeyboardInterrupt:
            if not cfg.interactive:
                raise
            say("\n[stopped]")
        finally:
            tokens.close()  # leave the inference-mode loop even when we stop early
        self._emit(stream.close(), pieces)
        text = "".join(pieces)
        # Streamed text is already out; otherwise the whole sample now. The newline ends the sample's line.
        sys.stdout.write(("" if cfg.stream else text) + "\n")
        sys.stdout.flush()
        return text, new_ids

    def _emit(self, text: str, pieces: list[str]) -> None:
        """Keep the text for the sample, and print it at once when streaming."""
        if not text:
            return
        pieces.append(text)
        if self.cfg.stream:
            sys.stdout.write(text)
            sys.stdout.flush()

    def _plot_attention(self, prompt_ids: list[int], new_ids: list[int]) -> None:
        """Draw the maps over the prompt and the sample, at most MAX_TOKENS of them, and write the image.

        The model runs once over up to block_size tokens ending at the last one drawn, so the maps are the
        attention as it was while generating; the drawn window is cut out of them.
        """
        block_size = self.model.config.block_size
        sequence = prompt_ids + new_ids
        start, end = token_window(len(prompt_ids), len(new_ids), min(MAX_TOKENS, block_size))
        first = max(0, end - block_size)
        idx = torch.tensor([sequence[first:end]], dtype=torch.long, device=self.device)
        cut = start - first
        maps = self.model.attention_maps(idx)[:, 0, :, cut:, cut:]  # (n_layer, n_head, T, T)
        pieces = [self.enc.decode_single_token_bytes(t) for t in sequence[start:end]]
        labels = [piece.decode("utf-8", errors="replace") for piece in pieces]
        n_prompt = len(prompt_ids) - start
        fig = plot_attention(maps, labels, n_prompt=n_prompt)
        path = save_figure(fig, self.plot_file)
        skipped = f", after skipping the prompt's first {start}" if start else ""
        say(
            f"wrote attention maps ({maps.size(0)} layers x {maps.size(1)} heads over {n_prompt} prompt + "
            f"{end - len(prompt_ids)} generated tokens{skipped}) to {path}"
        )
