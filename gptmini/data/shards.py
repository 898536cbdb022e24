"""The one token-cache writer: any source's documents into fixed-size shard files, resumably.

One concern: building a cache folder from a *source* (``gptmini.data.corpus.TextSource`` for text files,
the standard library and Tiny Shakespeare; ``gptmini.data.hf_source.HFSource`` for ``data=hf``): its key, the
tokenizer it stores, parallel encoding, shard files, the progress state that lets an interrupted build
resume, ``meta.json`` and the progress bar. ``gptmini.data.token_cache`` opens what this writes. Imports
``gptmini.common`` and ``gptmini.data.tokenizer`` only (a source is passed in); must not import
``gptmini.model``, ``gptmini.training`` or ``gptmini.generation``. docs/data.md describes the format on disk.

A source has ``folder`` (its caches' folder under the cache root), ``description``, ``fingerprint`` (what
identifies its documents, for the key), ``val_split`` ("bytes" or "documents", for messages),
``file_bytes``, ``empty_hint``, ``open()`` (called once, under the lock), ``documents()`` (the count when
known cheaply), ``invalid_utf8_bytes()`` and ``batches(start, batch_docs)``: lists of ``(split,
starts_document, text)`` items from item ``start`` on. The source decides which split an item belongs to;
the writer decides everything else.

Decisions worth knowing:

- **Documents.** Every document is preceded by the ``<|endoftext|>`` id (as llm.c and build-nanogpt do), so a
  window that crosses into a new document always sees the separator; text that contains the literal string
  is encoded as ordinary text. A document cut by the validation split gets no second separator, so Tiny
  Shakespeare's validation tokens are nanoGPT's. Items are encoded by a pool of threads calling tiktoken's
  ``encode_to_numpy`` (tiktoken releases the GIL); bench/prepare.py measured this faster here than
  ``encode_ordinary_batch`` or worker processes.
- **Shards.** Each split fills ``<split>_<index>.bin`` files of exactly ``data.shard_tokens`` ids (the last
  one shorter): a small corpus is a one-shard cache. Ids are uint16 when every id fits, else uint32. A
  shard is written as ``<name>.partial``, fsynced and renamed when full, so a ``.bin`` name only ever holds a
  whole shard. Train and validation shards are numbered independently.
- **Cache key.** ``cache_key`` hashes the source's fingerprint, the tokenizer (what it does, see
  ``_settings_for``), ``val_fraction``, ``max_tokens``, ``shard_tokens``, the BPE sample size and
  ``CACHE_VERSION``, so any change gives a new folder and nothing stale is reused.
- **Resume.** The build lives in ``.<key>.building/`` beside the final folder, under ``<key>.lock`` (other
  processes wait, then find the cache). After every finished shard (and at least every ``COMMIT_EVERY_S``),
  ``progress.json`` records, atomically, the next item to read and each split's finished shards and partial
  length. A build that was interrupted (Ctrl-C, ``kill -9``, a full disk, a lost connection) restarts from
  there: finished shards are kept, partial files are cut back to the recorded length, and reading skips the
  items already done. When every item is in, ``meta.json`` is written and the folder renamed to ``<key>/``:
  a cache folder only ever appears complete.
- **BPE sample.** A BPE is trained on the first ``BPE_SAMPLE_BYTES`` of training text (rustbpe takes ~3 s
  per 30 MB here; the vocabulary barely changes beyond that).
- **Memory** is bounded by the batches in flight (``2 × threads`` batches and their tokens), not by the
  corpus or the shard size: bench/data.py and bench/prepare.py measure the peak RSS.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from filelock import FileLock
from tqdm import tqdm  # installed with lightning

from gptmini.common import GptMiniError, atomic_write_text, describe_os_error, remove_stale_temp_files
from gptmini.data.tokenizer import (
    TokenizerConfig,
    load_bpe,
    load_encoding,
    save_bpe,
    tokenizer_id,
    tokenizer_to_spec,
    train_bpe,
)

log = logging.getLogger(__name__)

# Bump when the cache layout or contents change, so old caches are not reused. 4: one writer for every
# source (shards everywhere, <|endoftext|> before every document).
CACHE_VERSION = 4
SPLITS = ("train", "val")
PROGRESS_FILE = "progress.json"
# Upper bound on the text a BPE trains on (see the module docstring).
BPE_SAMPLE_BYTES = 32 * 2**20
# Documents per read batch of a document source (a few MB of web text): one encoding task per split per batch.
BATCH_DOCS = 512
# Commit progress at least this often, so a crash redoes at most this much work of a partial shard.
COMMIT_EVERY_S = 30.0
MB = 1e6


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train_000000.bin``."""
    return f"{split}_{index:06d}.bin"


def encode_threads() -> int:
    """Threads for tiktoken: the usable cores, at most 8 (beyond that reading the text is the limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def token_dtype(n_vocab: int) -> type:
    """The narrowest unsigned dtype that holds every id below ``n_vocab``."""
    return np.uint16 if n_vocab <= 65535 else np.uint32


# ------------------------------------------------------------------------------------------------------------
# The tokenizer a cache stores, and its part of the key


def _settings_for(
    tok: TokenizerConfig, encoding: tiktoken.Encoding | None
) -> tuple[TokenizerConfig, tiktoken.Encoding | None]:
    """The tokenizer as settings where settings say exactly what it does.

    A cache is keyed by what its tokenizer does, not by how the tokenizer was obtained: tiktoken's own "gpt2"
    (the tokenizer of every imported GPT-2, init_from=gpt2) is the tokenizer ``tokenizer=gpt2`` loads, so both
    share one cache and FineWeb is tokenized once. ``tiktoken_name`` checks the contents, not just the name.
    """
    if encoding is not None and tokenizer_to_spec(encoding)["kind"] == "tiktoken":
        return TokenizerConfig(name=encoding.name), None
    return tok, encoding


def tokenizer_folder(tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> str:
    """The path component naming a cache's tokenizer: its settings' id, or a given BPE's name."""
    tok, encoding = _settings_for(tok, encoding)
    if encoding is None:
        return tokenizer_id(tok)
    return re.sub(r"[^A-Za-z0-9._-]", "_", encoding.name) or "tokenizer"


def tokenizer_key(tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> dict:
    """The tokenizer's part of a cache key: what the tokenizer does (see ``_settings_for``). A named tiktoken
    encoding is its name; a BPE trained from settings is those settings (its vocabulary follows from them
    and the corpus, also in the key); any other given encoding is its full spec, ranks included."""
    tok, encoding = _settings_for(tok, encoding)
    if encoding is None:
        return {"id": tokenizer_id(tok), "bpe_sample_bytes": BPE_SAMPLE_BYTES if tok.name == "bpe" else None}
    spec = json.dumps(tokenizer_to_spec(encoding), sort_keys=True).encode()
    return {"spec_sha256": hashlib.sha256(spec).hexdigest()}


def save_tokenizer(enc: tiktoken.Encoding, folder: Path) -> dict:
    """Store ``enc`` in the cache folder; return what meta.json records to load it again."""
    if tokenizer_to_spec(enc)["kind"] == "tiktoken":
        return {"kind": "tiktoken", "name": enc.name}
    save_bpe(enc, folder / "tokenizer.tiktoken")
    return {"kind": "bpe", "name": enc.name, "file": "tokenizer.tiktoken"}


def cannot_write(error: OSError, root: Path) -> GptMiniError:
    """A cache that cannot be written: what happened, where, and the fix."""
    if error.errno == errno.ENOSPC:
        fix = "free some space there, or set data.cache_dir=/a/folder/on/a/disk/with/room"
    else:
        fix = "set data.cache_dir=/a/folder/you/can/write"
    return GptMiniError(f"{describe_os_error(error, f'the token cache under {root}')}; {fix}.")


# ------------------------------------------------------------------------------------------------------------
# Shard files of one split


class ShardWriter:
    """Appends one split's tokens to fixed-size shard files, resuming from a recorded state."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: type, state: dict | None = None):
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, np.dtype(dtype)
        state = state or {}
        self.lengths: list[int] = list(state.get("lengths", []))  # finished shards
        self.partial = int(state.get("partial_tokens", 0))  # tokens in the current .partial file
        self.tokens = int(state.get("tokens", 0))
        self.bytes = int(state.get("bytes", 0))
        self.documents = int(state.get("documents", 0))
        self.finished_since_commit = False
        self._reconcile()
        self._file = open(self._partial_path(), "r+b" if self._partial_path().exists() else "wb")  # noqa: SIM115
        self._file.seek(self.partial * self.dtype.itemsize)

    def _partial_path(self, index: int | None = None) -> Path:
        index = len(self.lengths) if index is None else index
        return self.folder / (shard_name(self.split, index) + ".partial")

    def _reconcile(self) -> None:
        """Bring the files back to the recorded state: a shard renamed after the last commit goes back to
        being the partial file, anything beyond is removed, and the partial file is cut to its length."""
        index = len(self.lengths)
        final, partial = self.folder / shard_name(self.split, index), self._partial_path()
        if final.exists():
            os.replace(final, partial)
        for path in self.folder.glob(f"{self.split}_*.bin*"):
            number = int(path.name[len(self.split) + 1 :].split(".")[0])
            if number > index or (number == index and path != partial):
                path.unlink()
        size = self.partial * self.dtype.itemsize
        if self.partial and (not partial.exists() or partial.stat().st_size < size):
            raise GptMiniError(
                f"the interrupted build in {self.folder} is inconsistent; delete that folder to start afresh."
            )
        if partial.exists():
            os.truncate(partial, size)

    def append(self, tokens: np.ndarray, nbytes: int, documents: int) -> None:
        """Write the ``tokens`` of ``documents`` documents (``nbytes`` of text), finishing full shards."""
        self.tokens += len(tokens)
        self.bytes += nbytes
        self.documents += documents
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            room = self.shard_tokens - self.partial
            tokens[:room].tofile(self._file)
            self.partial += min(room, len(tokens))
            tokens = tokens[room:]
            if self.partial == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial_path(), self.folder / shard_name(self.split, len(self.lengths)))
        self.lengths.append(self.partial)
        self.partial = 0
        self.finished_since_commit = True
        self._file = open(self._partial_path(), "wb")  # noqa: SIM115

    def sync(self) -> None:
        """Make the partial file durable up to ``partial`` tokens (before the state records it)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, finish: bool) -> None:
        """Close the partial file; with ``finish``, turn a non-empty one into the last (shorter) shard."""
        if finish and self.partial:
            self._finish_shard()
        self._file.close()
        if finish:
            self._partial_path().unlink(missing_ok=True)

    def state(self) -> dict:
        """What ``progress.json`` records of this split."""
        return {
            "lengths": self.lengths,
            "partial_tokens": self.partial,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


# ------------------------------------------------------------------------------------------------------------
# Encoding


def _encode_items(enc: tiktoken.Encoding, items: list[tuple[bool, str]]) -> tuple[np.ndarray, int]:
    """The tokens of ``(starts_document, text)`` items, ``<|endoftext|>`` before each document's first item
    (runs in a worker thread)."""
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts, nbytes = [], 0
    for starts_document, text in items:
        if starts_document:
            parts.append(eot)
        # No special tokens allowed or disallowed == encode_ordinary, without building a Python list.
        parts.append(enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()))
        nbytes += len(text.encode("utf-8"))
    return (np.concatenate(parts) if parts else np.empty(0, np.uint32)), nbytes


class Progress:
    """A tqdm bar in tokens with tokens/s and an ETA; the total is estimated as the build goes (see
    ``estimate``) unless ``data.max_tokens`` fixes it."""

    def __init__(self, desc: str, done: int, max_tokens: int | None, documents: int | None, file_bytes: int):
        self.max_tokens, self.documents, self.file_bytes = max_tokens, documents, file_bytes
        self.bar = tqdm(
            total=max_tokens, initial=done, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, delay=2
        )

    def update(self, tokens: int, done_tokens: int, done_docs: int, done_bytes: int) -> None:
        total = self.max_tokens or self.estimate(done_tokens, done_docs, done_bytes)
        if total and total != self.bar.total:
            self.bar.total = max(total, done_tokens)
        self.bar.update(tokens)

    def estimate(self, done_tokens: int, done_docs: int, done_bytes: int) -> int | None:
        """Total tokens, extrapolated from the known number of documents, or else from the local files'
        size (text bytes read against file bytes: jsonl's quoting makes it a slight overestimate)."""
        if self.documents and done_docs:
            return int(done_tokens / done_docs * self.documents)
        if self.file_bytes and done_bytes:
            return int(done_tokens / done_bytes * self.file_bytes)
        return None

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------------------
# The build


def _train_tokenizer(source, tok: TokenizerConfig) -> tiktoken.Encoding:
    """A BPE trained on the first BPE_SAMPLE_BYTES of the source's training text."""
    size = 0

    def sample():
        nonlocal size
        for batch in source.batches(0, BATCH_DOCS):
            for split, _, text in batch:
                if split == "train":
                    yield text
                    size += len(text)
            if size >= BPE_SAMPLE_BYTES:
                return

    started = time.perf_counter()
    # One line before and one after: rustbpe's own progress lines are silenced (see train_bpe).
    mb = BPE_SAMPLE_BYTES // 2**20
    log.info("training a %d-token BPE on up to %d MB of %s", tok.vocab_size, mb, source.description)
    enc = train_bpe(sample(), tok.vocab_size, tok.pattern)
    log.info("trained the BPE on %.1f MB in %.1f s", size / MB, time.perf_counter() - started)
    return enc


def _write_progress(folder: Path, next_doc: int, writers: dict[str, ShardWriter], extra: dict) -> None:
    for writer in writers.values():
        writer.sync()
        writer.finished_since_commit = False
    state = {"next_doc": next_doc, "splits": {s: w.state() for s, w in writers.items()}, **extra}
    atomic_write_text(folder / PROGRESS_FILE, json.dumps(state) + "\n")


def _read_progress(folder: Path, key: str) -> dict | None:
    try:
        state = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _tokenize(folder: Path, source, data, enc: tiktoken.Encoding, key: str, state: dict | None) -> dict:
    """Stream the source's items into shard files; return the per-split counts and shard lengths."""
    dtype = token_dtype(enc.n_vocab)
    splits = state["splits"] if state else {}
    next_doc = state["next_doc"] if state else 0
    extra = {"key": key}
    if next_doc:
        log.info("resuming the interrupted build in %s at document %d", folder, next_doc)
    threads = encode_threads()
    writers: dict[str, ShardWriter] = {}
    progress: Progress | None = None
    done = False
    last_commit = time.monotonic()
    in_flight: deque = deque()

    def write_oldest() -> None:
        nonlocal next_doc, done, last_commit
        batch_end, futures = in_flight.popleft()
        for split, future, documents in futures:
            tokens, nbytes = future.result()
            if done:
                continue
            total = sum(w.tokens for w in writers.values())
            if data.max_tokens is not None and total + len(tokens) >= data.max_tokens:
                kept = data.max_tokens - total
                nbytes = round(nbytes * kept / max(len(tokens), 1))  # bytes of the part kept, for bits/byte
                tokens, done = tokens[:kept], True
            writers[split].append(tokens, nbytes, documents)
            all_tokens = sum(w.tokens for w in writers.values())
            all_docs = sum(w.documents for w in writers.values())
            progress.update(len(tokens), all_tokens, all_docs, sum(w.bytes for w in writers.values()))
        next_doc = batch_end
        finished = any(w.finished_since_commit for w in writers.values())
        if not done and (finished or time.monotonic() - last_commit > COMMIT_EVERY_S):
            _write_progress(folder, next_doc, writers, extra)
            last_commit = time.monotonic()

    try:
        # Opened inside the try, so whatever fails from here on closes every file opened so far.
        for split in SPLITS:
            writers[split] = ShardWriter(folder, split, data.shard_tokens, dtype, splits.get(split))
        done_tokens = sum(w.tokens for w in writers.values())
        desc = f"tokenizing {source.folder}"
        progress = Progress(desc, done_tokens, data.max_tokens, source.documents(), source.file_bytes)
        with ThreadPoolExecutor(threads) as pool:
            first = next_doc
            for batch in source.batches(next_doc, BATCH_DOCS):
                futures = []
                for split in SPLITS:
                    items = [(starts, text) for s, starts, text in batch if s == split]
                    if items:
                        documents = sum(starts for starts, _ in items)
                        futures.append((split, pool.submit(_encode_items, enc, items), documents))
                first += len(batch)
                in_flight.append((first, futures))
                # A bounded number of batches in flight keeps memory flat while reading overlaps encoding.
                while len(in_flight) > 2 * threads:
                    write_oldest()
                if done:
                    break
            while in_flight:
                write_oldest()
    except BaseException:
        for writer in writers.values():
            writer.close(finish=False)  # the files stay for the resume; only the handles go
        raise
    finally:
        if progress is not None:
            progress.close()
    for writer in writers.values():
        writer.close(finish=True)
    counts = {}
    for split, writer in writers.items():
        counts.update({f"{split}_tokens": writer.tokens, f"{split}_bytes": writer.bytes})
        counts[f"{split}_documents"] = writer.documents
    counts["shards"] = {split: writer.lengths for split, writer in writers.items()}
    counts["dtype"] = np.dtype(dtype).name
    return counts


def _fsync_folder(folder: Path) -> None:
    """Make the folder's entries durable before it is renamed (not every system lets a folder be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)  # every build used to leak this descriptor


def _tokenizer_for(building: Path, source, tok: TokenizerConfig, encoding, resuming: bool):
    """The given encoding, the BPE an interrupted build already trained, a new BPE, or a named encoding."""
    if encoding is not None:
        return encoding
    if tok.name != "bpe":
        return load_encoding(tok.name)
    if resuming and (building / "tokenizer.tiktoken").is_file():
        return load_bpe(building / "tokenizer.tiktoken")
    return _train_tokenizer(source, tok)


def _build(parent: Path, key: str, source, data, tok: TokenizerConfig, encoding) -> Path:
    """Build (or resume building) the cache ``parent/key``; return its folder."""
    folder = parent / key
    building = parent / f".{key}.building"
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():
            return folder
        started = time.perf_counter()
        _say_why_older_caches_are_rebuilt(parent)
        source.open()
        state = _read_progress(building, key)
        if state is None:  # nothing to resume (or another key's leftovers): start afresh
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
        remove_stale_temp_files(building)  # atomic writes killed mid-way
        enc = _tokenizer_for(building, source, tok, encoding, state is not None)
        tokenizer = save_tokenizer(enc, building)
        if state is None:
            # The starting state, so even a build interrupted before its first shard keeps its tokenizer.
            atomic_write_text(building / PROGRESS_FILE, json.dumps({"key": key, "next_doc": 0, "splits": {}}))
        counts = _tokenize(building, source, data, enc, key, _read_progress(building, key))
        if source.empty_hint and counts["train_bytes"] == 0:
            raise GptMiniError(
                f"{source.description} gave no training text (0 bytes in {counts['train_documents']} "
                f"documents); {source.empty_hint}"
            )
        invalid = source.invalid_utf8_bytes()
        meta = {
            "version": CACHE_VERSION,
            "corpus": source.folder,
            "source": source.description,
            "fingerprint": source.fingerprint,
            "val_split": source.val_split,
            "val_fraction": data.val_fraction,
            "max_tokens": data.max_tokens,
            "shard_tokens": data.shard_tokens,
            "tokenizer_id": tokenizer_folder(tok, encoding),
            "tokenizer": tokenizer,
            "vocab_size": enc.n_vocab,
            "eot_id": enc.eot_token,
            **counts,
            "invalid_utf8_bytes": invalid,
            "seconds": round(time.perf_counter() - started, 3),
        }
        (building / PROGRESS_FILE).unlink(missing_ok=True)
        atomic_write_text(building / "meta.json", json.dumps(meta, indent=2) + "\n")
        _fsync_folder(building)
        os.rename(building, folder)  # atomic: the folder appears complete or not at all
        log.info(
            "tokenized %d documents into %d tokens in %.1f s",
            counts["train_documents"] + counts["val_documents"],
            counts["train_tokens"] + counts["val_tokens"],
            time.perf_counter() - started,
        )
    if invalid:
        warnings.warn(
            f"{source.description}: replaced {invalid} invalid UTF-8 byte(s) by U+FFFD", stacklevel=4
        )
    return folder


def _say_why_older_caches_are_rebuilt(parent: Path) -> None:
    """One line when caches of this source and tokenizer exist but were written in an older format."""
    older = []
    for meta in parent.glob("*/meta.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            version = json.loads(meta.read_text(encoding="utf-8")).get("version")
            if version != CACHE_VERSION:
                older.append(f"{meta.parent.name} (version {version})")
    if older:
        log.warning(
            "rebuilding the token cache: the cache(s) in %s were written in another format (%s; this gptmini "
            "writes version %d); delete them to reclaim the space",
            parent,
            ", ".join(older),
            CACHE_VERSION,
        )


def cache_key(source, data, tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> str:
    """The key of a cache: the source, split, cap, shard size, tokenizer and cache version."""
    settings = {
        "version": CACHE_VERSION,
        "source": source.fingerprint,
        "val_fraction": data.val_fraction,
        "max_tokens": data.max_tokens,
        "shard_tokens": data.shard_tokens,
        "tokenizer": tokenizer_key(tok, encoding),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_cache(source, data, root: Path, tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> Path:
    """A complete cache of ``source`` under ``root``: found, or built (resumed if interrupted)."""
    try:
        parent = root / source.folder / tokenizer_folder(tok, encoding)
        key = cache_key(source, data, tok, encoding)
        if parent.is_dir():
            with contextlib.suppress(OSError):  # cleaning up must never stop a run (e.g. a read-only cache)
                remove_stale_temp_files(parent)  # left by atomic writes killed mid-way
        if (parent / key / "meta.json").is_file():
            return parent / key
        parent.mkdir(parents=True, exist_ok=True)
        return _build(parent, key, source, data, tok, encoding)
    except OSError as exc:
        raise cannot_write(exc, root) from None
