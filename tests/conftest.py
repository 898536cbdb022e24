"""Shared test fixtures.

Most tests build their own tiny data. The few that read ../shared (the reference corpora, tiktoken's GPT-2
files) skip with the reason when it is absent, so the suite also passes on a fresh clone.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

# tiktoken downloads the GPT-2 files on first use; offline, point it at the copy in ../shared when there is one.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


@pytest.fixture
def shakespeare_path() -> Path:
    path = SHARED / "data" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"reference corpus not found at {path}")
    return path


@pytest.fixture
def verdict_path() -> Path:
    path = SHARED / "data" / "the-verdict.txt"
    if not path.is_file():
        pytest.skip(f"reference corpus not found at {path}")
    return path


@pytest.fixture
def gpt2_available() -> None:
    """Skip unless tiktoken's GPT-2 files can be loaded without a network."""
    import tiktoken

    try:
        tiktoken.get_encoding("gpt2")
    except Exception as exc:  # noqa: BLE001 - any failure means the files are not reachable
        pytest.skip(f"tiktoken's gpt2 files are not available offline ({type(exc).__name__})")
