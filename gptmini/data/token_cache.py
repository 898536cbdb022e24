"""Token caches: which cache a run uses (``prepare_cache``), and opening one checked (``open_cache``).

``prepare_cache`` turns the configured corpus into a source of documents for the one writer
(``gptmini.data.shards``: split, key, lock, resumable shards, ``meta.json``); ``open_cache`` checks a cache
folder and opens its token files, and ``TokenStream`` reads a split's shards as one sequence. Imports
``gptmini.data.corpus``, ``.tokenizer``, ``.shards``, ``.chat_cache`` (``data=chat``) and (for ``data=hf``)
``.hf_source`` only; must not import the DataModule, ``gptmini.model``, ``gptmini.training`` or
``gptmini.generation``. docs/data.md describes the folder.

Checked on open: ``meta.json``, the dtype, the file sizes, the tokenizer, and that ids are below the
vocabulary size: every id of a split up to ``ID_CHECK_ALL`` tokens (a chunked max over the memmaps: a few ms
for the 12 MB standard library), the head of each shard of a larger one (reading every id of 20 GB on every
open, and on every rank, would cost minutes; a garbage shard shows at its head). A damaged cache, or one of
another version, is a one-line error naming the folder and the fix, not a crash in the middle of training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import tiktoken

from gptmini.common import GptMiniError, as_config
from gptmini.data import shards
from gptmini.data.chat_cache import check_chat_files, prepare_chat_cache
from gptmini.data.corpus import DataConfig, cache_root, resolve_corpus
from gptmini.data.shards import SPLITS, shard_name, write_cache
from gptmini.data.tokenizer import EOT, TokenizerConfig, load_bpe, load_encoding, tokenizer_to_spec

TOKEN_DTYPES = ("uint16", "uint32")
# Tokens per step of the out-of-range check on open: a few MB at a time, whatever the split's size.
ID_CHECK_CHUNK = 2**22
# A split up to this many tokens has every id checked on open; a larger one the head of each shard.
ID_CHECK_ALL = 2**24
SHARD_ID_CHECK = 2**16

# ------------------------------------------------------------------------------------------------------------
# Building a cache


def _check_encoding(encoding: tiktoken.Encoding) -> None:
    if not isinstance(encoding, tiktoken.Encoding):
        raise GptMiniError(f"encoding must be a tiktoken.Encoding, not {type(encoding).__name__}")
    if EOT not in encoding.special_tokens_set:
        raise GptMiniError(f"the tokenizer {encoding.name!r} has no {EOT} token to separate documents")
    if tokenizer_to_spec(encoding)["kind"] == "bpe" and encoding.eot_token != encoding.n_vocab - 1:
        raise GptMiniError(f"the BPE tokenizer {encoding.name!r} must have {EOT} as its last id")


def prepare_cache(
    data: DataConfig, tokenizer: TokenizerConfig, encoding: tiktoken.Encoding | None = None
) -> Path:
    """Tokenize the corpus ``data`` unless a cache of the same contents and settings exists; return its
    folder.

    ``tokenizer``: a BPE is trained on the training split, a named one loaded; or ``encoding`` is used exactly
    instead (e.g. a checkpoint's, to fine-tune on new text), and no BPE is trained. Raises GptMiniError for a
    bad corpus or an unwritable or full cache directory; KeyboardInterrupt propagates. Either way no partial
    cache is left behind (an interrupted build resumes next time).
    """
    data = as_config(data, DataConfig, "data")
    tokenizer = as_config(tokenizer, TokenizerConfig, "tokenizer")
    if encoding is not None:
        _check_encoding(encoding)
    if data.name == "chat":  # conversations: rendered with their template, split by record
        return prepare_chat_cache(data, tokenizer, encoding, cache_root(data))
    return write_cache(_source(data), data, cache_root(data), tokenizer, encoding)


def _source(data: DataConfig):
    """The configured corpus as a source of documents for the writer."""
    if data.name == "hf":
        from gptmini.data.hf_source import HFSource  # imports datasets only when a source is opened

        return HFSource(data)
    corpus = resolve_corpus(data)
    if corpus.file_bytes == 0:
        raise GptMiniError(
            f"the corpus is empty (0 bytes): {corpus.description}; point data.path at files with text."
        )
    return corpus


# ------------------------------------------------------------------------------------------------------------
# Opening a cache


def _damaged(folder: Path, reason: str) -> GptMiniError:
    return GptMiniError(
        f"the token cache {folder} is damaged ({reason}); delete that folder and run again to rebuild it."
    )


def read_meta(folder: Path) -> dict:
    """The meta.json of a cache folder, after checking its version, counts, dtype and shard files' sizes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GptMiniError(f"there is no token cache at {folder}; prepare_cache(data, tokenizer) makes one.")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _damaged(folder, f"meta.json is unreadable: {type(exc).__name__}") from None
    if not isinstance(meta, dict):
        raise _damaged(folder, "meta.json holds no object")
    if meta.get("version") != shards.CACHE_VERSION:
        raise GptMiniError(
            f"the token cache {folder} was written by another gptmini (cache version "
            f"{meta.get('version')!r}, this one reads {shards.CACHE_VERSION}); "
            "delete that folder and run again to rebuild it."
        )
    counts = [f"{split}_{what}" for split in SPLITS for what in ("tokens", "bytes")]
    for key in (*counts, "vocab_size", "eot_id"):
        if not isinstance(meta.get(key), int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise _damaged(folder, f"meta.json has no valid {key}")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise _damaged(
            folder, f"meta.json says dtype {meta.get('dtype')!r}, not one of {', '.join(TOKEN_DTYPES)}"
        )
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") not in ("bpe", "tiktoken"):
        raise _damaged(folder, "meta.json does not say which tokenizer made it")
    for split in SPLITS:
        lengths = (meta.get("shards") or {}).get(split) if isinstance(meta.get("shards"), dict) else None
        if not isinstance(lengths, list) or not all(isinstance(n, int) and n > 0 for n in lengths):
            raise _damaged(folder, f"meta.json has no valid shard lengths for {split}")
        if sum(lengths) != meta[f"{split}_tokens"]:
            said = meta[f"{split}_tokens"]
            raise _damaged(folder, f"the {split} shards hold {sum(lengths)} tokens, meta.json says {said}")
        for index, length in enumerate(lengths):
            path = folder / shard_name(split, index)
            try:
                size = path.stat().st_size
            except OSError:
                raise _damaged(folder, f"{path.name} is missing") from None
            if size != length * np.dtype(meta["dtype"]).itemsize:
                raise _damaged(folder, f"{path.name} has {size} bytes, meta.json says {length} tokens")
    if meta.get("kind") == "chat":
        problem = check_chat_files(folder, meta)
        if problem:
            raise _damaged(folder, problem)
    return meta


def load_cached_tokenizer(folder: Path, meta: dict | None = None) -> tiktoken.Encoding:
    """The tokenizer a cache folder was built with."""
    folder = Path(folder)
    meta = meta or read_meta(folder)
    info = meta["tokenizer"]
    if info["kind"] == "bpe":
        try:
            return load_bpe(folder / str(info.get("file")))
        except GptMiniError as exc:
            raise _damaged(folder, str(exc)) from None
    if info.get("name") not in tiktoken.list_encoding_names():
        raise _damaged(folder, f"meta.json names an unknown tokenizer {info.get('name')!r}")
    return load_encoding(info["name"])  # its own errors (e.g. offline) are not damage


class TokenStream:
    """Token files (one path or several, e.g. a split's shards) read as one sequence: ``len``, slices and
    ``gather`` of windows.

    Each file is memory-mapped on first use (so a pickled stream carries only paths: loader workers open their
    own memmaps instead of copying the token files), and a slice that crosses from one file into the next is
    joined: the files are consecutive pieces of one token stream.
    """

    def __init__(self, paths: Path | list[Path], dtype: str):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self.dtype = dtype
        lengths = [p.stat().st_size // np.dtype(dtype).itemsize for p in self.paths]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part(self, i: int) -> np.ndarray:
        """File ``i``'s tokens, memory-mapped (an empty file is an empty array: mmap rejects empty files)."""
        if i not in self._maps:
            empty = self.offsets[i] == self.offsets[i + 1]
            self._maps[i] = (
                np.empty(0, self.dtype) if empty else np.memmap(self.paths[i], self.dtype, mode="r")
            )
        return self._maps[i]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the whole stream, as an array; like a slice, the range is cut at the
        end of the stream, and an empty range gives an empty array."""
        stop = min(stop, len(self))
        if start >= stop:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            begin = start - int(self.offsets[first])
            end = min(stop, int(self.offsets[first + 1])) - int(self.offsets[first])
            pieces.append(self.part(first)[begin:end])
            start += end - begin
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a TokenStream takes contiguous slices only")
        start, stop, _ = index.indices(len(self))
        return self.read(start, max(start, stop))

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Windows of ``length`` tokens at ``starts``: a (len(starts), length) array."""
        if len(self.paths) == 1:  # one file: a single fancy index, as the DataModule always did
            return self.part(0)[starts[:, None] + np.arange(length)]
        return np.stack([self.read(int(s), int(s) + length) for s in starts])


def _largest_id(tokens: np.ndarray) -> int:
    """The largest id in a token file, read a chunk at a time so memory stays flat."""
    largest = -1
    for start in range(0, len(tokens), ID_CHECK_CHUNK):
        largest = max(largest, int(tokens[start : start + ID_CHECK_CHUNK].max()))
    return largest


@dataclass
class TokenCache:
    """An opened, checked token cache: its folder, meta.json, tokenizer and token files."""

    folder: Path
    meta: dict
    tokenizer: tiktoken.Encoding

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (n_vocab): every token id is below it."""
        return self.tokenizer.n_vocab

    @cached_property
    def tokenizer_spec(self) -> dict:
        """The tokenizer as plain values, for checkpoints (see ``tokenizer_to_spec``)."""
        return tokenizer_to_spec(self.tokenizer)

    def token_files(self, split: str) -> list[Path]:
        """A split's shard files, in order (none for an empty split)."""
        if split not in SPLITS:
            raise GptMiniError(f"split={split!r} must be 'train' or 'val'")
        return [self.folder / shard_name(split, i) for i in range(len(self.meta["shards"][split]))]

    def stream(self, split: str) -> TokenStream:
        """A split's tokens as one ``TokenStream`` (``[:]`` of a one-shard split is a memmap, not a copy)."""
        return TokenStream(self.token_files(split), self.meta["dtype"])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per token of a split (NaN when empty): bits/byte = loss / ln 2 / bytes_per_token."""
        self.token_files(split)  # checks the name
        tokens = self.meta[f"{split}_tokens"]
        return self.meta[f"{split}_bytes"] / tokens if tokens else math.nan


def open_cache(folder: Path) -> TokenCache:
    """Open a cache folder made by ``prepare_cache``, after checking everything a run relies on.

    A damaged cache (unreadable or inconsistent meta.json, a nonsense dtype, token files of the wrong size, a
    garbage tokenizer file, ids the tokenizer does not have) is a one-line GptMiniError that names the folder
    and the fix: delete it, and the next run rebuilds it.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    tokenizer = load_cached_tokenizer(folder, meta)
    if (tokenizer.n_vocab, tokenizer.eot_token) != (meta["vocab_size"], meta["eot_id"]):
        raise _damaged(
            folder,
            f"its tokenizer has {tokenizer.n_vocab} ids and {EOT} {tokenizer.eot_token}, meta.json says "
            f"{meta['vocab_size']} and {meta['eot_id']}",
        )
    if np.iinfo(meta["dtype"]).max < tokenizer.n_vocab - 1:
        raise _damaged(folder, f"dtype {meta['dtype']} cannot hold {tokenizer.n_vocab} ids")
    cache = TokenCache(folder, meta, tokenizer)
    for split in SPLITS:
        head = None if meta[f"{split}_tokens"] <= ID_CHECK_ALL else SHARD_ID_CHECK  # see the module docstring
        stream = cache.stream(split)
        for i, path in enumerate(stream.paths):
            largest = _largest_id(stream.part(i)[:head])
            if largest >= tokenizer.n_vocab:
                raise _damaged(
                    folder, f"{path.name} holds token id {largest}, the tokenizer has {tokenizer.n_vocab}"
                )
    return cache
