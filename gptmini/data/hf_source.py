"""Hugging Face ``datasets`` sources (``data=hf``): load one, and read it as batches of documents.

One concern: turning ``data.hf`` into a stream of document texts, and deciding which documents are
validation text. Imports ``gptmini.common`` and ``gptmini.data.corpus`` only; ``datasets`` is imported when a
source is opened, so the other corpora never need it. Knows nothing of tokenizers or caches.

Decisions worth knowing:

- **Same loader as datasets.** ``data.hf.path/name/split/data_files/revision`` go to
  ``datasets.load_dataset`` as they are: a Hub name, or a builder (``json``, ``parquet``, ``arrow``) with
  local files. Streaming is the default, so a 10B-token corpus is never held in memory or copied to Arrow.
- **Validation by documents.** Document ``i`` (its position in the split) is validation text when a uniform
  draw from ``(split_seed, i // VAL_BLOCK)`` at ``i % VAL_BLOCK`` falls below ``val_fraction``: a fixed
  function of the seed and the index, so it needs neither the document count nor a second pass.
- **Local files are fingerprinted by path, size and mtime**, not content (hashing 30 GB of parquet would
  take minutes per run): touching a file makes a new cache. A Hub dataset is identified by its name,
  configuration, split and ``revision``; pin ``data.hf.revision`` for data that must not change under you.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptmini.common import GptMiniError
from gptmini.data.corpus import HFConfig

# Documents per validation draw (see the module docstring); changing it changes every split.
VAL_BLOCK = 4096
# Local builders whose data_files are read from this machine.
LOCAL_BUILDERS = ("json", "parquet", "arrow", "csv", "text")
OFFLINE_HINT = (
    "connect to the internet once (the dataset is then cached), or use local files: "
    "data.hf.path=json data.hf.data_files='corpus/*.jsonl'"
)


def _patterns(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, (list, tuple)) and all(isinstance(p, str) for p in data_files):
        return list(data_files)
    raise GptMiniError(
        f"data.hf.data_files={data_files!r} must be a path, a glob or a list of them, "
        "e.g. data.hf.data_files='corpus/*.jsonl'."
    )


def local_files(hf: HFConfig) -> list[Path]:
    """The local files ``data.hf.data_files`` names, sorted; [] for remote files or none.

    A pattern that matches nothing is an error here, where ``datasets`` would fail later and obscurely.
    """
    files = []
    for pattern in _patterns(hf.data_files):
        if "://" in pattern:
            continue  # hf://, https://, s3://: the loader fetches those
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        matches = [Path(m) for m in matches if Path(m).is_file()]
        if not matches:
            raise GptMiniError(f"data.hf.data_files={pattern!r} matches no files; check the path or pattern.")
        files += matches
    return files


def source_fingerprint(hf: HFConfig) -> dict:
    """What identifies the documents of a source, for the cache key (see the module docstring)."""
    digest = hashlib.sha256()
    for path in local_files(hf):
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return {
        "path": hf.path,
        "name": hf.name,
        "split": hf.split,
        "data_files": _patterns(hf.data_files),
        "revision": hf.revision,
        "text_field": hf.text_field,
        "local_files": digest.hexdigest(),
    }


def describe(hf: HFConfig) -> str:
    """A short human description of the source, for logs and meta.json."""
    what = hf.path + (f" ({hf.name})" if hf.name else "")
    if hf.data_files is not None:
        what += f" files {hf.data_files}"
    return f"Hugging Face dataset {what}, split {hf.split}"


def folder_name(hf: HFConfig) -> str:
    """A readable folder name for the source's caches: ``HuggingFaceFW_fineweb-edu_sample-10BT``, ``json``."""
    name = hf.path + (f"_{hf.name}" if hf.name else "")
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._") or "hf"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _is_offline(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error)
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"}) or (
        "offline" in text.lower() or "Couldn't reach" in text
    )


def load_hf_dataset(hf: HFConfig, setting: str = "data.hf.path", offline_hint: str = OFFLINE_HINT):
    """``datasets.load_dataset`` with ``data.hf``'s arguments; any failure is one GptMiniError line.

    ``setting`` and ``offline_hint`` word the message for another caller (the HellaSwag reader).
    """
    try:
        import datasets
    except ImportError:
        raise GptMiniError(
            "data=hf needs the datasets package: pip install -e '.[datasets]' (or pip install datasets)."
        ) from None
    local_files(hf)  # a pattern matching nothing is named now
    data_files = _patterns(hf.data_files) or None
    try:
        with _offline_unless_reachable(hf):
            return datasets.load_dataset(
                hf.path,
                name=hf.name,
                data_files=data_files,
                split=hf.split,
                revision=hf.revision,
                streaming=hf.streaming,
            )
    except Exception as error:  # datasets raises many types (offline, not found, bad split, ...)
        if _is_offline(error):
            raise GptMiniError(
                f"cannot load the dataset {setting}={hf.path!r}: offline and not cached "
                f"({_first_line(error)}); {offline_hint}."
            ) from None
        raise GptMiniError(
            f"cannot load the dataset {setting}={hf.path!r} (name={hf.name!r}, split={hf.split!r}): "
            f"{_first_line(error)}. Check data.hf.path, data.hf.name, data.hf.split and data.hf.data_files."
        ) from None


def _hub_reachable() -> bool:
    """Whether the Hub's host name resolves: without a network, datasets would retry for ~25 s."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline_unless_reachable(hf: HFConfig) -> Iterator[None]:
    """Switch datasets and huggingface_hub to offline mode (use what is cached, fail fast otherwise) for a
    Hub dataset when the Hub cannot be reached; local builders never touch the network."""
    import datasets
    from huggingface_hub import constants

    if hf.path in LOCAL_BUILDERS or Path(hf.path).exists() or datasets.config.HF_HUB_OFFLINE:
        yield
        return
    if _hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def known_documents(dataset: Any, hf: HFConfig) -> int | None:
    """How many documents the split holds, when the dataset or its files say so cheaply; else None."""
    try:
        return len(dataset)  # a map-style (not streaming) dataset
    except TypeError:
        pass
    splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
    if hf.split in splits and splits[hf.split].num_examples:
        return int(splits[hf.split].num_examples)
    if hf.path == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(path).metadata.num_rows for path in local_files(hf))
    return None


def iter_text_batches(dataset: Any, hf: HFConfig, start: int, batch_docs: int) -> Iterator[list[str]]:
    """Lists of up to ``batch_docs`` document texts, in order, from document ``start`` on.

    Raises GptMiniError when ``data.hf.text_field`` is not a column (naming the columns there are), or when
    the source fails while being read (a bad file, a lost connection).
    """
    if hf.text_field in (dataset.column_names or ()):
        dataset = dataset.select_columns([hf.text_field])  # other columns are never converted to Python
    if start:
        dataset = dataset.skip(start)
    batches = dataset.iter(batch_size=batch_docs)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as error:  # a malformed file or a dropped connection, in the middle of reading
            hint = OFFLINE_HINT if _is_offline(error) else "check the files, or run again to resume"
            raise GptMiniError(f"reading {describe(hf)} failed: {_first_line(error)}; {hint}.") from None
        if hf.text_field not in batch:
            raise GptMiniError(
                f"data.hf.text_field={hf.text_field!r} is not a column of {describe(hf)}; its columns are: "
                f"{', '.join(map(str, batch))}. Set data.hf.text_field to the one holding the text."
            )
        texts = batch[hf.text_field]
        yield [text if isinstance(text, str) else "" if text is None else str(text) for text in texts]


def val_mask(first: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """Which of documents ``first .. first + count - 1`` are validation text (see the module docstring)."""
    if fraction <= 0 or count == 0:
        return np.zeros(count, dtype=bool)
    blocks = range(first // VAL_BLOCK, (first + count - 1) // VAL_BLOCK + 1)
    draws = np.concatenate([np.random.default_rng([seed, block]).random(VAL_BLOCK) for block in blocks])
    offset = first - blocks[0] * VAL_BLOCK
    return draws[offset : offset + count] < fraction
