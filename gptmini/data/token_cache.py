"""Token caches: tokenize a corpus once into a cache folder, and open one checked.

One concern: the cache on disk, that is its key, the lock, building it atomically, ``meta.json`` and opening
the token files. Imports ``gptmini.data.corpus``, ``.tokenizer``, ``.encode``, ``.cache_files`` and (for
``data=hf``) ``.shards`` only; must not import the DataModule, ``gptmini.model``, ``gptmini.training`` or
``gptmini.generation``.

A cache is a folder ``<cache_dir>/<corpus>/<tokenizer id>/<key>/`` holding ``train.bin`` and ``val.bin``
(see ``gptmini.data.encode``), ``meta.json`` (counts, dtype, tokenizer, source fingerprint) and, for a BPE,
its vocabulary in tiktoken's text format. ``data=hf`` caches are *sharded* instead (``meta["layout"] ==
"shards"``): ``train_000000.bin``, ``train_000001.bin``, ... built and resumed by ``gptmini.data.shards``
(docs/data.md). Both open as a ``TokenCache``; ``TokenStream`` reads a split's files as one sequence.

Decisions worth knowing:

- **Cache key.** ``key`` hashes the corpus contents (in order), the tokenizer (its settings, or the full spec
  of an encoding passed in, e.g. a checkpoint's), ``val_fraction``, the BPE sample size and
  ``CACHE_VERSION``, so any change gives a new folder and nothing stale is reused. A cache of another version
  is never opened, just rebuilt beside it; delete old folders to reclaim space.
- **Atomic.** A folder appears only complete. One process builds it as ``.<key>.tmp`` while holding
  ``<key>.lock`` (the others wait, then find it), every file fsynced, and renames it. An error, a full disk or
  Ctrl-C removes the temporary folder; one left by ``kill -9`` is removed by the next ``prepare_cache`` in
  that folder, once its lock is free.
- **Checked on open.** ``open_cache`` checks ``meta.json``, the dtype, the file sizes, the tokenizer and that
  every id is below the vocabulary size (a chunked max over the memmaps: a few ms for the 12 MB standard
  library), so a damaged cache is a one-line error naming the folder, not a crash in the middle of training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import tiktoken
from filelock import FileLock, Timeout

from gptmini.common import (
    GptMiniError,
    as_config,
    atomic_write_text,
    remove_stale_temp_files,
)
from gptmini.data.cache_files import (
    CACHE_VERSION,
    cannot_write,
    save_tokenizer,
    tokenizer_folder,
    tokenizer_key,
)
from gptmini.data.corpus import Corpus, DataConfig, cache_root, fingerprint, resolve_corpus, split_offset
from gptmini.data.encode import BPE_SAMPLE_BYTES, SPLITS, bpe_sample, encode_corpus
from gptmini.data.tokenizer import (
    EOT,
    TokenizerConfig,
    load_bpe,
    load_encoding,
    tokenizer_to_spec,
    train_bpe,
)

log = logging.getLogger(__name__)
TOKEN_DTYPES = ("uint16", "uint32")
# Tokens per step of the out-of-range check on open: a few MB at a time, whatever the split's size.
ID_CHECK_CHUNK = 2**22
# Tokens at the head of each shard whose ids are checked when a sharded cache is opened.
SHARD_ID_CHECK = 2**16
MB = 1e6

# ------------------------------------------------------------------------------------------------------------
# Building a cache


def _check_encoding(encoding: tiktoken.Encoding) -> None:
    if not isinstance(encoding, tiktoken.Encoding):
        raise GptMiniError(f"encoding must be a tiktoken.Encoding, not {type(encoding).__name__}")
    if EOT not in encoding.special_tokens_set:
        raise GptMiniError(f"the tokenizer {encoding.name!r} has no {EOT} token to separate documents")
    if tokenizer_to_spec(encoding)["kind"] == "bpe" and encoding.eot_token != encoding.n_vocab - 1:
        raise GptMiniError(f"the BPE tokenizer {encoding.name!r} must have {EOT} as its last id")


def _cache_key(
    corpus: Corpus,
    source_fingerprint: str,
    tok: TokenizerConfig,
    val_fraction: float,
    encoding: tiktoken.Encoding | None = None,
) -> str:
    settings = {
        "version": CACHE_VERSION,
        "corpus": corpus.name,
        "fingerprint": source_fingerprint,
        "tokenizer": tokenizer_key(tok, encoding),
        "val_fraction": val_fraction,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _build_cache(
    folder: Path,
    corpus: Corpus,
    source_fingerprint: str,
    data: DataConfig,
    tok: TokenizerConfig,
    encoding: tiktoken.Encoding | None = None,
) -> None:
    """Train the tokenizer unless one is given, and tokenize the corpus into ``folder``."""
    started = time.perf_counter()
    if encoding is not None:
        enc = encoding
    elif tok.name == "bpe":
        # One line before and one after: rustbpe's own progress lines are silenced (see train_bpe).
        sample_mb = min(split_offset(corpus.files, data.val_fraction), BPE_SAMPLE_BYTES) / MB
        log.info("training a %d-token BPE on %.1f MB of %s", tok.vocab_size, sample_mb, corpus.description)
        enc = train_bpe(bpe_sample(corpus.files, data.val_fraction), tok.vocab_size, tok.pattern)
        log.info("trained the BPE in %.1f s", time.perf_counter() - started)
    else:
        enc = load_encoding(tok.name)
    tokenizer = save_tokenizer(enc, folder)
    total_mb = sum(path.stat().st_size for path in corpus.files) / MB
    log.info("tokenizing %.1f MB of %s with %s", total_mb, corpus.description, enc.name)
    tokenizing = time.perf_counter()
    counts = encode_corpus(folder, corpus.files, data.val_fraction, enc, f"tokenizing {corpus.name}")
    log.info(
        "tokenized into %d tokens in %.1f s",
        counts["train_tokens"] + counts["val_tokens"],
        time.perf_counter() - tokenizing,
    )
    if counts["invalid_utf8_bytes"]:
        warnings.warn(
            f"{corpus.description}: replaced {counts['invalid_utf8_bytes']} invalid UTF-8 byte(s) by U+FFFD",
            stacklevel=3,  # the caller of prepare_cache
        )
    meta = {
        "version": CACHE_VERSION,
        "corpus": corpus.name,
        "source": corpus.description,
        "fingerprint": source_fingerprint,
        "files": len(corpus.files),
        "val_fraction": data.val_fraction,
        "tokenizer_id": tokenizer_folder(tok, encoding),
        "tokenizer": tokenizer,
        "vocab_size": enc.n_vocab,
        "eot_id": enc.eot_token,
        **counts,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")  # written last: "complete"


def _remove_stale_builds(parent: Path) -> None:
    """Delete what builds killed with ``kill -9`` left in ``parent``: ``.<key>.tmp`` folders whose lock is
    free (a build in progress holds its lock) and the temporary files of atomic writes."""
    with contextlib.suppress(OSError):  # cleaning up must never stop a run (e.g. a read-only cache)
        remove_stale_temp_files(parent)
        for tmp in parent.glob(".*.tmp"):
            if not tmp.is_dir():
                continue
            try:
                with FileLock(str(parent / tmp.name[1:-4]) + ".lock", timeout=0):
                    shutil.rmtree(tmp, ignore_errors=True)
            except Timeout:
                pass  # another process is building it right now


def prepare_cache(
    data: DataConfig, tokenizer: TokenizerConfig, encoding: tiktoken.Encoding | None = None
) -> Path:
    """Tokenize the corpus unless a cache for the same contents and settings exists; return its folder.

    Args:
        data: the corpus (and where caches go).
        tokenizer: the tokenizer settings: a BPE is trained on the training split, a named one loaded.
        encoding: tokenize with exactly this tokenizer instead (e.g. the one a checkpoint carries, to
            fine-tune on new text); ``tokenizer`` is then ignored and no BPE is trained.

    Raises GptMiniError for a bad corpus or an unwritable or full cache directory; KeyboardInterrupt
    propagates. Either way no partial cache is left behind.
    """
    data = as_config(data, DataConfig, "data")
    tokenizer = as_config(tokenizer, TokenizerConfig, "tokenizer")
    if encoding is not None:
        _check_encoding(encoding)
    if data.name == "hf":  # a stream of documents, not files: built into shards, resumably
        from gptmini.data.shards import prepare_sharded_cache

        return prepare_sharded_cache(data, tokenizer, encoding)
    corpus = resolve_corpus(data)
    if sum(path.stat().st_size for path in corpus.files) == 0:
        raise GptMiniError(
            f"the corpus is empty (0 bytes): {corpus.description}; point data.path at files with text."
        )
    source_fingerprint = fingerprint(corpus.files)
    parent = cache_root(data) / corpus.name / tokenizer_folder(tokenizer, encoding)
    folder = parent / _cache_key(corpus, source_fingerprint, tokenizer, data.val_fraction, encoding)
    if parent.is_dir():
        _remove_stale_builds(parent)
    if (folder / "meta.json").is_file():
        return folder
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # One process builds; any other waits for the lock and then finds the finished folder.
        with FileLock(str(folder) + ".lock"):
            if (folder / "meta.json").is_file():
                return folder
            tmp = parent / f".{folder.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)  # left by a build that died while holding the lock
            tmp.mkdir()
            try:
                _build_cache(tmp, corpus, source_fingerprint, data, tokenizer, encoding)
                os.rename(tmp, folder)  # atomic: the folder appears complete or not at all
            except BaseException:  # an error, a full disk or Ctrl-C: leave nothing half-built
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:
        raise cannot_write(exc, cache_root(data)) from None
    return folder


# ------------------------------------------------------------------------------------------------------------
# Opening a cache


def _damaged(folder: Path, reason: str) -> GptMiniError:
    return GptMiniError(
        f"the token cache {folder} is damaged ({reason}); delete that folder and run again to rebuild it."
    )


def read_meta(folder: Path) -> dict:
    """The meta.json of a cache folder, after checking its version, dtype and token file sizes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GptMiniError(f"there is no token cache at {folder}; prepare_cache(data, tokenizer) makes one.")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _damaged(folder, f"meta.json is unreadable: {type(exc).__name__}") from None
    if not isinstance(meta, dict):
        raise _damaged(folder, "meta.json holds no object")
    if meta.get("version") != CACHE_VERSION:
        raise GptMiniError(
            f"the token cache {folder} was written by another gptmini (cache version "
            f"{meta.get('version')!r}, this one reads {CACHE_VERSION}); delete that folder and run again to "
            "rebuild it."
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
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        lengths = _shard_lengths(folder, meta, split)
        for path, length in zip(token_files(folder, meta, split), lengths, strict=True):
            try:
                size = path.stat().st_size
            except OSError:
                raise _damaged(folder, f"{path.name} is missing") from None
            if size != length * itemsize:
                raise _damaged(folder, f"{path.name} has {size} bytes, meta.json says {length} tokens")
    return meta


def _shard_lengths(folder: Path, meta: dict, split: str) -> list[int]:
    """The token count of each of a split's files, checked against the split's total."""
    if meta.get("layout") != "shards":
        return [meta[f"{split}_tokens"]]
    lengths = (meta.get("shards") or {}).get(split) if isinstance(meta.get("shards"), dict) else None
    if not isinstance(lengths, list) or not all(isinstance(n, int) and n > 0 for n in lengths):
        raise _damaged(folder, f"meta.json has no valid shard lengths for {split}")
    if sum(lengths) != meta[f"{split}_tokens"]:
        said = meta[f"{split}_tokens"]
        raise _damaged(folder, f"the {split} shards hold {sum(lengths)} tokens, meta.json says {said}")
    return lengths


def token_files(folder: Path, meta: dict, split: str) -> list[Path]:
    """A split's token files in order: ``<split>.bin``, or its shards for a sharded cache."""
    if meta.get("layout") != "shards":
        return [Path(folder) / f"{split}.bin"]
    from gptmini.data.shards import shard_name

    return [Path(folder) / shard_name(split, i) for i in range(len(meta["shards"][split]))]


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


def open_tokens(path: Path, dtype: str) -> np.ndarray:
    """Memory-map a token file (an empty split gives an empty array: mmap rejects empty files)."""
    if Path(path).stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenStream:
    """A split's token files read as one sequence: ``len``, slices and ``gather`` of windows.

    Each file is memory-mapped on first use (so a pickled stream carries only paths), and a slice that
    crosses from one file into the next is joined: the files are consecutive pieces of one token stream.
    """

    def __init__(self, paths: list[Path], lengths: list[int], dtype: str):
        self.paths, self.lengths, self.dtype = [Path(p) for p in paths], list(lengths), dtype
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def from_files(cls, paths: Path | list[Path], dtype: str) -> TokenStream:
        """A stream over ``paths`` (one path or several), their lengths read from the file sizes."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        itemsize = np.dtype(dtype).itemsize
        return cls(paths, [Path(p).stat().st_size // itemsize for p in paths], dtype)

    def __getstate__(self) -> dict:
        # Workers open their own memmaps; pickling them would copy the token files.
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part(self, i: int) -> np.ndarray:
        """File ``i``'s tokens, memory-mapped."""
        if i not in self._maps:
            self._maps[i] = open_tokens(self.paths[i], self.dtype)
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

    @property
    def sharded(self) -> bool:
        """Whether the splits are sharded (``data=hf``) rather than one file each."""
        return self.meta.get("layout") == "shards"

    def token_file(self, split: str) -> Path:
        """The path of a split's token file (``train.bin`` or ``val.bin``); sharded caches have several."""
        if split not in SPLITS:
            raise GptMiniError(f"split={split!r} must be 'train' or 'val'")
        if self.sharded:
            raise GptMiniError(f"{self.folder} is sharded: use token_files({split!r}) or stream({split!r})")
        return self.folder / f"{split}.bin"

    def token_files(self, split: str) -> list[Path]:
        """A split's token files, in order (one for an unsharded cache; none for an empty sharded split)."""
        if split not in SPLITS:
            raise GptMiniError(f"split={split!r} must be 'train' or 'val'")
        return token_files(self.folder, self.meta, split)

    def stream(self, split: str) -> TokenStream:
        """A split's tokens as one ``TokenStream``, whatever the layout."""
        files = self.token_files(split)
        return TokenStream(files, _shard_lengths(self.folder, self.meta, split), self.meta["dtype"])

    def tokens(self, split: str) -> np.ndarray | TokenStream:
        """A split's tokens: memory-mapped (an empty array for an empty split), or a ``TokenStream`` over
        the shards of a sharded cache."""
        if self.sharded:
            return self.stream(split)
        return open_tokens(self.token_file(split), self.meta["dtype"])

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
        for path in cache.token_files(split):
            tokens = open_tokens(path, meta["dtype"])
            # A sharded cache (billions of tokens) checks the head of each shard: reading every id of 20 GB
            # on every open (and on every rank) would cost minutes; a garbage shard shows at its head.
            largest = _largest_id(tokens[:SHARD_ID_CHECK] if cache.sharded else tokens)
            if largest >= tokenizer.n_vocab:
                raise _damaged(
                    folder, f"{path.name} holds token id {largest}, the tokenizer has {tokenizer.n_vocab}"
                )
    return cache
