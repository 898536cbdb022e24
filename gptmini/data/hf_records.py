"""The records of a ``data=hf`` source's local files: check that every document is text, and name a bad one.

One concern: a record that is not a document (not text; a line that is not JSON or not UTF-8) is refused with
its file and line, record or row, never turned into text. Imports nothing from gptmini; ``hf_source`` hands it
the files in the order ``datasets`` reads them. Why a check of our own: ``datasets`` infers the text column's
type from the first block it reads and casts every later block to it, so a later file of numbers or objects
becomes "5" or '{"a": 1}', and a JSON lines file that mixes types is re-read through pandas with every string
JSON-quoted ('"doc 1"'): silently wrong text. So before reading, each file's text column is checked: a parquet
file by its schema (its footer), a JSON lines file by pyarrow parsing the text column as strings (a C++ pass,
some 200 MB/s per core, a fraction of tokenizing's cost), a JSON array by reading it (as ``datasets`` does
anyway). Whatever still arrives as a non-string (a null, a Hub dataset's value) is refused where the documents
are read (``hf_source.iter_documents``) and located here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# pyarrow's JSON blocks; a record longer than a block is checked line by line in Python instead.
JSON_BLOCK_BYTES = 2**24


def not_text(field: str, value: Any) -> str:
    """What is wrong with a record whose ``field`` holds ``value`` instead of a text, and the fix."""
    if value is None:
        held = "null (or is missing)"
    elif isinstance(value, bool):
        held = f"a boolean ({value})"
    elif isinstance(value, (int, float)):
        held = f"a number ({value!r})"
    else:
        shown = repr(value)
        held = f"a {type(value).__name__} ({shown[:40]}{'...' if len(shown) > 40 else ''})"
    return (
        f"the field {field!r} holds {held}, not text. Every document must be a string: fix or remove that "
        "record, or set data.hf.text_field to the column that holds the text."
    )


def check_files(files: list[Path], field: str) -> str | None:
    """The first bad record of ``files`` (see the module docstring) as one message, or None."""
    for path in files:
        kind = _kind(path)
        if kind == "parquet":
            problem = _check_parquet(path, field)
        elif kind == "lines" and not _json_column_is_text(path, field):
            problem = find_bad_record([path], field)
        elif kind == "array":
            problem = _check_array(path, field)
        else:
            problem = None
        if problem:
            return problem
    return None


def find_bad_record(files: list[Path], field: str) -> str | None:
    """The first line of the JSON lines files among ``files`` that is not UTF-8, not JSON, not an object, or
    has no text in ``field``, as one message; None when there is none."""
    for path in files:
        for number, line in _lines(path) if _kind(path) == "lines" else ():
            where = f"{path} line {number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                return f"{where} is not UTF-8 (byte {error.start + 1} of the line); save the file as UTF-8."
            except json.JSONDecodeError as error:
                reason = error.msg.removesuffix(" at")  # "Invalid control character at"
                return f"{where} is not JSON ({reason} at column {error.colno}); fix or remove that line."
            problem = _record_problem(record, field)
            if problem:
                return f"{where}{problem}"
    return None


def locate(files: list[Path], index: int) -> str | None:
    """ "<file> line <n>", "<file> record <n>" or "<file> row <n>" for record ``index`` (from 0) of ``files``
    read in order; None when a file before it cannot be counted (csv, arrow, text, compressed)."""
    remaining = index
    for path in files:
        kind = _kind(path)
        if kind == "lines":
            for number, _ in _lines(path):
                if remaining == 0:
                    return f"{path} line {number}"
                remaining -= 1
            continue
        if kind == "array":
            rows, name = len(_json_array(path) or ()), "record"
        elif kind == "parquet":
            rows, name = parquet_rows(path), "row"
        else:
            return None
        if rows is None:
            return None
        if remaining < rows:
            return f"{path} {name} {remaining + 1}"
        remaining -= rows
    return None


def _record_problem(record: Any, field: str) -> str | None:
    """``" is not a JSON object; …"`` or ``": the field …"`` for a record that is no document, else None."""
    if not isinstance(record, dict):
        return ' is not a JSON object; each record must be one, e.g. {"text": "..."}.'
    if not isinstance(record.get(field), str):
        return f": {not_text(field, record.get(field))}"
    return None


def parquet_rows(path: Path) -> int | None:
    """A parquet file's rows, from its footer; None when it cannot be read (the loader then names it)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - a damaged file
        return None


def _check_parquet(path: Path, field: str) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:  # noqa: BLE001 - a damaged file: the loader names it
        return None
    if field not in schema.names:
        return None  # a missing column arrives as nulls, refused where documents are read
    kind = schema.field(field).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return None
    # The whole column has another type: its first value shows what.
    first = pq.ParquetFile(path).read_row_group(0, columns=[field]).column(0)[0].as_py()
    return f"{path} row 1: {not_text(field, first)}"


def _kind(path: Path) -> str | None:
    """How the records of ``path`` can be read here: "parquet"; "lines" for JSON lines (.jsonl, .ndjson, or a
    .json file whose first line is a whole object); "array" for a .json file holding one JSON document; None
    for anything else (csv, arrow, text, compressed files), which is not looked into."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "lines"
    if not name.endswith(".json"):
        return None
    first = next((line for _, line in _lines(path)), b"")
    try:
        return "lines" if isinstance(json.loads(first), dict) else "array"
    except ValueError:
        return "array"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of each non-blank line: the rows pyarrow (and so datasets) reads."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def _json_array(path: Path) -> list | None:
    """The records of a .json file holding one JSON array, read whole as ``datasets`` reads it; None when it
    holds something else (an object, invalid JSON: the loader names that)."""
    try:
        records = json.loads(path.read_bytes())
    except ValueError:
        return None
    return records if isinstance(records, list) else None


def _check_array(path: Path, field: str) -> str | None:
    for number, record in enumerate(_json_array(path) or (), start=1):
        problem = _record_problem(record, field)
        if problem:
            return f"{path} record {number}{problem}"
    return None


def _json_column_is_text(path: Path, field: str) -> bool:
    """Whether pyarrow reads every ``field`` of a JSON lines file as a string (or null) without error."""
    import pyarrow as pa
    import pyarrow.json as pj

    parse = pj.ParseOptions(
        explicit_schema=pa.schema([(field, pa.string())]), unexpected_field_behavior="ignore"
    )
    blocks = pj.ReadOptions(block_size=JSON_BLOCK_BYTES)
    try:
        for _ in pj.open_json(path, read_options=blocks, parse_options=parse):
            pass
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a non-string, bad JSON, or a record past a block
        return False
    return True
