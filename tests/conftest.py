"""Shared test fixtures.

Most tests build their own tiny data. The few that read ../shared (the reference corpora, tiktoken's GPT-2
files) skip with the reason when it is absent, so the suite also passes on a fresh clone.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

# tiktoken downloads the GPT-2 files on first use; offline, use the copy in ../shared when there is one.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


@pytest.fixture
def shakespeare_path() -> Path:
    path = SHARED / "data" / "tinyshakespeare.txt"
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


CONFIG_DIR = str(REPO_ROOT / "configs")


def compose_train(overrides: list[str] | None = None):
    """Compose configs/train.yaml exactly as train.py does, with extra overrides."""
    from hydra import compose, initialize_config_dir

    from gptmini.training.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides or [])


def write_corpus(folder: Path, n_bytes: int = 60_000, seed: int = 0) -> Path:
    """A small synthetic corpus with real structure (so a model can learn it), written by the test."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "ünïcode", "data", "model"]
    lines = []
    size = 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".\n"
        lines.append(line)
        size += len(line.encode())
    path = folder / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def tiny_train_overrides(tmp_path) -> list[str]:
    """Overrides that shrink the default config to a seconds-long CPU run on a test-made corpus."""
    corpus = write_corpus(tmp_path)
    return [
        "data=text",
        f"data.path={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=8",
        "tokenizer.vocab_size=300",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=16",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.accelerator=cpu",
        "optim.warmup_steps=2",
        "sample.max_new_tokens=8",
        "throughput_every_n_steps=4",
    ]
