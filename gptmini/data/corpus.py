"""Corpora: find, download and verify the text a run trains on, and read it as train/val pieces.

A corpus is a sorted list of files, one document per file. Owns the train/val split (by raw bytes) and
the text decoding; knows nothing about tokenizers or caches.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import logging
import os
import re
import sysconfig
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptmini.common import GptMiniError

log = logging.getLogger(__name__)

CORPORA = ("pystdlib", "shakespeare", "text")
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / "data"

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

# Undecodable bytes arrive as lone surrogates U+DC80..U+DCFF (Python's "surrogateescape"), one per byte, so a
# reader can count them before turning each into U+FFFD. Text read from a file never holds such surrogates.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class InvalidUtf8Counter:
    """Replaces each byte that is not valid UTF-8 by U+FFFD and counts them, for one tokenizing pass."""

    def __init__(self) -> None:
        self.bytes_replaced = 0

    def clean(self, text: str) -> str:
        if not _ESCAPED_BYTE.search(text):
            return text
        text, replaced = _ESCAPED_BYTE.subn("\ufffd", text)
        self.bytes_replaced += replaced
        return text


def split_offset(files: list[Path], val_fraction: float) -> int:
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


def _read_region(path: Path, start: int, end: int, invalid: InvalidUtf8Counter) -> Iterator[str]:
    """Yield the text of bytes [start, end) of a file in pieces of about PIECE_CHARS, cut at safe points."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    buffer = ""
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            block = f.read(min(READ_BLOCK_BYTES, remaining))
            if not block:
                break
            remaining -= len(block)
            buffer += invalid.clean(decoder.decode(block))
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
    buffer += invalid.clean(decoder.decode(b"", final=True))
    if buffer:
        yield buffer


def iter_pieces(
    files: list[Path], val_fraction: float, invalid: InvalidUtf8Counter | None = None
) -> Iterator[tuple[str, bool, str]]:
    """Yield ``(split, starts_document, text)`` for the whole corpus, train split first.

    ``starts_document`` is True on the first piece of each file within a split: a separator goes there.
    Bytes that are not UTF-8 become U+FFFD, counted in ``invalid`` when one is given.
    """
    invalid = invalid or InvalidUtf8Counter()
    split_at = split_offset(files, val_fraction)
    offset = 0
    for path in files:
        size = path.stat().st_size
        cut = min(max(split_at - offset, 0), size)
        if 0 < cut < size:
            cut = _char_boundary(path, cut)
        for split, start, end in (("train", 0, cut), ("val", cut, size)):
            first = True
            for text in _read_region(path, start, end, invalid) if end > start else ():
                yield split, first, text
                first = False
        offset += size
