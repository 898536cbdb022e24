"""The one token-cache writer: any source's documents into fixed-size shard files, resumably.

A *source* (``corpus.TextSource`` for text files, the standard library and Tiny Shakespeare;
``hf_source.HFSource`` for ``data=hf``) only reads: ``items(start)`` yields ``(starts_document, text)`` from
item ``start`` on, and it has ``folder``, ``description``, ``fingerprint`` (for the key), ``file_bytes``,
``empty_hint``, ``open()`` (called once, under the lock), ``documents()`` (a count when cheap) and
``invalid_utf8_bytes()``. This module decides the rest, once for every source: the validation split, the
separator, the key, the stored tokenizer, parallel encoding, shards, resume and ``meta.json`` (read by
``gptmini.data.token_cache``). Imports ``gptmini.common`` and ``gptmini.data.tokenizer`` only; docs/data.md
describes the format on disk and the reasons at length.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from filelock import FileLock
from tqdm import tqdm  # installed with lightning

from gptmini.common import GptMiniError, atomic_write_text, describe_os_error, remove_stale_temp_files, say
from gptmini.data.tokenizer import (
    TokenizerConfig,
    load_bpe,
    load_encoding,
    save_bpe,
    tokenizer_id,
    tokenizer_to_spec,
    train_bpe,
)

# Bump when the cache layout or contents change, so old caches are not reused (the writer says so once).
# 4: one writer for every source, <|endoftext|> before every document. 5: one validation-split rule
# (the tail of every VAL_BLOCK_BYTES block) for every source; data=hf drew seeded random documents before.
CACHE_VERSION = 5
SPLITS = ("train", "val")
PROGRESS_FILE = "progress.json"
# The validation split, one rule for every source: the text is taken in blocks of VAL_BLOCK_BYTES UTF-8
# bytes (a block ends with the item that reaches that size; the last block is whatever remains), and the
# last val_fraction of each block's bytes is validation, cut at a character boundary. Why this rule: a
# stream (data=hf) does not know its length, so "the last val_fraction of the corpus" cannot be found
# while reading it, but the end of a block always can; and a corpus smaller than a block (Tiny
# Shakespeare, the standard library, most local text) is one block, so its validation text is its last
# val_fraction: nanoGPT's data[int(n * 0.9):], whose val loss the project compares against. Blocks also
# spread a big corpus's validation text over all of it. Only the undecided tail of a block is held back
# (at most val_fraction of it, plus one item), so memory stays flat.
VAL_BLOCK_BYTES = 2**25
# Upper bound on the text a BPE trains on (rustbpe takes ~3 s per 30 MB here; the vocabulary barely
# changes beyond that).
BPE_SAMPLE_BYTES = 32 * 2**20
# One encoding task per split per batch: up to BATCH_DOCS items or BATCH_CHARS characters of text.
BATCH_DOCS = 512
BATCH_CHARS = 2**20
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
# The validation split (the rule is at VAL_BLOCK_BYTES)


def split_items(
    items: Iterable[tuple[bool, str]], fraction: float, start: int = 0, block: int = 0
) -> Iterator:
    """``(split, starts_document, text, nbytes, resume)`` for a source's items from item ``start`` on, split
    by the rule at VAL_BLOCK_BYTES; ``block`` is the bytes of the current block before item ``start``.

    ``resume`` is ``(next item, block bytes before it)`` once every earlier item is out (where an interrupted
    build restarts), else None. A document cut by the split gets no second separator, so Tiny Shakespeare's
    validation tokens are nanoGPT's.
    """
    held: deque = deque()  # (index, starts_document, text, nbytes) of the block, not yet known to be train
    base = seen = block  # the block's bytes given out, and read

    def close(cut: int) -> Iterator:
        """The block is complete: every held item, as training text up to byte ``cut`` of the block and
        validation text after it, the item across the cut divided at a character boundary."""
        nonlocal base, seen
        while held:
            index, starts, text, nbytes = held.popleft()
            if base < cut < base + nbytes:  # across the cut
                data, at = text.encode(), cut - base
                while at < nbytes and 0x80 <= data[at] < 0xC0:  # never inside a character
                    at += 1
                parts = [
                    ("train", starts, data[:at].decode(), at),
                    ("val", False, data[at:].decode(), nbytes - at),
                ]
                parts = parts[: 1 if at == nbytes else 2]
            else:
                parts = [("train" if base + nbytes <= cut else "val", starts, text, nbytes)]
            base += nbytes
            resume = (index + 1, base if held else 0)
            for n, (split, first, piece, size) in enumerate(parts, start=1):
                yield split, first, piece, size, resume if n == len(parts) else None
        base = seen = 0

    index = start
    for starts, text in items:
        nbytes = len(text) if text.isascii() else len(text.encode())
        held.append((index, starts, text, nbytes))
        index, seen = index + 1, seen + nbytes
        if seen >= VAL_BLOCK_BYTES:
            yield from close(int(seen * (1 - fraction)))
            continue
        cut = seen * (1 - fraction)  # the block ends here or later, so its cut is here or later:
        while held and base + held[0][3] <= cut:  # what ends before it is training text already
            done, first, piece, size = held.popleft()
            base += size
            yield "train", first, piece, size, (done + 1, base)
    yield from close(int(seen * (1 - fraction)))


def _batches(items: Iterator) -> Iterator[list]:
    """Split items in batches of up to BATCH_DOCS items or BATCH_CHARS characters, each ending at a resume
    point (one encoding task per split per batch)."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[2])
        if (len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS) and item[4] is not None:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------------------------
# The tokenizer a cache stores, and the key


def tokenizer_identity(tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> tuple[str, dict]:
    """The folder naming a cache's tokenizer, and the tokenizer's part of the key: what it does, not how it
    was obtained. tiktoken's own "gpt2" (the tokenizer every imported GPT-2 carries, init_from=gpt2) is what
    ``tokenizer=gpt2`` loads, so both share one cache (``tokenizer_to_spec`` checks contents, not just the
    name). A BPE trained from settings is keyed by them (its vocabulary follows from them and the corpus,
    also in the key); any other given encoding by its full spec, ranks included."""
    spec = None if encoding is None else tokenizer_to_spec(encoding)
    if spec is not None and spec["kind"] == "tiktoken":
        tok, spec = TokenizerConfig(name=encoding.name), None
    if spec is None:
        sample = BPE_SAMPLE_BYTES if tok.name == "bpe" else None
        return tokenizer_id(tok), {"id": tokenizer_id(tok), "bpe_sample_bytes": sample}
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", encoding.name) or "tokenizer"
    return folder, {"spec_sha256": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()}


def _settings(source, data) -> dict:
    """What decides a cache's contents besides its tokenizer (its key holds them, and so does meta.json)."""
    keys = ("val_fraction", "max_tokens", "shard_tokens")
    return {
        "version": CACHE_VERSION,
        "fingerprint": source.fingerprint,
        **{k: getattr(data, k) for k in keys},
    }


def cache_key(source, data, tokenizer_key: dict) -> str:
    """The key of a cache: the source's contents, split, cap, shard size, cache version and tokenizer."""
    return key_of({**_settings(source, data), "tokenizer": tokenizer_key})


def key_of(settings: dict) -> str:
    """A cache folder's name: a short hash of everything that decides its contents (any cache kind)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_for(building: Path, source, data, tok: TokenizerConfig, encoding) -> tiktoken.Encoding:
    """The given encoding, a named one, the BPE an interrupted build already trained, or a new BPE trained on
    the first BPE_SAMPLE_BYTES of the training text."""
    if encoding is not None:
        return encoding
    if tok.name != "bpe":
        return load_encoding(tok.name)
    if (building / "tokenizer.tiktoken").is_file():
        return load_bpe(building / "tokenizer.tiktoken")
    return _train_tokenizer(source, data, tok)


def _train_tokenizer(source, data, tok: TokenizerConfig) -> tiktoken.Encoding:
    size = 0

    def sample() -> Iterator[str]:
        nonlocal size
        for split, _, text, _, _ in split_items(source.items(0), data.val_fraction):
            if size >= BPE_SAMPLE_BYTES:
                return
            if split == "train":
                size += len(text)
                yield text

    started = time.perf_counter()
    # One line before and one after: rustbpe's own progress lines are silenced (see train_bpe).
    mb = BPE_SAMPLE_BYTES // 2**20
    say(f"training a {tok.vocab_size}-token BPE on up to {mb} MB of {source.description}")
    enc = train_bpe(sample(), tok.vocab_size, tok.pattern)
    say(f"trained the BPE on {size / MB:.1f} MB in {time.perf_counter() - started:.1f} s")
    return enc


def save_tokenizer(enc: tiktoken.Encoding, folder: Path) -> dict:
    """Store ``enc`` in the cache folder; return what meta.json records to load it again."""
    if tokenizer_to_spec(enc)["kind"] == "tiktoken":
        return {"kind": "tiktoken", "name": enc.name}
    save_bpe(enc, folder / "tokenizer.tiktoken")
    return {"kind": "bpe", "name": enc.name, "file": "tokenizer.tiktoken"}


# ------------------------------------------------------------------------------------------------------------
# Shard files of one split


class ShardWriter:
    """Appends one split's tokens to fixed-size shard files, resuming from a recorded state."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: type, state: dict | None = None):
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, np.dtype(dtype)
        state = state or {}
        self.lengths: list[int] = list(state.get("lengths", []))  # finished shards
        self.partial = int(state.get("partial_tokens", 0))  # tokens in the current .partial file
        self.tokens, self.bytes = int(state.get("tokens", 0)), int(state.get("bytes", 0))
        self.documents = int(state.get("documents", 0))
        self.finished_since_commit = False
        self._reconcile()
        self._file = open(self._partial_path(), "r+b" if self._partial_path().exists() else "wb")  # noqa: SIM115
        self._file.seek(self.partial * self.dtype.itemsize)

    def _partial_path(self) -> Path:
        return self.folder / (shard_name(self.split, len(self.lengths)) + ".partial")

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
        self.sync()
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
        keys = ("lengths", "partial_tokens", "tokens", "bytes", "documents")
        return dict(
            zip(keys, (self.lengths, self.partial, self.tokens, self.bytes, self.documents), strict=True)
        )


# ------------------------------------------------------------------------------------------------------------
# The build


def _encode(enc: tiktoken.Encoding, items: list[tuple[bool, str]]) -> np.ndarray:
    """The tokens of ``(starts_document, text)`` items, ``<|endoftext|>`` before each document (runs in a
    worker thread: tiktoken releases the GIL, and bench/prepare.py measured a pool of threads calling
    ``encode_to_numpy`` faster here than ``encode_ordinary_batch`` or worker processes)."""
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts = []
    for starts_document, text in items:
        if starts_document:
            parts.append(eot)
        # No special tokens allowed or disallowed == encode_ordinary, without building a Python list.
        parts.append(enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()))
    return np.concatenate(parts) if parts else np.empty(0, np.uint32)


def _estimate(known_documents: int | None, file_bytes: int, writers: dict[str, ShardWriter]) -> int | None:
    """The build's total tokens, extrapolated from the documents the source says it has, or else from its
    local files' size (text bytes read against file bytes: jsonl's quoting makes it a slight overestimate)."""
    done, documents, nbytes = (
        sum(getattr(w, k) for w in writers.values()) for k in ("tokens", "documents", "bytes")
    )
    if known_documents and documents:
        return int(done / documents * known_documents)
    return int(done / nbytes * file_bytes) if file_bytes and nbytes else None


def _write_progress(folder: Path, resume: tuple[int, int], writers: dict[str, ShardWriter], key: str) -> None:
    for writer in writers.values():
        writer.sync()
        writer.finished_since_commit = False
    splits = {split: writer.state() for split, writer in writers.items()}
    state = {"key": key, "next_doc": resume[0], "block_bytes": resume[1], "splits": splits}
    atomic_write_text(folder / PROGRESS_FILE, json.dumps(state) + "\n")


def _read_progress(folder: Path, key: str) -> dict | None:
    try:
        state = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _tokenize(folder: Path, source, data, enc: tiktoken.Encoding, state: dict) -> dict:
    """Stream the source's items, split, into shard files; return the per-split counts and shard lengths."""
    resume = (state["next_doc"], state.get("block_bytes", 0))
    if resume[0]:
        say(f"resuming the interrupted build in {folder} at document {resume[0]}")
    threads, known_documents = encode_threads(), source.documents()
    # The tokens each split may keep: data.max_tokens shared in the proportion data.val_fraction.
    share = None if data.max_tokens is None else round(data.max_tokens * data.val_fraction)
    caps = dict.fromkeys(SPLITS) if share is None else {"train": data.max_tokens - share, "val": share}
    writers: dict[str, ShardWriter] = {}
    progress = None  # a tqdm bar in tokens with tokens/s and an ETA
    last_commit = time.monotonic()
    in_flight: deque = deque()  # (resume point, [(split, future, nbytes, documents)]) in reading order

    def full(split: str) -> bool:
        return caps[split] is not None and writers[split].tokens >= caps[split]

    def write_oldest() -> None:
        nonlocal last_commit
        batch_resume, futures = in_flight.popleft()
        for split, future, nbytes, documents in futures:
            tokens = future.result()
            if full(split):  # submitted before its share of data.max_tokens was complete
                continue
            room = len(tokens) if caps[split] is None else caps[split] - writers[split].tokens
            if room < len(tokens):  # data.max_tokens: keep exactly the split's share
                nbytes = round(nbytes * room / len(tokens))  # bytes of the part kept, for bits/byte
                tokens = tokens[:room]
            writers[split].append(tokens, nbytes, documents)
            total = data.max_tokens or _estimate(known_documents, source.file_bytes, writers)
            if total and total != progress.total:
                progress.total = max(total, sum(w.tokens for w in writers.values()))
            progress.update(len(tokens))
        finished = any(w.finished_since_commit for w in writers.values())
        if finished or time.monotonic() - last_commit > COMMIT_EVERY_S:
            _write_progress(folder, batch_resume, writers, state["key"])
            last_commit = time.monotonic()

    try:
        # Opened inside the try, so whatever fails from here on closes every file opened so far.
        for split in SPLITS:
            writers[split] = ShardWriter(
                folder, split, data.shard_tokens, token_dtype(enc.n_vocab), state["splits"].get(split)
            )
        done = sum(w.tokens for w in writers.values())
        desc = f"tokenizing {source.folder}"
        progress = tqdm(total=data.max_tokens, initial=done, desc=desc, unit="tok", unit_scale=True, delay=2)
        with ThreadPoolExecutor(threads) as pool:
            for batch in _batches(split_items(source.items(resume[0]), data.val_fraction, *resume)):
                futures = []
                for split in SPLITS:
                    mine = [item for item in batch if item[0] == split]
                    if mine and not full(split):
                        nbytes, documents = sum(item[3] for item in mine), sum(item[1] for item in mine)
                        task = pool.submit(_encode, enc, [(item[1], item[2]) for item in mine])
                        futures.append((split, task, nbytes, documents))
                in_flight.append((batch[-1][4], futures))
                # A bounded number of batches in flight keeps memory flat while reading overlaps encoding.
                while len(in_flight) > 2 * threads:
                    write_oldest()
                if all(full(split) for split in SPLITS):
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
    counts: dict = {"shards": {}, "dtype": np.dtype(token_dtype(enc.n_vocab)).name}
    for split, writer in writers.items():
        writer.close(finish=True)
        counts.update({f"{split}_tokens": writer.tokens, f"{split}_bytes": writer.bytes})
        counts[f"{split}_documents"] = writer.documents
        counts["shards"][split] = writer.lengths
    return counts


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries durable before it is renamed (not every system lets a folder be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _build(parent: Path, key: str, source, data, tok: TokenizerConfig, encoding) -> Path:
    """Build (or resume building) the cache ``parent/key`` under its lock; return its folder.

    The build lives in ``.<key>.building/`` and is renamed to ``<key>/`` when complete, so a cache folder only
    ever appears whole; other processes wait on ``<key>.lock``, then find it.
    """
    folder, building = parent / key, parent / f".{key}.building"
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
        enc = _tokenizer_for(building, source, data, tok, encoding)
        tokenizer = save_tokenizer(enc, building)
        if state is None:
            # The starting state, so even a build interrupted before its first shard keeps its tokenizer.
            state = {"key": key, "next_doc": 0, "splits": {}}
            atomic_write_text(building / PROGRESS_FILE, json.dumps(state))
        counts = _tokenize(building, source, data, enc, state)
        if source.empty_hint and counts["train_bytes"] == 0:
            raise GptMiniError(
                f"{source.description} gave no training text (0 bytes in {counts['train_documents']} "
                f"documents); {source.empty_hint}"
            )
        invalid = source.invalid_utf8_bytes()
        meta = {
            **_settings(source, data),
            "corpus": source.folder,
            "source": source.description,
            "tokenizer_id": parent.name,
            "tokenizer": tokenizer,
            "vocab_size": enc.n_vocab,
            "eot_id": enc.eot_token,
            **counts,
            "invalid_utf8_bytes": invalid,
            "seconds": round(time.perf_counter() - started, 3),
        }
        (building / PROGRESS_FILE).unlink(missing_ok=True)
        atomic_write_text(building / "meta.json", json.dumps(meta, indent=2) + "\n")
        fsync_folder(building)
        os.rename(building, folder)  # atomic: the folder appears complete or not at all
        documents, tokens = (counts[f"train_{n}"] + counts[f"val_{n}"] for n in ("documents", "tokens"))
        say(f"tokenized {documents} documents into {tokens} tokens in {time.perf_counter() - started:.1f} s")
    if invalid:
        say(f"{source.description}: replaced {invalid} invalid UTF-8 byte(s) by U+FFFD")
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
        say(
            f"rebuilding the token cache: the cache(s) in {parent} were written in another format "
            f"({', '.join(older)}; this gptmini writes version {CACHE_VERSION}); delete them to reclaim the "
            "space"
        )


def cannot_write(error: OSError, root: Path) -> GptMiniError:
    """A cache that cannot be written: what happened, where, and the fix."""
    if error.errno == errno.ENOSPC:
        fix = "free some space there, or set data.cache_dir=/a/folder/on/a/disk/with/room"
    else:
        fix = "set data.cache_dir=/a/folder/you/can/write"
    return GptMiniError(f"{describe_os_error(error, f'the token cache under {root}')}; {fix}.")


def write_cache(source, data, root: Path, tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> Path:
    """A complete cache of ``source`` under ``root``: found, or built (resumed if interrupted)."""
    try:
        folder_name, tokenizer_key = tokenizer_identity(tok, encoding)
        parent = root / source.folder / folder_name
        key = cache_key(source, data, tokenizer_key)
        if parent.is_dir():
            with contextlib.suppress(OSError):  # cleaning up must never stop a run (e.g. a read-only cache)
                remove_stale_temp_files(parent)  # left by atomic writes killed mid-way
        if (parent / key / "meta.json").is_file():
            return parent / key
        parent.mkdir(parents=True, exist_ok=True)
        return _build(parent, key, source, data, tok, encoding)
    except OSError as exc:
        raise cannot_write(exc, root) from None
