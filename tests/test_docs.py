"""docs/errors.md maps every user-facing message to the test that holds it: keep those references true."""

import re

from conftest import REPO_ROOT

ERRORS = REPO_ROOT / "docs" / "errors.md"


def table_rows(text: str) -> list[str]:
    """The tables' rows, their header rows (last cell "test") left out."""
    return [line for line in text.splitlines() if line.startswith("| ") and not line.endswith("| test |")]


def test_every_test_named_in_errors_md_exists():
    text = ERRORS.read_text(encoding="utf-8")
    references = set(re.findall(r"(test_\w+\.py)::(\w+)", text))
    assert len(references) > 100
    missing = []
    for file, name in sorted(references):
        path = REPO_ROOT / "tests" / file
        if not path.is_file() or not re.search(rf"^(async )?def {name}\b", path.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/errors.md names tests that do not exist: {missing}"


def test_errors_md_counts_its_rows_and_each_names_a_test():
    text = ERRORS.read_text(encoding="utf-8")
    rows = table_rows(text)
    stated = int(re.search(r"In all, (\d+) rows", text).group(1))
    assert stated == len(rows)
    last_cells = {row: row.rstrip(" |").rsplit("| ", 1)[-1] for row in rows}
    named = re.compile(r"test_\w+\.py::|^same|by hand")
    untested = [row for row, cell in last_cells.items() if not named.search(cell)]
    assert not untested, untested
