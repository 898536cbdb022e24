"""Token caches: tokenize a corpus once into ``train.bin``/``val.bin`` memmaps plus ``meta.json``.

Pipeline: a corpus (a sorted list of files, each one document) is split into train/val, tokenized once into
``train.bin`` / ``val.bin`` memmaps plus ``meta.json``, then served as random training windows and fixed
validation windows.

Decisions worth knowing:

- **Split.** The validation split is the last ``val_fraction`` of the corpus by raw bytes, concatenated in
  file order; the file that straddles the cut is split at the next character boundary. For a single file this
  is nanoGPT's ``data[int(n * 0.9):]``, so Tiny Shakespeare validation losses compare.
- **Documents.** Within a split, consecutive documents are separated by the ``<|endoftext|>`` *id*; text that
  contains the literal string is encoded as ordinary text.
- **Cache key.** ``<cache_dir>/<corpus>/<tokenizer id>/<key>/`` where ``key`` hashes the corpus contents (in
  order), the tokenizer settings, ``val_fraction`` and the cache format, so any change gives a new folder and
  nothing stale is reused. A folder appears only complete (built under a temporary name, then renamed, under a
  file lock). Delete old folders to reclaim space.
- **BPE.** Trained on the training split, or on an evenly spread sample of ``BPE_SAMPLE_BYTES`` of it when
  the split is larger (rustbpe takes ~3 s per 30 MB here; the vocabulary barely changes beyond that).
- **Validation windows.** Non-overlapping windows of ``block_size`` targets tile the split from its start;
  only the final remainder of fewer than ``block_size`` targets is dropped. A split shorter than one window
  gives a single shorter window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from filelock import FileLock
from tqdm import tqdm  # installed with lightning

from gptmini.common import GptMiniError, as_config
from gptmini.data.corpus import (
    PIECE_CHARS,
    Corpus,
    DataConfig,
    InvalidUtf8Counter,
    cache_root,
    fingerprint,
    iter_pieces,
    resolve_corpus,
    split_offset,
)
from gptmini.data.tokenizer import (
    TokenizerConfig,
    load_bpe,
    load_encoding,
    save_bpe,
    tokenizer_id,
    train_bpe,
)

log = logging.getLogger(__name__)
# Bump when the cache layout or contents change, so old caches are not reused.
CACHE_VERSION = 2
# Upper bound on the text the BPE trains on (see the module docstring).
BPE_SAMPLE_BYTES = 32 * 2**20

# ------------------------------------------------------------------------------------------------------------
# Token caches


def _encode_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _encode_task(enc: tiktoken.Encoding, pieces: list[tuple[bool, str]]) -> tuple[np.ndarray, int]:
    """Encode pieces (in a worker thread: tiktoken releases the GIL) with EOT ids before new documents."""
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts, nbytes = [], 0
    for eot_before, text in pieces:
        if eot_before:
            parts.append(eot)
        # encode_to_numpy with no special tokens allowed or disallowed == encode_ordinary, minus the list.
        parts.append(enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()))
        nbytes += len(text.encode("utf-8"))
    return (np.concatenate(parts) if parts else np.empty(0, np.uint32)), nbytes


def _token_dtype(n_vocab: int) -> type:
    return np.uint16 if n_vocab <= 65535 else np.uint32


def _tokenize(
    folder: Path, files: list[Path], val_fraction: float, enc: tiktoken.Encoding, desc: str
) -> dict:
    """Write train.bin/val.bin into ``folder``, streaming; return the per-split counts."""
    dtype = _token_dtype(enc.n_vocab)
    counts = {f"{split}_{what}": 0 for split in ("train", "val") for what in ("tokens", "bytes")}
    outputs = {split: open(folder / f"{split}.bin", "wb") for split in ("train", "val")}  # noqa: SIM115
    # Whether a split already holds a document, so the next one needs a separator.
    started = {"train": False, "val": False}
    total = sum(path.stat().st_size for path in files)
    threads = _encode_threads()
    in_flight: deque = deque()

    def write_oldest() -> None:
        split, future = in_flight.popleft()
        tokens, nbytes = future.result()
        tokens.astype(dtype, copy=False).tofile(outputs[split])
        counts[f"{split}_tokens"] += len(tokens)
        counts[f"{split}_bytes"] += nbytes
        progress.update(nbytes)

    invalid = InvalidUtf8Counter()
    # The bar only appears when preparation takes more than a few seconds.
    progress = tqdm(total=total, desc=desc, unit="B", unit_scale=True, delay=3, file=sys.stderr, leave=False)
    try:
        with ThreadPoolExecutor(threads) as pool:
            task, task_split, task_chars = [], "train", 0
            for split, starts_document, text in iter_pieces(files, val_fraction, invalid):
                if split != task_split or task_chars >= PIECE_CHARS:
                    if task:
                        in_flight.append((task_split, pool.submit(_encode_task, enc, task)))
                    task, task_split, task_chars = [], split, 0
                task.append((starts_document and started[split], text))
                started[split] = True
                task_chars += len(text)
                # A bounded number of tasks in flight keeps memory flat while reading overlaps encoding.
                while len(in_flight) > 2 * threads:
                    write_oldest()
            if task:
                in_flight.append((task_split, pool.submit(_encode_task, enc, task)))
            while in_flight:
                write_oldest()
    finally:
        progress.close()
        for f in outputs.values():
            f.close()
    counts["invalid_utf8_bytes"] = invalid.bytes_replaced
    counts["dtype"] = np.dtype(dtype).name
    return counts


def _bpe_sample(files: list[Path], val_fraction: float) -> Iterator[str]:
    """Training-split pieces, evenly thinned to about BPE_SAMPLE_BYTES when the split is larger."""
    train_bytes = split_offset(files, val_fraction)
    keep = min(1.0, BPE_SAMPLE_BYTES / max(train_bytes, 1))
    credit = 0.0
    for split, _, text in iter_pieces(files, val_fraction):
        if split != "train":
            return
        credit += len(text) * keep
        if credit >= len(text):
            credit -= len(text)
            yield text


def _cache_key(corpus: Corpus, source_fingerprint: str, tok: TokenizerConfig, val_fraction: float) -> str:
    settings = {
        "version": CACHE_VERSION,
        "corpus": corpus.name,
        "fingerprint": source_fingerprint,
        "tokenizer": tokenizer_id(tok),
        "val_fraction": val_fraction,
        "bpe_sample_bytes": BPE_SAMPLE_BYTES if tok.name == "bpe" else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _build_cache(
    folder: Path, corpus: Corpus, source_fingerprint: str, data: DataConfig, tok: TokenizerConfig
):
    """Train the tokenizer if needed and tokenize the corpus into ``folder``."""
    started = time.perf_counter()
    if tok.name == "bpe":
        log.info("training a %d-token BPE on %s", tok.vocab_size, corpus.description)
        enc = train_bpe(_bpe_sample(corpus.files, data.val_fraction), tok.vocab_size, tok.pattern)
        save_bpe(enc, folder / "tokenizer.tiktoken")
        tokenizer = {"kind": "bpe", "name": enc.name, "file": "tokenizer.tiktoken"}
    else:
        enc = load_encoding(tok.name)
        tokenizer = {"kind": "tiktoken", "name": enc.name}
    log.info("tokenizing %s with %s", corpus.description, tokenizer_id(tok))
    counts = _tokenize(folder, corpus.files, data.val_fraction, enc, f"tokenizing {corpus.name}")
    if counts["invalid_utf8_bytes"]:
        warnings.warn(
            f"{corpus.description}: replaced {counts['invalid_utf8_bytes']} invalid UTF-8 byte(s) by U+FFFD",
            stacklevel=3,
        )
    meta = {
        "version": CACHE_VERSION,
        "corpus": corpus.name,
        "source": corpus.description,
        "fingerprint": source_fingerprint,
        "files": len(corpus.files),
        "val_fraction": data.val_fraction,
        "tokenizer_id": tokenizer_id(tok),
        "tokenizer": tokenizer,
        "vocab_size": enc.n_vocab,
        "eot_id": enc.eot_token,
        **counts,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def prepare_cache(data: DataConfig, tokenizer: TokenizerConfig) -> Path:
    """Tokenize the corpus unless a cache for the same contents and settings exists; return its folder."""
    data = as_config(data, DataConfig, "data")
    tokenizer = as_config(tokenizer, TokenizerConfig, "tokenizer")
    corpus = resolve_corpus(data)
    if sum(path.stat().st_size for path in corpus.files) == 0:
        raise GptMiniError(
            f"the corpus is empty (0 bytes): {corpus.description}; point data.path at files with text."
        )
    source_fingerprint = fingerprint(corpus.files)
    parent = cache_root(data) / corpus.name / tokenizer_id(tokenizer)
    folder = parent / _cache_key(corpus, source_fingerprint, tokenizer, data.val_fraction)
    if (folder / "meta.json").is_file():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    # One process builds; any other waits for the lock and then finds the finished folder.
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():
            return folder
        tmp = parent / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run that crashed while holding the lock
        tmp.mkdir()
        _build_cache(tmp, corpus, source_fingerprint, data, tokenizer)
        os.rename(tmp, folder)  # atomic: the folder appears complete or not at all
    return folder


def read_meta(folder: Path) -> dict:
    """The meta.json of a prepared cache folder, after checking the token files match it."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            size = (folder / f"{split}.bin").stat().st_size
            if size != meta[f"{split}_tokens"] * itemsize:
                raise ValueError(
                    f"{split}.bin has {size} bytes, meta.json says {meta[f'{split}_tokens']} tokens"
                )
    except (OSError, ValueError, KeyError) as exc:
        raise GptMiniError(
            f"the token cache {folder} is damaged ({exc}); delete that folder and run again to rebuild it."
        ) from None
    return meta


def load_cached_tokenizer(folder: Path, meta: dict | None = None) -> tiktoken.Encoding:
    """The tokenizer a cache folder was built with."""
    meta = meta or read_meta(folder)
    if meta["tokenizer"]["kind"] == "bpe":
        return load_bpe(Path(folder) / meta["tokenizer"]["file"])
    return load_encoding(meta["tokenizer"]["name"])


def open_tokens(path: Path, dtype: str) -> np.ndarray:
    """Memory-map a token file (an empty split gives an empty array: mmap rejects empty files)."""
    if Path(path).stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
