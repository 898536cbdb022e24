"""Tokenizers: every one is a ``tiktoken.Encoding`` with ``<|endoftext|>`` as its only special token.

Two kinds: a named tiktoken encoding (``gpt2``, ``cl100k_base``, ...), loaded with tiktoken's own download
and cache; or ``bpe``, a byte-level BPE trained with rustbpe on the training text, saved in tiktoken's text
format (``<base64 token> <rank>`` per line) and run by tiktoken. A tokenizer travels inside checkpoints as a
*spec*: plain str/int values that ``torch.load(weights_only=True)`` accepts (``tokenizer_from_spec``).

One concern: making, saving and loading tokenizers. Imports only ``gptmini.common`` (never
``gptmini.model``, ``gptmini.training`` or ``gptmini.generation``), so checkpoints and generation can use it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from gptmini.common import GptMiniError, atomic_write_text, say

EOT = "<|endoftext|>"

# Pre-tokenization split patterns: BPE merges never cross these boundaries.
# gpt4 is cl100k_base's (digits in groups of up to 3, case-insensitive contractions); gpt2 is the original.
PATTERNS = {
    "gpt4": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
        r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
    ),
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}

# 256 byte tokens + the end-of-text token is the smallest useful byte-level vocabulary.
MIN_VOCAB_SIZE = 256 + 1
# Far beyond any tokenizer in use (o200k has ~200k); larger values are almost certainly a typo.
MAX_VOCAB_SIZE = 1_000_000


def valid_names() -> list[str]:
    """The accepted tokenizer names: "bpe" and every tiktoken encoding."""
    return ["bpe", *tiktoken.list_encoding_names()]


@dataclass
class TokenizerConfig:
    """Which tokenizer to use (the ``tokenizer`` config group)."""

    name: str = "bpe"
    """"bpe" (trained on the corpus) or a tiktoken encoding name such as "gpt2" or "cl100k_base"."""
    vocab_size: int = 4096
    """bpe only: total vocabulary size, including the <|endoftext|> token."""
    pattern: str = "gpt4"
    """bpe only: the pre-tokenization split pattern, "gpt4" or "gpt2"."""

    def __post_init__(self) -> None:
        if self.name not in valid_names():
            raise GptMiniError(
                f"tokenizer.name={self.name!r} is unknown; use one of: {', '.join(valid_names())}."
            )
        if self.name != "bpe":
            return
        if not isinstance(self.vocab_size, int) or not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise GptMiniError(
                f"tokenizer.vocab_size={self.vocab_size!r} is out of range: a byte-level BPE needs "
                f"{MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE:,} (256 bytes + {EOT}); try 4096."
            )
        if self.pattern not in PATTERNS:
            raise GptMiniError(
                f"tokenizer.pattern={self.pattern!r} is unknown; use one of: {', '.join(PATTERNS)}."
            )


def tokenizer_id(cfg: TokenizerConfig) -> str:
    """A short folder name for caches (and a trained BPE's name) that changes whenever the settings do."""
    return f"bpe-{cfg.vocab_size}-{cfg.pattern}" if cfg.name == "bpe" else cfg.name


def load_encoding(name: str) -> tiktoken.Encoding:
    """Load a named tiktoken encoding, turning a failed download into a short, actionable error."""
    names = tiktoken.list_encoding_names()
    if name not in names:
        raise GptMiniError(f"tokenizer {name!r} is unknown; use one of: {', '.join(['bpe', *names])}.")
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as exc:  # noqa: BLE001 - network, HTTP and hash errors all mean "files not available"
        raise GptMiniError(
            f"tiktoken encoding {name!r} needs its vocabulary files once, and they could not be downloaded "
            f"({type(exc).__name__}). Connect to the internet once, or set TIKTOKEN_CACHE_DIR to a folder "
            "holding a copy of tiktoken's cache files."
        ) from None
    if EOT not in enc.special_tokens_set:
        raise GptMiniError(
            f"tiktoken encoding {name!r} has no {EOT} token; use gpt2, cl100k_base or o200k_base."
        )
    return enc


def _make_bpe(name: str, pat_str: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    # The end-of-text token takes the first id after the merges, so ids stay contiguous.
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = "gpt4") -> tiktoken.Encoding:
    """Train a byte-level BPE with rustbpe; the same texts and settings always give the same vocabulary.

    Args:
        texts: the training text, in pieces (documents or chunks); pre-tokenization never crosses pieces.
        vocab_size: total vocabulary size including <|endoftext|>. A text too small to supply that many
            merges gives a smaller vocabulary (with a warning).
        pattern: "gpt4" or "gpt2", the split pattern.
    """
    name = tokenizer_id(TokenizerConfig("bpe", vocab_size, pattern))  # checks the settings
    import rustbpe  # imported here: only BPE training needs it

    trainer = rustbpe.Tokenizer()
    # One id is reserved for <|endoftext|>, so rustbpe learns vocab_size - 1 byte-level tokens.
    try:
        with _quiet_rustbpe():
            trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=PATTERNS[pattern])
    except SystemError as error:
        # rustbpe calls back into Python (the text iterator, logging). What is raised there, Ctrl-C's
        # KeyboardInterrupt or a read error, comes back wrapped in a SystemError: hand on the real one.
        cause = error.__cause__ or error.__context__
        if cause is None:
            raise
        raise cause from None
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) + 1 < vocab_size:
        say(
            f"the BPE training text only supported {len(ranks) + 1} tokens of the requested {vocab_size}; "
            "use more text or a smaller tokenizer.vocab_size"
        )
    return _make_bpe(name, trainer.get_pattern(), ranks)


@contextlib.contextmanager
def _quiet_rustbpe() -> Iterator[None]:
    """Drop rustbpe's INFO lines (one per 1% of the merges) while it trains; its warnings still show.

    rustbpe logs through Python's logging (pyo3-log) as the "rustbpe" logger, so under train.py's INFO
    logging every training printed ~100 progress lines. A filter on that logger drops the records whatever
    levels the user configured; the caller reports the training in one line instead.
    """
    logger = logging.getLogger("rustbpe")
    quiet = lambda record: record.levelno >= logging.WARNING  # a logging filter may be any callable
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _ranks_to_text(ranks: dict[bytes, int]) -> str:
    """tiktoken's text format: one ``<base64 token> <rank>`` line per token, by rank."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank)


def _ranks_from_text(text: str) -> dict[bytes, int]:
    # Parsed here rather than with tiktoken.load, which caches by file path and could return stale contents.
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _pattern_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_bpe(enc: tiktoken.Encoding, path: str | os.PathLike) -> None:
    """Save a trained BPE: ranks in tiktoken's text format at ``path``, name and pattern in ``path.json``."""
    path = Path(path)
    spec = tokenizer_to_spec(enc)
    if spec["kind"] != "bpe":
        raise GptMiniError(
            f"save_bpe saves trained BPE tokenizers; {enc.name!r} is a named tiktoken encoding."
        )
    # Each file is written whole or not at all (fsynced, then renamed; see gptmini.common.atomic_file).
    atomic_write_text(path, spec["ranks"])
    atomic_write_text(_pattern_path(path), json.dumps({"name": spec["name"], "pattern": spec["pattern"]}))


def load_bpe(path: str | os.PathLike) -> tiktoken.Encoding:
    """Load a BPE written by ``save_bpe``; files that are not one give a GptMiniError naming ``path``."""
    path = Path(path)
    if not path.is_file() or not _pattern_path(path).is_file():
        raise GptMiniError(f"no saved BPE tokenizer at {path} (needs {path.name} and {path.name}.json)")
    try:
        info = json.loads(_pattern_path(path).read_text(encoding="utf-8"))
        ranks = _ranks_from_text(path.read_text(encoding="utf-8"))
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("its ranks are not 0..n-1, one per token")
        return _make_bpe(info["name"], info["pattern"], ranks)
    except (OSError, UnicodeDecodeError, binascii.Error, ValueError, KeyError, TypeError) as exc:
        # ValueError also covers bad JSON, a line without two fields, a rank that is no int, a bad pattern.
        reason = " ".join(str(exc).split())  # one line, whatever the parser said
        raise GptMiniError(f"{path} is not a saved BPE tokenizer ({type(exc).__name__}: {reason})") from None


def tiktoken_name(enc: tiktoken.Encoding) -> str | None:
    """``enc``'s name when it names tiktoken's encoding of exactly the same contents, else None.

    A name only stands for an encoding when it provably means the same ids: an encoding merely *called*
    "gpt2" but built from other ranks must be saved (and keyed) by its contents, never by that name.
    """
    if enc.name not in tiktoken.list_encoding_names():
        return None
    try:
        named = tiktoken.get_encoding(enc.name)  # cached by tiktoken: the same object on every call
    except Exception:  # noqa: BLE001 - its files are unavailable: the name cannot be checked, so not trusted
        return None
    return enc.name if named is enc or encoding_sha256(named) == encoding_sha256(enc) else None


def encoding_sha256(enc: tiktoken.Encoding) -> str:
    """A hash of everything that decides an encoding's ids: its split pattern, ranks and special tokens."""
    contents = {
        "pattern": enc._pat_str,
        "ranks": _ranks_to_text(enc._mergeable_ranks),
        "special_tokens": enc._special_tokens,
    }
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()


def tokenizer_to_spec(enc: tiktoken.Encoding) -> dict:
    """A checkpoint-safe description of ``enc``: only str/int/dict values."""
    if tiktoken_name(enc) is not None:
        return {"kind": "tiktoken", "name": enc.name}
    # tiktoken has no public accessor for the pattern and ranks; these attributes are stable across versions.
    return {
        "kind": "bpe",
        "name": enc.name,
        "pattern": enc._pat_str,
        "ranks": _ranks_to_text(enc._mergeable_ranks),
        "special_tokens": {EOT: enc.eot_token},
    }


def tokenizer_from_spec(spec: dict) -> tiktoken.Encoding:
    """Rebuild the encoding described by ``tokenizer_to_spec``."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("tiktoken", "bpe"):
        raise GptMiniError(
            f"invalid tokenizer spec (kind={spec.get('kind') if isinstance(spec, dict) else spec!r}); "
            "expected a dict with kind 'tiktoken' or 'bpe', as written by tokenizer_to_spec"
        )
    if spec["kind"] == "tiktoken":
        if not isinstance(spec.get("name"), str):
            raise GptMiniError("invalid tokenizer spec: kind 'tiktoken' needs a 'name' string")
        return load_encoding(spec["name"])
    missing = [key for key in ("name", "pattern", "ranks", "special_tokens") if key not in spec]
    if missing:
        raise GptMiniError(f"invalid tokenizer spec: kind 'bpe' is missing {', '.join(missing)}")
    try:
        ranks = _ranks_from_text(spec["ranks"])
        enc = tiktoken.Encoding(
            spec["name"],
            pat_str=spec["pattern"],
            mergeable_ranks=ranks,
            special_tokens=dict(spec["special_tokens"]),
        )
    except Exception as exc:  # noqa: BLE001 - any parse failure means the spec is corrupt
        raise GptMiniError(f"invalid tokenizer spec: could not rebuild the BPE ({exc})") from None
    if EOT not in enc.special_tokens_set:
        raise GptMiniError(f"invalid tokenizer spec: special_tokens has no {EOT}")
    return enc
