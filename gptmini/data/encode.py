"""Encoding: stream a corpus through a tokenizer into ``train.bin`` / ``val.bin``, and pick the BPE's sample.

One concern: turning the text pieces of ``gptmini.data.corpus`` into token files, fast (tiktoken in threads,
reading overlapped with encoding) and in flat memory. Imports ``gptmini.common`` and ``gptmini.data.corpus``
only; knows nothing of cache folders or keys (``gptmini.data.token_cache``) and must not import
``gptmini.model``, ``gptmini.training`` or ``gptmini.generation``.

Decisions worth knowing:

- **Documents.** Within a split, consecutive documents are separated by the ``<|endoftext|>`` *id*; text that
  contains the literal string is encoded as ordinary text.
- **Token files.** Ids are stored as uint16 when every id fits, else uint32, in document order.
- **BPE sample.** A BPE is trained on the training split, or on an evenly spread sample of
  ``BPE_SAMPLE_BYTES`` of it when the split is larger (rustbpe takes ~3 s per 30 MB here; the vocabulary
  barely changes beyond that).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm  # installed with lightning

from gptmini.common import atomic_file
from gptmini.data.corpus import PIECE_CHARS, InvalidUtf8Counter, iter_pieces, split_offset

# Upper bound on the text the BPE trains on (see the module docstring).
BPE_SAMPLE_BYTES = 32 * 2**20
SPLITS = ("train", "val")


def encode_threads() -> int:
    """Threads for tiktoken: the usable cores, at most 8 (beyond that reading the text is the limit)."""
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


def token_dtype(n_vocab: int) -> type:
    """The narrowest unsigned dtype that holds every id below ``n_vocab``."""
    return np.uint16 if n_vocab <= 65535 else np.uint32


def encode_corpus(
    folder: Path, files: list[Path], val_fraction: float, enc: tiktoken.Encoding, desc: str
) -> dict:
    """Write train.bin/val.bin into ``folder``, streaming; return the per-split counts.

    Each file is fsynced and renamed into place only when complete (``atomic_file``); on any error or
    Ctrl-C neither is left behind.
    """
    dtype = token_dtype(enc.n_vocab)
    counts = {f"{split}_{what}": 0 for split in SPLITS for what in ("tokens", "bytes")}
    # Whether a split already holds a document, so the next one needs a separator.
    started = {split: False for split in SPLITS}
    total = sum(path.stat().st_size for path in files)
    threads = encode_threads()
    in_flight: deque = deque()
    invalid = InvalidUtf8Counter()
    with contextlib.ExitStack() as stack:
        outputs = {split: stack.enter_context(atomic_file(folder / f"{split}.bin", "wb")) for split in SPLITS}
        # The bar only appears when preparation takes more than a few seconds.
        progress = stack.enter_context(
            tqdm(total=total, desc=desc, unit="B", unit_scale=True, delay=3, file=sys.stderr, leave=False)
        )

        def write_oldest() -> None:
            split, future = in_flight.popleft()
            tokens, nbytes = future.result()
            tokens.astype(dtype, copy=False).tofile(outputs[split])
            counts[f"{split}_tokens"] += len(tokens)
            counts[f"{split}_bytes"] += nbytes
            progress.update(nbytes)

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
    counts["invalid_utf8_bytes"] = invalid.bytes_replaced
    counts["dtype"] = np.dtype(dtype).name
    return counts


def bpe_sample(files: list[Path], val_fraction: float) -> Iterator[str]:
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
