"""Hugging Face ``datasets`` sources (``data=hf``): load one, and read it as a stream of documents.

One concern: turning ``data.hf`` into document texts (the cache writer, ``gptmini.data.shards``, splits them
like any other source's). Imports ``gptmini.common``, ``gptmini.data.corpus`` and ``.hf_records`` only;
``datasets`` is imported when a source is opened, so the other corpora never need it. docs/data.md says
more of each decision:

- ``data.hf.path/name/split/data_files/revision`` go to ``datasets.load_dataset`` as they are, streaming by
  default, so a 10B-token corpus is never held in memory or copied to Arrow.
- Local files are fingerprinted by path, size and mtime, not content (hashing 30 GB of parquet would take
  minutes per run); a Hub dataset by name, configuration, split and ``revision``.
- ``data.hf.data_files`` is resolved here and ``datasets`` is handed the list, so what is read is what is
  keyed: a file named twice is read once, and empty files (which the json reader fails on) are left out.
- Every document must be a string: ``hf_records`` checks the local files before ``datasets`` can turn a
  number or an object into text, and names a bad record by its file and line or row.
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

from gptmini.common import GptMiniError
from gptmini.data import hf_records
from gptmini.data.corpus import HFConfig, each_once, some_paths

# Records per read from datasets (converted to Python together).
BATCH_DOCS = 512
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


def _local_base(hf: HFConfig) -> Path | None:
    """Where the source's files live on this machine: the working folder for a builder (json, parquet, ...),
    the folder ``data.hf.path`` names, or None for a Hub dataset (its data_files are paths in its repo)."""
    if hf.path in LOCAL_BUILDERS:
        return Path(".")
    folder = Path(hf.path).expanduser()
    return folder if folder.is_dir() else None


def local_files(hf: HFConfig) -> list[Path]:
    """The local files the source reads, in reading order, each file once; [] for a Hub dataset.

    ``data.hf.data_files`` patterns are resolved here, against the working folder (a builder) or the folder
    ``data.hf.path`` names (where ``datasets`` would resolve them), and ``datasets`` is handed this list, so
    what is read is what is keyed; a local folder without data_files gives the files ``datasets`` infers for
    the split. A pattern that matches nothing is an error here, where ``datasets`` would fail obscurely.
    """
    base = _local_base(hf)
    if base is None:
        return []
    patterns = _patterns(hf.data_files)
    if not patterns and hf.path not in LOCAL_BUILDERS:
        return each_once(_inferred_files(hf, base))[0]
    files = []
    for pattern in patterns:
        if "://" in pattern:
            continue  # hf://, https://, s3://: the loader fetches those
        expanded = str(base / os.path.expanduser(pattern))  # an absolute pattern stays as it is
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        matches = [Path(m) for m in matches if Path(m).is_file()]
        if not matches:
            raise GptMiniError(f"data.hf.data_files={pattern!r} matches no files; check the path or pattern.")
        files += matches
    return each_once(files)[0]


def _inferred_files(hf: HFConfig, folder: Path) -> list[Path]:
    """The files ``datasets`` reads for the split from a local folder given without data_files; every file
    under the folder when it cannot say (the loader then reports why)."""
    datasets = _import_datasets()
    try:
        builder = datasets.load_dataset_builder(str(folder), name=hf.name)
        return [Path(f) for f in builder.config.data_files[hf.split]]
    except Exception:  # noqa: BLE001 - a bad split, an unknown format: load_hf_dataset names it
        return sorted(p for p in folder.rglob("*") if p.is_file())


def _loader_data_files(hf: HFConfig) -> dict | None:
    """What ``datasets.load_dataset`` gets as data_files: the resolved local files (each once, empty ones
    left out) plus any remote patterns, for the split (a Hub dataset's: paths in its repository, as they are);
    None when data_files is not set."""
    patterns = _patterns(hf.data_files)
    if not patterns or _local_base(hf) is None:
        return {hf.split: patterns} if patterns else None
    local = [str(p) for p in local_files(hf) if p.stat().st_size > 0]
    return {hf.split: local + [p for p in patterns if "://" in p]}


def describe(hf: HFConfig) -> str:
    """A short human description of the source, for logs and meta.json."""
    what = hf.path + (f" ({hf.name})" if hf.name else "")
    if hf.data_files is not None:
        what += f" files {hf.data_files}"
    return f"Hugging Face dataset {what}, split {hf.split}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _is_offline(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error)
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"}) or (
        "offline" in text.lower() or "Couldn't reach" in text
    )


def load_hf_dataset(
    hf: HFConfig, setting: str = "data.hf.path", offline_hint: str = OFFLINE_HINT, check_text: bool = True
):
    """``datasets.load_dataset`` with ``data.hf``'s arguments; any failure is one GptMiniError line.

    ``setting`` and ``offline_hint`` word the message for another caller (the HellaSwag reader);
    ``check_text=False`` skips the check that ``text_field`` holds text (data=chat reads messages instead).
    """
    datasets = _import_datasets()
    files = local_files(hf)  # also names a pattern matching nothing
    remote = any("://" in p for p in _patterns(hf.data_files))
    if files and not remote and all(p.stat().st_size == 0 for p in files):  # datasets: a bare StopIteration
        setting = "data.hf.data_files" if hf.data_files is not None else "data.hf.path"
        raise GptMiniError(
            f"{describe(hf)} is empty: its {len(files)} file(s) hold 0 bytes ({some_paths(files)}); point "
            f"{setting} at files with documents."
        )
    problem = hf_records.check_files(_reading_order(hf), hf.text_field) if check_text else None
    if problem:  # before datasets turns it into text (see hf_records)
        raise GptMiniError(problem)
    data_files = _loader_data_files(hf)
    try:
        with _offline_unless_reachable(hf):
            arguments = {key: getattr(hf, key) for key in ("name", "split", "revision", "streaming")}
            return datasets.load_dataset(hf.path, data_files=data_files, **arguments)
    except Exception as error:  # datasets raises many types (offline, not found, bad split, ...)
        if _is_offline(error):
            raise GptMiniError(
                f"cannot load the dataset {setting}={hf.path!r}: offline and not cached "
                f"({_first_line(error)}); {offline_hint}."
            ) from None
        problem = hf_records.find_bad_record(_reading_order(hf), hf.text_field) if check_text else None
        if problem:  # a bad record in the first block fails already here
            raise GptMiniError(problem) from None
        raise GptMiniError(
            f"cannot load the dataset {setting}={hf.path!r} (name={hf.name!r}, split={hf.split!r}): "
            f"{_first_line(error)}. Check data.hf.path, data.hf.name, data.hf.split and data.hf.data_files."
        ) from None


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise GptMiniError(
            "data=hf needs the datasets package: pip install -e '.[datasets]' (or pip install datasets)."
        ) from None
    return datasets


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

    local = hf.path in LOCAL_BUILDERS or Path(hf.path).exists()
    if local or datasets.config.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def iter_documents(dataset: Any, hf: HFConfig, start: int) -> Iterator[str]:
    """The document texts, in order, from document ``start`` on (read in batches of BATCH_DOCS).

    Raises GptMiniError when ``data.hf.text_field`` is not a column (naming the columns there are), or when
    the source fails while being read (a bad file, a lost connection).
    """
    if hf.text_field in (dataset.column_names or ()):
        dataset = dataset.select_columns([hf.text_field])  # other columns are never converted to Python
    if start:
        dataset = dataset.skip(start)
    batches = dataset.iter(batch_size=BATCH_DOCS)
    index = start  # of the batch's first document, in reading order
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as error:  # a malformed file or a dropped connection, in the middle of reading
            raise GptMiniError(_read_failed(hf, error)) from None
        if hf.text_field not in batch:
            raise GptMiniError(
                f"data.hf.text_field={hf.text_field!r} is not a column of {describe(hf)}; its columns are: "
                f"{', '.join(map(str, batch))}. Set data.hf.text_field to the one holding the text."
            )
        texts = batch[hf.text_field]
        for offset, text in enumerate(texts):
            if not isinstance(text, str):
                problem = hf_records.not_text(hf.text_field, text)
                raise GptMiniError(f"{_where(hf, index + offset)}: {problem}")
        index += len(texts)
        yield from texts


def _read_failed(hf: HFConfig, error: BaseException) -> str:
    """The message for ``datasets`` failing mid-read: the bad record when one is found, else its own words."""
    problem = hf_records.find_bad_record(_reading_order(hf), hf.text_field)
    if problem:
        return problem
    hint = OFFLINE_HINT if _is_offline(error) else "check the files, or run again to resume"
    return f"reading {describe(hf)} failed: {_first_line(error)}; {hint}."


def _reading_order(hf: HFConfig) -> list[Path]:
    """The local files in the order ``datasets`` reads them; [] when that is not known (remote files)."""
    if _local_base(hf) is None or any("://" in p for p in _patterns(hf.data_files)):
        return []
    return [p for p in local_files(hf) if p.stat().st_size > 0]


def _where(hf: HFConfig, index: int) -> str:
    """Where document ``index`` (from 0, in reading order) is: its file and line or row, else its number."""
    found = hf_records.locate(_reading_order(hf), index)
    return found or f"document {index + 1} (counting from 1 in reading order) of {describe(hf)}"


class HFSource:
    """``data=hf`` as a source of the cache writer (``gptmini.data.shards``): each record a document, in
    reading order; the dataset is loaded by ``open``, under the build's lock."""

    empty_hint = "check data.hf.text_field and data.hf.split."

    def __init__(self, data) -> None:
        self.hf, hf, self.dataset = data.hf, data.hf, None
        # A readable folder for the source's caches: hf/HuggingFaceFW_fineweb-edu_sample-10BT, hf/json.
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{hf.path}_{hf.name or ''}")
        self.folder = f"hf/{name.strip('._') or 'hf'}"
        self.description = describe(hf)
        # What identifies the documents (see the module docstring): the settings, and the local files' stamps.
        stamps = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n" for p in local_files(hf)]
        settings = {key: getattr(hf, key) for key in ("path", "name", "split", "revision", "text_field")}
        local = hashlib.sha256("".join(stamps).encode()).hexdigest()
        self.fingerprint = {**settings, "data_files": _patterns(hf.data_files), "local_files": local}
        self.file_bytes = sum(p.stat().st_size for p in local_files(hf))

    def open(self) -> None:
        self.dataset = load_hf_dataset(self.hf)

    def documents(self) -> int | None:
        """How many documents the split holds, when the dataset or its files say so cheaply; else None."""
        try:
            return len(self.dataset)  # a map-style (not streaming) dataset
        except TypeError:
            pass
        splits = getattr(getattr(self.dataset, "info", None), "splits", None) or {}
        if self.hf.split in splits and splits[self.hf.split].num_examples:
            return int(splits[self.hf.split].num_examples)
        if self.hf.path == "parquet":
            rows = [hf_records.parquet_rows(path) for path in local_files(self.hf)]
            return None if None in rows else sum(rows)
        return None

    def invalid_utf8_bytes(self) -> int:
        return 0  # datasets refuses text that is not UTF-8 (see hf_records)

    def items(self, start: int) -> Iterator[tuple[bool, str]]:
        """``(True, text)`` for each document from document ``start`` on."""
        return ((True, text) for text in iter_documents(self.dataset, self.hf, start))
