"""Corpora, token caches and the LightningDataModule.

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

import codecs
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import lightning as L
import numpy as np
import tiktoken
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm  # installed with lightning

from gptmini.errors import GptMiniError
from gptmini.tokenizer import (
    TokenizerConfig,
    load_bpe,
    load_encoding,
    save_bpe,
    tokenizer_id,
    tokenizer_to_spec,
    train_bpe,
)

log = logging.getLogger(__name__)

CORPORA = ("pystdlib", "shakespeare", "text")
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / "data"

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 20

# Bump when the cache layout or contents change, so old caches are not reused.
CACHE_VERSION = 1
# Upper bound on the text the BPE trains on (see the module docstring).
BPE_SAMPLE_BYTES = 32 * 2**20
# Files are read in blocks and encoded in pieces of about this size, so memory does not grow with the corpus.
READ_BLOCK_BYTES = 2**20
PIECE_CHARS = 2**20
# A file whose first KB holds a NUL byte is treated as binary.
BINARY_SNIFF_BYTES = 1024
# Directories of the standard library that hold tests or third-party code rather than library source.
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
# A newline followed by an ASCII letter or digit ends a pre-token in every tiktoken split pattern, so cutting
# a long text there encodes exactly as the uncut text.
_SAFE_CUT = re.compile(r"\n(?=[A-Za-z0-9])")


# ------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class DataConfig:
    """Which corpus to train on and how to batch it (the ``data`` config group)."""

    name: str = "pystdlib"
    """The corpus: "pystdlib" (the running Python's standard library), "shakespeare" or "text"."""

    path: str | None = None
    """shakespeare: a local copy of input.txt (skips the download); text: a file, directory or glob."""

    batch_size: int = 32
    """Sequences per batch."""

    val_fraction: float = 0.1
    """Fraction of the corpus (the last part, by bytes) held out for validation; 0 disables validation."""

    num_workers: int = 0
    """DataLoader worker processes; 0 loads in the main process (fast enough for memmapped tokens)."""

    cache_dir: str | None = None
    """Where token caches and downloads go; default: the repository's data/ folder (not the cwd)."""

    def __post_init__(self) -> None:
        if self.name not in CORPORA:
            raise GptMiniError(f"data.name={self.name!r} is unknown; use one of: {', '.join(CORPORA)}.")
        if self.name == "text" and not self.path:
            raise GptMiniError("data.name=text needs data.path=FILE, DIRECTORY or GLOB of your text files.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise GptMiniError(f"data.batch_size={self.batch_size!r} must be a positive integer.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise GptMiniError(f"data.val_fraction={self.val_fraction!r} must be in [0, 1); try 0.1.")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise GptMiniError(f"data.num_workers={self.num_workers!r} must be 0 or more.")


def _as_config(value: object, cls: type, group: str):
    """Accept a config dataclass or a mapping (e.g. Hydra's DictConfig) with the same keys."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise GptMiniError(
            f"{group} config must be a {cls.__name__} or a mapping, not {type(value).__name__}"
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise GptMiniError(f"unknown {group} keys {unknown}; valid keys: {', '.join(sorted(known))}")
    return cls(**{key: value[key] for key in value})


def cache_root(data: DataConfig) -> Path:
    """The folder holding all caches and downloads."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else DEFAULT_CACHE_DIR


# ------------------------------------------------------------------------------------------------------------
# Corpora: each resolves to a sorted list of files, one document per file.


@dataclass
class Corpus:
    """The files of a corpus, in document order."""

    name: str
    files: list[Path]
    description: str


def resolve_corpus(data: DataConfig) -> Corpus:
    """List the files of the configured corpus (downloading Tiny Shakespeare if needed)."""
    if data.name == "pystdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return Corpus("pystdlib", _pystdlib_files(root), f"Python standard library at {root}")
    if data.name == "shakespeare":
        path = _shakespeare_file(data)
        return Corpus("shakespeare", [path], f"Tiny Shakespeare at {path}")
    files = _text_files(data.path)
    return Corpus("text", files, f"text files from {data.path}")


def _pystdlib_files(root: Path) -> list[Path]:
    files = []
    for folder, subfolders, names in os.walk(root):
        # Pruning here skips the big test trees instead of listing and then dropping them.
        subfolders[:] = [name for name in subfolders if name not in STDLIB_EXCLUDED_DIRS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    # Sorted by the path inside the stdlib so the corpus (and its split) is the same on every machine.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _shakespeare_file(data: DataConfig) -> Path:
    if data.path:
        path = Path(data.path).expanduser()
        if not path.is_file():
            raise GptMiniError(
                f"data.path={data.path!r} does not exist; point it at a copy of Tiny Shakespeare."
            )
        # A modified copy is the user's choice, so it is used; the warning says losses won't compare.
        if _sha256_file(path) != SHAKESPEARE_SHA256:
            warnings.warn(
                f"{path} is not the reference Tiny Shakespeare (sha256 differs); using it anyway, but its "
                "validation losses will not compare with published ones",
                stacklevel=3,
            )
        return path
    path = cache_root(data) / "shakespeare" / "input.txt"
    if path.is_file() and _sha256_file(path) == SHAKESPEARE_SHA256:
        return path
    _download_shakespeare(path)
    return path


def _download_shakespeare(path: Path) -> None:
    log.info("downloading Tiny Shakespeare from %s", SHAKESPEARE_URL)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            content = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise GptMiniError(
            f"could not download Tiny Shakespeare ({exc}). Either connect to the internet once, or pass "
            f"data.path=/path/to/input.txt (a local copy), or put the file at {path}."
        ) from None
    if hashlib.sha256(content).hexdigest() != SHAKESPEARE_SHA256:
        raise GptMiniError(
            f"the download from {SHAKESPEARE_URL} does not match its sha256 (corrupt or changed); retry, or "
            "pass data.path=/path/to/input.txt"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)  # atomic: readers see no file or the whole file


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def _text_files(spec: str) -> list[Path]:
    """The files named by a file, directory (recursive, hidden entries skipped) or glob; binaries skipped."""
    path = Path(spec).expanduser()
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = [p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path)]
    elif glob.has_magic(spec):
        candidates = []
        for match in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
            match = Path(match)
            if match.is_dir():
                candidates += [p for p in match.rglob("*") if p.is_file() and not _is_hidden(p, match)]
            elif match.is_file():
                candidates.append(match)
        if not candidates:
            raise GptMiniError(f"data.path={spec!r} matches no files; check the pattern.")
    else:
        raise GptMiniError(f"data.path={spec!r} does not exist; give a text file, a directory or a glob.")
    files, binary = [], []
    for candidate in sorted(set(candidates), key=lambda p: p.as_posix()):
        (binary if _is_binary(candidate) else files).append(candidate)
    if binary:
        names = ", ".join(str(p) for p in binary[:3]) + (" ..." if len(binary) > 3 else "")
        warnings.warn(f"skipped {len(binary)} binary file(s) (NUL bytes) under {spec}: {names}", stacklevel=4)
    if not files:
        raise GptMiniError(f"data.path={spec!r} holds no text files; point it at your text.")
    return files


def fingerprint(files: list[Path]) -> str:
    """A hash of the corpus contents in document order (names and mtimes don't change the tokens)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.stat().st_size}:{_sha256_file(path)}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Reading: decoded text pieces, per split, with invalid UTF-8 replaced and counted.

_invalid_utf8_bytes = 0


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    """A decode error handler like "replace" that also counts the replaced bytes."""
    global _invalid_utf8_bytes
    _invalid_utf8_bytes += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("gptmini.replace_and_count", _replace_and_count)


def _split_offset(files: list[Path], val_fraction: float) -> int:
    """The raw byte offset (in the concatenated files) where the validation split starts."""
    total = sum(path.stat().st_size for path in files)
    return int(total * (1.0 - val_fraction))


def _char_boundary(path: Path, offset: int) -> int:
    """Move ``offset`` forward past UTF-8 continuation bytes so the cut doesn't split a character."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(4)
    skip = 0
    while skip < min(3, len(head)) and 0x80 <= head[skip] < 0xC0:
        skip += 1
    return offset + skip


def _read_region(path: Path, start: int, end: int) -> Iterator[str]:
    """Yield the text of bytes [start, end) of a file in pieces of about PIECE_CHARS, cut at safe points."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="gptmini.replace_and_count")
    buffer = ""
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            block = f.read(min(READ_BLOCK_BYTES, remaining))
            if not block:
                break
            remaining -= len(block)
            buffer += decoder.decode(block)
            while len(buffer) > PIECE_CHARS:
                match = _SAFE_CUT.search(buffer, PIECE_CHARS)
                if match:
                    cut = match.end()
                elif len(buffer) > 8 * PIECE_CHARS:
                    # No line start at all (e.g. one huge line): a hard cut is the lesser evil.
                    cut = PIECE_CHARS
                else:
                    break  # wait for more text to find a safe cut
                yield buffer[:cut]
                buffer = buffer[cut:]
    buffer += decoder.decode(b"", final=True)
    if buffer:
        yield buffer


def iter_pieces(files: list[Path], val_fraction: float) -> Iterator[tuple[str, bool, str]]:
    """Yield ``(split, starts_document, text)`` for the whole corpus, train split first.

    ``starts_document`` is True on the first piece of each file within a split: a separator goes there.
    """
    split_at = _split_offset(files, val_fraction)
    offset = 0
    for path in files:
        size = path.stat().st_size
        cut = min(max(split_at - offset, 0), size)
        if 0 < cut < size:
            cut = _char_boundary(path, cut)
        for split, start, end in (("train", 0, cut), ("val", cut, size)):
            first = True
            for text in _read_region(path, start, end) if end > start else ():
                yield split, first, text
                first = False
        offset += size


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
    global _invalid_utf8_bytes
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

    _invalid_utf8_bytes = 0
    # The bar only appears when preparation takes more than a few seconds.
    progress = tqdm(total=total, desc=desc, unit="B", unit_scale=True, delay=3, file=sys.stderr, leave=False)
    try:
        with ThreadPoolExecutor(threads) as pool:
            task, task_split, task_chars = [], "train", 0
            for split, starts_document, text in iter_pieces(files, val_fraction):
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
    counts["invalid_utf8_bytes"] = _invalid_utf8_bytes
    counts["dtype"] = np.dtype(dtype).name
    return counts


def _bpe_sample(files: list[Path], val_fraction: float) -> Iterator[str]:
    """Training-split pieces, evenly thinned to about BPE_SAMPLE_BYTES when the split is larger."""
    train_bytes = _split_offset(files, val_fraction)
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
    data = _as_config(data, DataConfig, "data")
    tokenizer = _as_config(tokenizer, TokenizerConfig, "tokenizer")
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


# ------------------------------------------------------------------------------------------------------------
# Datasets


class TrainBatches(IterableDataset):
    """An endless stream of training batches of random windows; batch k depends only on (seed, rank, k)."""

    def __init__(
        self, path: Path, dtype: str, block_size: int, batch_size: int, seed: int, rank: int, start: int
    ):
        super().__init__()
        self.path, self.dtype = path, dtype
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank = seed, rank
        self.start = start  # the first batch index; the DataModule moves it forward as batches are consumed
        self._tokens = None

    def __getstate__(self) -> dict:
        # Workers open their own memmap; pickling one would copy the whole token file.
        return {**self.__dict__, "_tokens": None}

    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = open_tokens(self.path, self.dtype)
        return self._tokens

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``k``: (x, y) int64 tensors of shape (B, block_size), y shifted by one."""
        tokens = self.tokens()
        rng = np.random.default_rng([self.seed, self.rank, k])
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
        windows = tokens[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64)  # (B, T+1)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # Worker w makes batches k = start + w (mod workers); the DataLoader interleaves them back in order.
        k = self.start + worker_id
        while True:
            yield self.batch(k)
            k += workers


class ValWindows(Dataset):
    """Non-overlapping windows tiling the validation split: every target is predicted once."""

    def __init__(self, path: Path, dtype: str, n_tokens: int, block_size: int):
        super().__init__()
        self.path, self.dtype = path, dtype
        # A split shorter than one window gives one shorter window.
        self.window = min(block_size, n_tokens - 1) if n_tokens >= 2 else 0
        self.count = (n_tokens - 1) // self.window if self.window else 0
        self._tokens = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self._tokens is None:
            self._tokens = open_tokens(self.path, self.dtype)
        start = i * self.window
        window = torch.from_numpy(self._tokens[start : start + self.window + 1].astype(np.int64))
        return window[:-1].clone(), window[1:].clone()


# ------------------------------------------------------------------------------------------------------------
# The DataModule


class TextDataModule(L.LightningDataModule):
    """Token caches served as resumable, rank-disjoint random training windows and fixed validation windows.

    Args:
        data: the corpus and batching settings.
        tokenizer: the tokenizer settings.
        block_size: the model's context length; windows hold block_size + 1 tokens.
        seed: seeds the training windows (with the rank and the batch index).
    """

    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, block_size: int, seed: int = 1337):
        super().__init__()
        self.data_config = _as_config(data, DataConfig, "data")
        self.tokenizer_config = _as_config(tokenizer, TokenizerConfig, "tokenizer")
        if not isinstance(block_size, int) or block_size < 1:
            raise GptMiniError(f"block_size={block_size!r} must be a positive integer.")
        if not isinstance(seed, int) or seed < 0:
            raise GptMiniError(f"seed={seed!r} must be a non-negative integer.")
        self.block_size = block_size
        self.seed = seed
        self.batches_consumed = 0
        self.cache_dir: Path | None = None
        self.meta: dict | None = None
        self.tokenizer: tiktoken.Encoding | None = None
        self.tokenizer_spec: dict | None = None
        self._train_batches: TrainBatches | None = None

    def prepare_data(self) -> None:
        """Tokenize once (Lightning calls this on one process per node)."""
        # Checking an existing cache hashes the whole corpus: once per process is enough.
        if self.cache_dir is None:
            self.cache_dir = prepare_cache(self.data_config, self.tokenizer_config)

    def setup(self, stage: str | None = None) -> None:
        """Load the cache (preparing it if this process has not): cheap when it exists."""
        if self.meta is not None:
            return
        self.prepare_data()
        self.meta = read_meta(self.cache_dir)
        self.tokenizer = load_cached_tokenizer(self.cache_dir, self.meta)
        self.tokenizer_spec = tokenizer_to_spec(self.tokenizer)
        need = self.block_size + 1
        if self.meta["train_tokens"] < need:
            raise GptMiniError(
                f"the training split has {self.meta['train_tokens']} tokens, fewer than one window of "
                f"block_size + 1 = {need} tokens; use a smaller model.block_size or more text."
            )
        per_batch = self.data_config.batch_size * self.block_size
        if per_batch > self.meta["train_tokens"]:
            raise GptMiniError(
                f"one batch (data.batch_size={self.data_config.batch_size} × block_size={self.block_size} = "
                f"{per_batch} tokens) is larger than the whole training split ({self.meta['train_tokens']} "
                "tokens); use a smaller data.batch_size or model.block_size, or more text."
            )

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (n_vocab)."""
        self.setup()
        return self.tokenizer.n_vocab

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes per token of a split: bits per byte = loss_nats / ln 2 / bytes_per_token."""
        self.setup()
        if split not in ("train", "val"):
            raise GptMiniError(f"split={split!r} must be 'train' or 'val'")
        tokens = self.meta[f"{split}_tokens"]
        return self.meta[f"{split}_bytes"] / tokens if tokens else math.nan

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader_kwargs(self) -> dict:
        workers = self.data_config.num_workers
        return {"num_workers": workers, "pin_memory": torch.cuda.is_available()}

    def train_dataloader(self) -> DataLoader:
        """Whole batches from an endless stream that starts after the batches already consumed."""
        self.setup()
        self._train_batches = TrainBatches(
            self.cache_dir / "train.bin",
            self.meta["dtype"],
            self.block_size,
            self.data_config.batch_size,
            self.seed,
            self._rank(),
            self.batches_consumed,
        )
        return DataLoader(self._train_batches, batch_size=None, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """The validation windows in order (the same every time)."""
        self.setup()
        windows = ValWindows(
            self.cache_dir / "val.bin", self.meta["dtype"], self.meta["val_tokens"], self.block_size
        )
        return DataLoader(
            windows, batch_size=self.data_config.batch_size, shuffle=False, **self._loader_kwargs()
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Lightning calls this in the main process for each batch it actually uses (not for prefetched ones),
        # so the count is exact; validation batches don't advance the training stream.
        if self.trainer is not None and self.trainer.training:
            self.batches_consumed += 1
            if self._train_batches is not None:
                # A re-iterated loader (a new epoch) continues the stream instead of repeating it.
                self._train_batches.start = self.batches_consumed
        return batch

    def state_dict(self) -> dict:
        """How far the training stream got: enough to resume it exactly."""
        return {"batches_consumed": self.batches_consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume: the next train_dataloader starts at the first batch not yet consumed."""
        self.batches_consumed = int(state_dict["batches_consumed"])
        if self._train_batches is not None:
            self._train_batches.start = self.batches_consumed
