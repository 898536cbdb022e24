"""Shared fixtures: test-made corpora, the real configs composed and shrunk, and the CLI in a subprocess.

Most tests build their own tiny data. The few that read ../shared (the reference corpora, tiktoken's GPT-2
files) skip with the reason when it is absent, so the suite also passes on a fresh clone.
"""

import builtins
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

# tiktoken downloads the GPT-2 files on first use; offline, use the copy in ../shared when there is one.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


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


@pytest.fixture
def compose_train():
    """``compose_train(overrides)``: configs/train.yaml composed exactly as train.py composes it."""
    from gptmini.training.config import compose_config

    return compose_config


def _write_corpus(folder: Path, n_bytes: int = 60_000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "ünïcode", "data", "model"]
    lines, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".\n"
        lines.append(line)
        size += len(line.encode())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot create anything in (root may write anywhere but in sysfs)."""
    if os.name == "posix" and os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif Path("/sys/kernel").is_dir():
        yield Path("/sys")
    else:
        pytest.skip("no read-only folder to test with")


@pytest.fixture
def write_corpus():
    """``write_corpus(folder, n_bytes=60_000, seed=0)``: a small synthetic corpus a model can learn."""
    return _write_corpus


@pytest.fixture
def tiny_train_overrides(tmp_path) -> list[str]:
    """The ``debug`` config (a seconds-long CPU run) on a test-made corpus, its cache inside tmp_path."""
    corpus = _write_corpus(tmp_path)
    return ["debug=smoke", "data=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture
def run_cli():
    """``run_cli(script, *args, cwd=REPO_ROOT, timeout=300, env=None, input_text=None)``: run train.py,
    generate.py or any repository script in a fresh interpreter, ``input_text`` on its stdin; returns the
    CompletedProcess (text stdout/stderr).
    ``run_cli.start(script, *args, ...)`` starts it instead and returns the Popen (stderr piped)."""

    def command(script: str, args) -> list[str]:
        return [sys.executable, str(REPO_ROOT / script), *args]

    def run(
        script: str,
        *args: str,
        cwd: Path | None = None,
        timeout: int = 300,
        env: dict | None = None,
        input_text: str | None = None,
    ):
        return subprocess.run(
            command(script, args),
            input=input_text,
            cwd=cwd or REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def start(script: str, *args: str, cwd: Path | None = None, env: dict | None = None):
        return subprocess.Popen(
            command(script, args),
            cwd=cwd or REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    run.start = start
    return run


class SignalAtStep(L.Callback):
    """Send this process a real signal while step ``step`` runs, as a user pressing Ctrl-C would."""

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step - 1:  # in the middle of step ``step``
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def signal_at_step():
    """``signal_at_step(step, signum=SIGINT)``: a callback that interrupts a run for real at that step."""
    return SignalAtStep


@pytest.fixture
def feed_input(monkeypatch):
    """``feed_input(lines)``: input() returns ``lines``, then behaves like Ctrl-D (interactive modes)."""

    def feed(lines) -> None:
        queue = list(lines)

        def fake_input(prompt=""):
            if not queue:
                raise EOFError
            return queue.pop(0)

        monkeypatch.setattr(builtins, "input", fake_input)

    return feed


def save_tiny_checkpoint(
    path: Path, enc, template=None, block_size: int = 32, n_layer: int = 2, n_embd: int = 32
):
    """A random GPT for ``enc`` saved at ``path``; with a chat ``template``, its gptmini entry holds it as a
    data=chat run writes it (``chat_template``)."""
    import torch

    from gptmini import GPT, GPTConfig
    from gptmini.data.chat_template import to_entry
    from gptmini.data.tokenizer import tokenizer_to_spec
    from gptmini.weights import save_model_checkpoint

    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=enc.n_vocab, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd
    )
    save_model_checkpoint(path, GPT(config), tokenizer_to_spec(enc))
    if template is not None:
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["gptmini"]["chat_template"] = to_entry(template)
        torch.save(checkpoint, path)
    return path
