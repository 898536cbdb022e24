"""Corpora: find, download and verify the text a run trains on, and read it in pieces; the data settings.

One concern: which files are the corpus, and their text as a source of the cache writer
(``gptmini.data.shards``, which decides the validation split for every source). Imports only
``gptmini.common`` and ``gptmini.data.chat_template`` (to check ``data.template``); knows nothing of
tokenizers, caches, models or training. Decisions worth knowing:

- **Documents.** A corpus is a sorted list of files, one document each. A directory or glob never follows
  links to directories (a link to a parent folder would pull the same text in again and again) and lists a
  file reached by two paths (a file link, a hard link) once, so no text is counted twice.
- **Decoding.** Text is read in blocks and handed out in pieces cut where every tiktoken split pattern cuts
  anyway, so memory stays flat and the tokens equal those of the whole text. Bytes that are not UTF-8 become
  U+FFFD and are counted (``TextSource.invalid_utf8_bytes``), never silently dropped.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import itertools
import os
import re
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from gptmini.common import (
    GptMiniError,
    as_config,
    atomic_write_bytes,
    default_cache_dir,
    describe_os_error,
    remove_stale_temp_files,
    say,
)
from gptmini.data.chat_template import get_template

CORPORA = ("pystdlib", "shakespeare", "text", "hf", "chat")
DEFAULT_CACHE_DIR = default_cache_dir()  # a checkout's data/; for a wheel, the user's cache folder

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 20

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
class HFConfig:
    """A Hugging Face ``datasets`` source (the ``data.hf`` node, read when ``data.name=hf``).

    The first five fields are ``datasets.load_dataset``'s own arguments, passed as they are.
    """

    path: str | None = None
    """A Hub dataset ("HuggingFaceFW/fineweb-edu"), or a builder for local files: json, parquet, arrow."""
    name: str | None = None
    """The Hub dataset's configuration ("sample-10BT"); null for none."""
    split: str = "train"
    """The split to read; validation is carved out of it (``data.val_fraction``, docs/data.md)."""
    data_files: Any = None
    """Local files for a builder: a path, a glob ("corpus/*.jsonl") or a list of them."""
    revision: str | None = None
    """A Hub revision (branch, tag or commit) to pin the data; null = the default branch."""
    text_field: str = "text"
    """The column that holds each document's text."""
    streaming: bool = True
    """Read as a stream (constant memory, no Arrow copy of the corpus); false downloads and converts first."""
    messages_field: str = "messages"
    """data=chat: the column that holds each conversation's list of {role, content} messages."""

    def __post_init__(self) -> None:
        if not isinstance(self.text_field, str) or not self.text_field:
            raise GptMiniError(f"data.hf.text_field={self.text_field!r} must name a column; try text.")
        if not isinstance(self.messages_field, str) or not self.messages_field:
            raise GptMiniError(
                f"data.hf.messages_field={self.messages_field!r} must name a column; try messages."
            )


# Tokens per shard file of a cache: 2**25 ids = 64 MiB as uint16, ~300 files for 10B tokens (a smaller
# corpus is one shard).
DEFAULT_SHARD_TOKENS = 2**25


@dataclass
class DataConfig:
    """Which corpus to train on and how to batch it (the ``data`` config group)."""

    name: str = "pystdlib"
    """The corpus: "pystdlib" (the running Python's standard library), "shakespeare", "text", "hf" or "chat"
    (conversations for fine-tuning; docs/data.md)."""
    path: str | None = None
    """shakespeare: a local copy of input.txt (skips the download); text: a file, directory or glob; chat: a
    .json or .jsonl file of records, or a directory or glob of them."""
    batch_size: int = 32
    """Sequences per batch."""
    val_fraction: float = 0.1
    """Held out for validation: the end of every 32 MiB of text (of all of a smaller corpus; docs/data.md)."""
    num_workers: int = 0
    """DataLoader worker processes; 0 loads in the main process (fast enough for memmapped tokens)."""
    cache_dir: str | None = None
    """Where token caches and downloads go; default: the repository's data/ folder (not the cwd)."""
    hf: HFConfig | None = None
    """data.name=hf: the Hugging Face source (``HFConfig``); unused by the other corpora."""
    max_tokens: int | None = None
    """hf only: keep this many tokens, train and validation shared by val_fraction; null = all."""
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    """Tokens per shard file of the cache (a smaller corpus is a one-shard cache)."""
    template: str = "chat"
    """chat only: how a conversation is written as text: "chat" or "alpaca" (data/chat_template.py)."""
    mask_prompt: bool = True
    """chat only: the loss covers the assistant's replies (and each reply's end token) only; false = every
    token but padding."""
    epochs: int | None = None
    """chat only: train this many passes over the training conversations (sets the step count instead of
    trainer.max_steps); null = trainer.max_steps."""
    split_seed: int = 1337
    """chat only: seeds which records are validation (a fixed choice, independent of the training seed)."""

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
        if isinstance(self.hf, Mapping):
            self.hf = as_config(dict(self.hf), HFConfig, "data.hf")
        if self.name == "hf" and (self.hf is None or not self.hf.path):
            raise GptMiniError(
                "data=hf needs data.hf.path: a Hub dataset (data.hf.path=HuggingFaceFW/fineweb-edu) or a "
                "builder with local files (data.hf.path=json data.hf.data_files=corpus/*.jsonl)."
            )
        if self.max_tokens is not None and self.name != "hf":
            raise GptMiniError(
                f"data.max_tokens={self.max_tokens} only applies to data=hf; leave it null for "
                f"data={self.name} (cut the text itself instead)."
            )
        self._check_chat()
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise GptMiniError(f"data.max_tokens={self.max_tokens!r} must be an integer >= 1, or null.")
        if not isinstance(self.shard_tokens, int) or self.shard_tokens < 1:
            raise GptMiniError(f"data.shard_tokens={self.shard_tokens!r} must be a positive integer.")

    def _check_chat(self) -> None:
        """data=chat's source and settings; elsewhere its settings are refused (they would do nothing)."""
        if self.name != "chat":
            chat_only = {"template": "chat", "mask_prompt": True, "epochs": None, "split_seed": 1337}
            for key, default in chat_only.items():
                if getattr(self, key) != default:
                    raise GptMiniError(
                        f"data.{key}={getattr(self, key)!r} only applies to data=chat; leave it out for "
                        f"data={self.name}."
                    )
            return
        get_template(self.template)  # an unknown name: one line naming the known ones
        has_hf = self.hf is not None and bool(self.hf.path)
        if bool(self.path) == has_hf:
            raise GptMiniError(
                "data=chat needs exactly one source: data.path=FILE.json, FILE.jsonl, DIRECTORY or GLOB of "
                "records, or a Hugging Face dataset data.hf.path=... (e.g. data.hf.path=json "
                "data.hf.data_files=chats.jsonl)."
            )
        if not isinstance(self.mask_prompt, bool):
            raise GptMiniError(f"data.mask_prompt={self.mask_prompt!r} must be true or false.")
        if self.epochs is not None and (
            not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1
        ):
            raise GptMiniError(f"data.epochs={self.epochs!r} must be an integer >= 1, or null.")
        if not isinstance(self.split_seed, int) or isinstance(self.split_seed, bool) or self.split_seed < 0:
            raise GptMiniError(f"data.split_seed={self.split_seed!r} must be a non-negative integer.")


def cache_root(data: DataConfig) -> Path:
    """The folder holding all caches and downloads."""
    return Path(data.cache_dir).expanduser() if data.cache_dir else DEFAULT_CACHE_DIR


# ------------------------------------------------------------------------------------------------------------
# Corpora: each resolves to a sorted list of files, one document per file.


def resolve_corpus(data: DataConfig) -> TextSource:
    """The files of the configured text corpus (downloading Tiny Shakespeare if needed), as a source."""
    if data.name == "pystdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return TextSource("pystdlib", _pystdlib_files(root), f"Python standard library at {root}")
    if data.name == "shakespeare":
        path = _shakespeare_file(data)
        return TextSource("shakespeare", [path], f"Tiny Shakespeare at {path}")
    return TextSource("text", _text_files(data.path), f"text files from {data.path}")


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
            say(
                f"{path} is not the reference Tiny Shakespeare (sha256 differs); using it anyway, but its "
                "validation losses will not compare with published ones"
            )
        return path
    path = cache_root(data) / "shakespeare" / "input.txt"
    if path.is_file() and _sha256_file(path) == SHAKESPEARE_SHA256:
        return path
    _download_shakespeare(path)
    return path


def _download_shakespeare(path: Path) -> None:
    say(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL}")
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
    try:
        remove_stale_temp_files(path.parent)  # left by a download killed mid-write
        atomic_write_bytes(path, content)  # fsynced, then renamed: readers see no file or the whole file
    except OSError as exc:
        raise GptMiniError(
            f"{describe_os_error(exc, 'Tiny Shakespeare')}; set data.cache_dir=/a/writable/folder with free "
            "space, or pass data.path=/path/to/input.txt"
        ) from None


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def _walk(root: Path, hidden: bool = False) -> Iterator[tuple[Path, tuple[str, ...]]]:
    """``(path, parts relative to root)`` of every entry but folders under ``root``.

    Links to folders are never followed (a link to a parent would list the tree again and again); links to
    files are listed. Hidden entries (a name starting with ".") are skipped unless ``hidden``.
    """
    for folder, subfolders, names in os.walk(root):  # followlinks=False
        if not hidden:
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = Path(os.path.relpath(folder, root)).parts
        relative = () if relative == (".",) else relative
        for name in names:
            if hidden or not name.startswith("."):
                yield Path(folder, name), (*relative, name)


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether path ``parts`` match glob ``pattern`` parts, as ``glob.glob(recursive=True)`` matches them.

    ``**`` spans zero or more names; a name starting with "." only matches a pattern part that does too.
    """
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        if _glob_match(parts, rest):
            return True
        return bool(parts) and not parts[0].startswith(".") and _glob_match(parts[1:], pattern)
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatch(parts[0], head) and _glob_match(parts[1:], rest)


def _glob_files(spec: str) -> list[Path]:
    """The files a glob names, found by walking like the directory form: no links to folders followed.

    A matched folder stands for all the (non-hidden) files under it, as a directory ``data.path`` does.
    """
    parts = Path(os.path.expanduser(spec)).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root, pattern = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
    if not root.is_dir():
        return []
    hidden = any(part.startswith(".") for part in pattern)
    files = []
    for path, relative in _walk(root, hidden):
        for n in range(len(relative), 0, -1):
            below = relative[n:]
            if not any(name.startswith(".") for name in below) and _glob_match(relative[:n], pattern):
                files.append(path)
                break
    return files


def _text_files(spec: str) -> list[Path]:
    """The files named by a file, directory (recursive, hidden entries skipped) or glob; binaries skipped.

    Files are sorted by path; a file reached again by another path (a link) is listed once, at its first
    path, so a corpus never holds the same text twice (see the module docstring).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = [p for p, _ in _walk(path)]
    elif glob.has_magic(spec):
        candidates = _glob_files(spec)
        if not candidates:
            raise GptMiniError(f"data.path={spec!r} matches no files; check the pattern.")
    else:
        raise GptMiniError(f"data.path={spec!r} does not exist; give a text file, a directory or a glob.")
    # is_file() follows a link to the file it names, and is False for a broken link.
    files, again = each_once([p for p in sorted(set(candidates), key=lambda p: p.as_posix()) if p.is_file()])
    text, binary = [], []
    for path in files:
        (binary if _is_binary(path) else text).append(path)
    if binary:
        say(f"skipped {len(binary)} binary file(s) (NUL bytes) under {spec}: {some_paths(binary)}")
    if again:
        say(
            f"skipped {len(again)} file(s) under {spec} that are links to a file already in the corpus: "
            f"{some_paths(again)}"
        )
    if not text:
        raise GptMiniError(f"data.path={spec!r} holds no text files; point it at your text.")
    return text


def each_once(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """``paths`` with each file once (the first path to it), and the others: a file named again (by a link, a
    second pattern, the same path) would be read twice."""
    seen, once, again = set(), [], []
    for path in paths:
        stat = path.stat()
        (again if (stat.st_dev, stat.st_ino) in seen else once).append(path)
        seen.add((stat.st_dev, stat.st_ino))
    return once, again


def some_paths(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")


def fingerprint(files: list[Path]) -> str:
    """A hash of the corpus contents in document order (names and mtimes don't change the tokens)."""
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(f"{path.stat().st_size}:{_sha256_file(path)}\n".encode())
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise GptMiniError(
                f"cannot read {path} ({reason}); fix its permissions or leave it out of data.path."
            ) from None
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Reading: decoded text pieces, with invalid UTF-8 replaced and counted.

# Undecodable bytes arrive as lone surrogates U+DC80..U+DCFF (Python's "surrogateescape"), one per byte, so a
# reader can count them before turning each into U+FFFD. Text read from a file never holds such surrogates.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def read_pieces(path: Path, clean: Callable[[str], str]) -> Iterator[str]:
    """The text of a file in pieces of about PIECE_CHARS, cut at safe points (so memory stays flat and the
    tokens equal those of the whole text); ``clean`` gets the decoded text first (``TextSource._clean``)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    buffer = ""
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK_BYTES):
            buffer += clean(decoder.decode(block))
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
    buffer += clean(decoder.decode(b"", final=True))
    if buffer:
        yield buffer


class TextSource:
    """A text corpus: its ``files`` in document order, each a document read in pieces; a source of the cache
    writer (``gptmini.data.shards``)."""

    empty_hint = None  # an empty corpus is refused before any build (see ``gptmini.data.token_cache``)

    def __init__(self, name: str, files: list[Path], description: str) -> None:
        self.name = self.folder = name
        self.files, self.description = files, description
        self.file_bytes = sum(path.stat().st_size for path in files)
        self.invalid = 0  # bytes that were not UTF-8, in the last pass over the files

    @cached_property
    def fingerprint(self) -> dict:
        """What identifies the documents, for the cache key: their contents (hashed when first asked)."""
        return {"corpus": self.name, "contents": fingerprint(self.files)}

    def open(self) -> None:
        """Nothing to load: the files are read as the items go."""

    def documents(self) -> None:
        return None  # files differ too much in size for a count to estimate the total; file_bytes does

    def invalid_utf8_bytes(self) -> int:
        return self.invalid

    def _clean(self, text: str) -> str:
        """``text`` with each undecodable byte (a lone surrogate) replaced by U+FFFD, counted."""
        if _ESCAPED_BYTE.search(text):
            text, replaced = _ESCAPED_BYTE.subn("\ufffd", text)
            self.invalid += replaced
        return text

    def items(self, start: int) -> Iterator[tuple[bool, str]]:
        """``(starts_document, text)`` pieces from piece ``start`` on; the pieces skipped are read again
        (decoding is far cheaper than encoding) so the invalid UTF-8 count covers them too."""
        self.invalid = 0  # each pass counts afresh
        pieces = (
            (n == 0, text) for path in self.files for n, text in enumerate(read_pieces(path, self._clean))
        )
        return itertools.islice(pieces, start, None)
