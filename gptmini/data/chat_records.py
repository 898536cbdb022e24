"""data=chat's records: conversations read from .json/.jsonl files or a Hugging Face dataset, checked.

One concern: turning ``data.path`` (a file, a folder or a glob of .json and .jsonl files) or ``data.hf`` (a
dataset with a messages column) into a list of checked conversations, each a ``Record`` that knows where it
came from. A record is a conversation ``{"messages": [{"role", "content"}, ...]}`` or an Alpaca record
``{"instruction", "input", "output"}`` (``chat_template.alpaca_messages``); every conversation must end with
an assistant turn (what is learned). A bad record is a one-line GptMiniError naming its file and line (for a
.json list, its index and line) and what is wrong, so it can be fixed where it is. Imports
``gptmini.common``, ``gptmini.data.corpus`` and ``gptmini.data.chat_template`` only (``hf_source`` when a
dataset is read). Chat data is small next to a pretraining corpus: the records are held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from gptmini.common import GptMiniError
from gptmini.data.chat_template import alpaca_messages, check_messages
from gptmini.data.corpus import _text_files, fingerprint

SUFFIXES = (".json", ".jsonl")


@dataclass
class Record:
    """One checked conversation: ``[(role, content), ...]`` ending with an assistant turn, and where it is."""

    messages: list[tuple[str, str]]
    where: str


def record_messages(record: object, where: str, messages_field: str = "messages") -> list[tuple[str, str]]:
    """The conversation of one record (a conversation or an Alpaca record), checked; ``where`` names it."""
    if not isinstance(record, Mapping):
        kind = "null" if record is None else f"a {type(record).__name__}"
        raise GptMiniError(f"{where}: the record is {kind}, not an object with a {messages_field!r} field.")
    if messages_field in record:
        return check_messages(record[messages_field], where, ends_with="assistant")
    if "instruction" in record or "output" in record:
        return check_messages(alpaca_messages(record, where), where, ends_with="assistant")
    raise GptMiniError(
        f"{where}: the record has no {messages_field!r} field (a conversation) and no 'instruction' and "
        "'output' fields (an Alpaca record); give one of the two."
    )


# ------------------------------------------------------------------------------------------------------------
# Files


def chat_files(spec: str) -> list[Path]:
    """The .json and .jsonl files ``data.path`` names (a file, a folder or a glob), in path order."""
    files = [path for path in _text_files(spec) if path.suffix in SUFFIXES]
    if not files:
        raise GptMiniError(
            f"data.path={spec!r} names no .json or .jsonl file; data=chat reads records from such files."
        )
    return files


def _line(text: str, at: int) -> int:
    return text.count("\n", 0, at) + 1


def _invalid(path: Path, error: json.JSONDecodeError, line: int | None = None) -> GptMiniError:
    where = f"{path}:{line or error.lineno}"
    return GptMiniError(f"{where}: invalid JSON ({error.msg}); fix or remove that record.")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise GptMiniError(f"{path}: not UTF-8 (byte {error.start}); save the file as UTF-8.") from None
    except OSError as error:
        raise GptMiniError(f"cannot read {path} ({error.strerror or error}); fix its permissions.") from None


def jsonl_records(path: Path, messages_field: str = "messages") -> list[Record]:
    """The records of a JSON lines file, one a line (blank lines are skipped), named ``file:line``."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _invalid(path, error, number) from None
        where = f"{path}:{number}"
        records.append(Record(record_messages(record, where, messages_field), where))
    return records


def json_records(path: Path, messages_field: str = "messages") -> list[Record]:
    """The records of a .json file holding a list of them (or one record), named by index and line.

    The list is read one element at a time (``raw_decode``), so each record's line is known.
    """
    text = _read_text(path)
    decoder = json.JSONDecoder()
    at = _skip_space(text, 0)
    if not text.startswith("[", at):  # one record alone
        try:
            record, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            raise _invalid(path, error) from None
        if _skip_space(text, end) != len(text):
            raise GptMiniError(
                f"{path}:{_line(text, end)}: unexpected text after the record; a .json file holds a list of "
                "records (or use .jsonl, one record a line)."
            )
        where = f"{path}:{_line(text, at)}"
        return [Record(record_messages(record, where, messages_field), where)]
    records, at = [], _skip_space(text, at + 1)
    while not text.startswith("]", at):
        try:
            record, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            raise _invalid(path, error) from None
        where = f"{path}:{_line(text, at)} (record {len(records)})"
        records.append(Record(record_messages(record, where, messages_field), where))
        at = _skip_space(text, end)
        if text.startswith(",", at):
            at = _skip_space(text, at + 1)
        elif not text.startswith("]", at):
            raise GptMiniError(
                f"{path}:{_line(text, at)}: invalid JSON (expected ',' or ']' after record "
                f"{len(records) - 1}); fix the file."
            )
    if _skip_space(text, at + 1) != len(text):
        raise GptMiniError(f"{path}:{_line(text, at + 1)}: unexpected text after the list of records.")
    return records


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def file_records(files: list[Path], messages_field: str = "messages") -> list[Record]:
    """Every record of ``files``, in file order."""
    records = []
    for path in files:
        read = jsonl_records if path.suffix == ".jsonl" else json_records
        records += read(path, messages_field)
    return records


# ------------------------------------------------------------------------------------------------------------
# Sources: what the cache builder reads, and what identifies it for the key


class ChatFiles:
    """``data.path``'s records."""

    def __init__(self, data) -> None:
        self.files = chat_files(data.path)
        self.folder = "chat/files"
        self.description = f"conversations from {data.path}"
        self.fingerprint = {"chat_files": fingerprint(self.files)}

    def records(self) -> list[Record]:
        return file_records(self.files)


class ChatDataset:
    """``data.hf``'s records: a Hugging Face dataset whose ``data.hf.messages_field`` column holds them."""

    def __init__(self, data) -> None:
        from gptmini.data.hf_source import HFSource

        self.hf = data.hf
        source = HFSource(data)  # its folder name and fingerprint (the settings and the local files' stamps)
        self.folder = "chat/" + source.folder
        self.description = "conversations from " + source.description
        self.fingerprint = {**source.fingerprint, "messages_field": self.hf.messages_field}

    def records(self) -> list[Record]:
        from gptmini.data import hf_records
        from gptmini.data.hf_source import load_hf_dataset, local_files

        # Not streamed: chat data is small, and a map-style dataset knows its columns before it is read.
        dataset = load_hf_dataset(replace(self.hf, streaming=False), check_text=False)
        field = self.hf.messages_field
        if field not in (dataset.column_names or ()):
            raise GptMiniError(
                f"data.hf.messages_field={field!r} is not a column of {self.hf.path}; its columns are: "
                f"{', '.join(map(str, dataset.column_names or ()))}. Set data.hf.messages_field."
            )
        files = [p for p in local_files(self.hf) if p.stat().st_size > 0]
        records = []
        for index, row in enumerate(dataset.select_columns([field])):
            where = f"row {index} of {self.hf.path}"
            try:
                records.append(Record(record_messages(row, where, field), where))
            except GptMiniError:
                # Locating a row in the files reads them up to it: only worth it for the bad one.
                located = hf_records.locate(files, index) if files else None
                if located is None:
                    raise
                record_messages(row, located, field)  # raises again, naming the file and line
                raise
        return records


def chat_source(data) -> ChatFiles | ChatDataset:
    """data=chat's source: its files, or its Hugging Face dataset."""
    return ChatDataset(data) if data.hf is not None and data.hf.path else ChatFiles(data)
