"""Sharded token caches (``data=hf``): tokenize a stream of documents into fixed-size shard files, resumably.

One concern: building a sharded cache folder from ``gptmini.data.hf_source``'s documents: parallel encoding,
shard files, the progress state that lets an interrupted build resume, and the progress bar. Imports
``gptmini.common`` and ``gptmini.data`` modules (``cache_files`` for the version, the stored tokenizer and
write errors), never ``token_cache``, which imports this module; must not import ``gptmini.model``,
``gptmini.training`` or ``gptmini.generation``. docs/data.md describes the format on disk.

Decisions worth knowing:

- **Documents.** Every document is preceded by the ``<|endoftext|>`` id (as llm.c and build-nanogpt do), so a
  window that crosses into a new document always sees the separator. Documents are read in batches of
  ``BATCH_DOCS`` and encoded by a pool of threads calling tiktoken's ``encode_to_numpy`` (tiktoken releases
  the GIL); bench/prepare.py measured this faster here than ``encode_ordinary_batch`` or worker processes.
- **Shards.** Each split fills ``<split>_<index>.bin`` files of exactly ``data.shard_tokens`` ids (the last
  one shorter). A shard is written as ``<name>.partial``, fsynced and renamed when full, so a ``.bin`` name
  only ever holds a whole shard. Train and validation shards are numbered independently.
- **Resume.** The build lives in ``.<key>.building/`` beside the final folder. After every finished shard
  (and at least every ``COMMIT_EVERY_S``), ``progress.json`` records, atomically, the next document to read
  and each split's finished shards and partial length. A build that was interrupted (Ctrl-C, ``kill -9``, a
  lost connection) restarts from there: finished shards are kept, partial files are cut back to the recorded
  length, and reading skips the documents already done. When every document is in, ``meta.json`` is
  written and the folder renamed to ``<key>/``: a cache folder only ever appears complete.
- **Memory** is bounded by the batches in flight (``2 × threads`` batches of ``BATCH_DOCS`` documents and
  their tokens), not by the corpus or the shard size: bench/prepare.py measures the peak RSS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from filelock import FileLock
from tqdm import tqdm  # installed with lightning

from gptmini.common import GptMiniError, atomic_write_text
from gptmini.data import hf_source
from gptmini.data.cache_files import (
    CACHE_VERSION,
    cannot_write,
    save_tokenizer,
    tokenizer_folder,
    tokenizer_key,
)
from gptmini.data.corpus import DataConfig, cache_root
from gptmini.data.encode import BPE_SAMPLE_BYTES, SPLITS, encode_threads, token_dtype
from gptmini.data.tokenizer import TokenizerConfig, load_encoding, train_bpe

log = logging.getLogger(__name__)

LAYOUT = "shards"
PROGRESS_FILE = "progress.json"
# Documents per read batch (a few MB of web text): one encoding task per split per batch.
BATCH_DOCS = 512
# Commit progress at least this often, so a crash redoes at most this much work of a partial shard.
COMMIT_EVERY_S = 30.0


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train_000000.bin``."""
    return f"{split}_{index:06d}.bin"


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


def _encode_documents(enc: tiktoken.Encoding, texts: list[str]) -> tuple[np.ndarray, int]:
    """``<|endoftext|>`` + the tokens of each text, concatenated (runs in a worker thread)."""
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts, nbytes = [], 0
    for text in texts:
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


def _train_tokenizer(data: DataConfig, tok: TokenizerConfig, dataset) -> tiktoken.Encoding:
    """A BPE trained on the first BPE_SAMPLE_BYTES of training documents."""

    def sample():
        size, first = 0, 0
        for texts in hf_source.iter_text_batches(dataset, data.hf, 0, BATCH_DOCS):
            mask = hf_source.val_mask(first, len(texts), data.val_fraction, data.hf.split_seed)
            first += len(texts)
            for text, is_val in zip(texts, mask, strict=True):
                if not is_val:
                    yield text
                    size += len(text)
            if size >= BPE_SAMPLE_BYTES:
                return

    mb = BPE_SAMPLE_BYTES // 2**20
    log.info("training a %d-token BPE on up to %d MB of %s", tok.vocab_size, mb, data.hf.path)
    return train_bpe(sample(), tok.vocab_size, tok.pattern)


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


def _tokenize(
    folder: Path, data: DataConfig, enc: tiktoken.Encoding, dataset, key: str, state: dict | None
) -> dict:
    """Stream the documents into shard files; return the per-split counts and shard lengths."""
    hf, dtype = data.hf, token_dtype(enc.n_vocab)
    splits = state["splits"] if state else {}
    next_doc = state["next_doc"] if state else 0
    extra = {"key": key}
    if next_doc:
        log.info("resuming the interrupted build in %s at document %d", folder, next_doc)
    threads = encode_threads()
    file_bytes = sum(p.stat().st_size for p in hf_source.local_files(hf))
    documents = hf_source.known_documents(dataset, hf)
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
        progress = Progress(f"tokenizing {hf.path}", done_tokens, data.max_tokens, documents, file_bytes)
        with ThreadPoolExecutor(threads) as pool:
            first = next_doc
            for texts in hf_source.iter_text_batches(dataset, hf, next_doc, BATCH_DOCS):
                mask = hf_source.val_mask(first, len(texts), data.val_fraction, hf.split_seed)
                futures = []
                for split, chosen in (("train", ~mask), ("val", mask)):
                    docs = [t for t, keep in zip(texts, chosen, strict=True) if keep]
                    if docs:
                        futures.append((split, pool.submit(_encode_documents, enc, docs), len(docs)))
                first += len(texts)
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


def _check_not_empty(counts: dict, data: DataConfig) -> None:
    if counts["train_bytes"] == 0:
        raise GptMiniError(
            f"{hf_source.describe(data.hf)} gave no training text (0 bytes in "
            f"{counts['train_documents']} documents); check data.hf.text_field and data.hf.split."
        )


def _fsync_folder(folder: Path) -> None:
    """Make the folder's entries durable before it is renamed (not every system lets a folder be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)  # every build used to leak this descriptor


def build_sharded_cache(
    parent: Path, key: str, data: DataConfig, tok: TokenizerConfig, encoding: tiktoken.Encoding | None
) -> Path:
    """Build (or resume building) the sharded cache ``parent/key``; return its folder."""
    folder = parent / key
    building = parent / f".{key}.building"
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():
            return folder
        started = time.perf_counter()
        dataset = hf_source.load_hf_dataset(data.hf)
        state = _read_progress(building, key)
        if state is None:  # nothing to resume (or another key's leftovers): start afresh
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
        if encoding is not None:
            enc = encoding
        elif tok.name == "bpe":
            bpe_file = building / "tokenizer.tiktoken"
            if state and bpe_file.is_file():
                from gptmini.data.tokenizer import load_bpe

                enc = load_bpe(bpe_file)
            else:
                enc = _train_tokenizer(data, tok, dataset)
        else:
            enc = load_encoding(tok.name)
        tokenizer = save_tokenizer(enc, building)
        if state is None:
            # The starting state, so even a build interrupted before its first shard keeps its tokenizer.
            atomic_write_text(building / PROGRESS_FILE, json.dumps({"key": key, "next_doc": 0, "splits": {}}))
        counts = _tokenize(building, data, enc, dataset, key, _read_progress(building, key))
        _check_not_empty(counts, data)
        meta = {
            "version": CACHE_VERSION,
            "layout": LAYOUT,
            "corpus": "hf",
            "source": hf_source.describe(data.hf),
            "hf": hf_source.source_fingerprint(data.hf),
            "val_fraction": data.val_fraction,
            "split_seed": data.hf.split_seed,
            "max_tokens": data.max_tokens,
            "shard_tokens": data.shard_tokens,
            "tokenizer_id": tokenizer_folder(tok, encoding),
            "tokenizer": tokenizer,
            "vocab_size": enc.n_vocab,
            "eot_id": enc.eot_token,
            **counts,
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
    return folder


def sharded_cache_key(data: DataConfig, tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> str:
    """The key of a sharded cache: the source, split, cap, shard size, tokenizer and cache version."""
    settings = {
        "version": CACHE_VERSION,
        "layout": LAYOUT,
        "source": hf_source.source_fingerprint(data.hf),
        "val_fraction": data.val_fraction,
        "split_seed": data.hf.split_seed,
        "max_tokens": data.max_tokens,
        "shard_tokens": data.shard_tokens,
        "tokenizer": tokenizer_key(tok, encoding),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare_sharded_cache(data: DataConfig, tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> Path:
    """``prepare_cache`` for ``data=hf``: a complete sharded cache's folder, built or resumed if needed."""
    parent = cache_root(data) / "hf" / hf_source.folder_name(data.hf) / tokenizer_folder(tok, encoding)
    key = sharded_cache_key(data, tok, encoding)
    if (parent / key / "meta.json").is_file():
        return parent / key
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return build_sharded_cache(parent, key, data, tok, encoding)
    except OSError as exc:
        raise cannot_write(exc, cache_root(data)) from None
