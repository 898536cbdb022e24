"""Tokenizers: round trips, the end-of-text token, BPE determinism, specs and friendly errors."""

import io
import logging
import os
import warnings

import pytest
import tiktoken
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptmini.common import GptMiniError
from gptmini.data.tokenizer import (
    EOT,
    TokenizerConfig,
    load_bpe,
    load_encoding,
    save_bpe,
    tokenizer_from_spec,
    tokenizer_id,
    tokenizer_to_spec,
    train_bpe,
    valid_names,
)

# A small, varied training text: prose, code and non-ASCII, so merges of every kind appear.
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 20,
    "Grüße aus Köln — naïve café, 東京タワー, emoji 🙂🙃 and numbers 12345 67890.\n" * 20,
]


@pytest.fixture(scope="module")
def bpe() -> tiktoken.Encoding:
    return train_bpe(TEXTS, vocab_size=300)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_bpe_round_trip(bpe, text):
    assert bpe.decode(bpe.encode_ordinary(text)) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_gpt2_round_trip(gpt2_available, text):
    enc = load_encoding("gpt2")
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_bpe_has_eot_last_and_the_requested_size(bpe):
    assert bpe.n_vocab == 300
    assert bpe.eot_token == 299
    assert bpe.special_tokens_set == {EOT}


def test_eot_literal_is_ordinary_text(bpe):
    text = f"end{EOT}start"
    tokens = bpe.encode_ordinary(text)
    assert bpe.eot_token not in tokens
    assert bpe.decode(tokens) == text


def test_bpe_is_deterministic():
    first = tokenizer_to_spec(train_bpe(TEXTS, vocab_size=300))
    second = tokenizer_to_spec(train_bpe(iter(TEXTS), vocab_size=300))
    assert first == second


def test_patterns_differ():
    gpt4 = train_bpe(TEXTS, vocab_size=300, pattern="gpt4")
    gpt2 = train_bpe(TEXTS, vocab_size=300, pattern="gpt2")
    assert tokenizer_to_spec(gpt4)["pattern"] != tokenizer_to_spec(gpt2)["pattern"]
    # gpt4's pattern splits digits in groups of at most 3.
    assert all(len(gpt4.decode([t])) <= 3 for t in gpt4.encode_ordinary("12345678"))


def test_small_text_gives_smaller_vocab_with_warning(capsys):
    enc = train_bpe(["ab ab ab"], vocab_size=1000)
    assert "only supported" in capsys.readouterr().err
    assert enc.n_vocab < 1000
    assert enc.eot_token == enc.n_vocab - 1


def test_save_and_load_bpe(bpe, tmp_path):
    path = tmp_path / "vocab" / "tokenizer.tiktoken"
    save_bpe(bpe, path)
    first_line = path.read_text().splitlines()[0]
    assert first_line == "AA== 0"  # tiktoken's text format: base64 token, space, rank
    loaded = load_bpe(path)
    assert tokenizer_to_spec(loaded) == tokenizer_to_spec(bpe)
    assert loaded.encode_ordinary(TEXTS[2]) == bpe.encode_ordinary(TEXTS[2])


def test_load_bpe_missing(tmp_path):
    with pytest.raises(GptMiniError, match="no saved BPE"):
        load_bpe(tmp_path / "nothing.tiktoken")


@pytest.mark.parametrize(
    ("ranks", "info"),
    [
        (bytes(range(256)), '{"name": "x", "pattern": "\\\\S+"}'),  # binary garbage
        (b"not base64 at all\n", '{"name": "x", "pattern": "\\\\S+"}'),
        (b"AA== 0\nAQ== 5\n", '{"name": "x", "pattern": "\\\\S+"}'),  # ranks with a gap
        (b"AA== 0\n", "{not json"),
        (b"AA== 0\n", '{"name": "x", "pattern": "(((("}'),  # a pattern that does not compile
    ],
    ids=["binary", "text", "gap", "json", "pattern"],
)
def test_load_bpe_garbage_is_a_short_error(tmp_path, ranks, info):
    path = tmp_path / "tokenizer.tiktoken"
    path.write_bytes(ranks)
    path.with_name(path.name + ".json").write_text(info)
    with pytest.raises(GptMiniError, match="is not a saved BPE tokenizer") as error:
        load_bpe(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value) and error.value.__cause__ is None


def test_save_bpe_fsyncs_then_renames(bpe, tmp_path, monkeypatch):
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd) or real_fsync(fd))
    save_bpe(bpe, tmp_path / "tokenizer.tiktoken")
    assert len(fsynced) == 2  # both files reach the disk before they get their names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.tiktoken", "tokenizer.tiktoken.json"]

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        save_bpe(bpe, tmp_path / "again" / "tokenizer.tiktoken")
    assert list((tmp_path / "again").iterdir()) == []  # no partial file, no temporary file


def test_training_does_not_log_rustbpe_progress(caplog):
    caplog.set_level(logging.INFO)  # as train.py's logging shows it
    train_bpe(TEXTS, vocab_size=300)
    assert [record for record in caplog.records if record.name.startswith("rustbpe")] == []
    assert not logging.getLogger("rustbpe").filters  # silenced only while training


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int))


def test_bpe_spec_round_trip_through_weights_only_load(bpe):
    spec = tokenizer_to_spec(bpe)
    assert spec["kind"] == "bpe" and spec["special_tokens"] == {EOT: bpe.eot_token}
    assert _plain(spec)
    buffer = io.BytesIO()
    torch.save({"tokenizer": spec}, buffer)
    buffer.seek(0)
    restored = tokenizer_from_spec(torch.load(buffer, weights_only=True)["tokenizer"])
    assert restored.encode_ordinary(TEXTS[1]) == bpe.encode_ordinary(TEXTS[1])
    assert restored.eot_token == bpe.eot_token


def test_named_spec(gpt2_available):
    enc = load_encoding("gpt2")
    spec = tokenizer_to_spec(enc)
    assert spec == {"kind": "tiktoken", "name": "gpt2"}
    assert tokenizer_from_spec(spec).eot_token == 50256


@pytest.mark.parametrize(
    "spec",
    [
        None,
        {},
        {"kind": "word2vec"},
        {"kind": "tiktoken"},
        {"kind": "bpe", "name": "x"},
        {"kind": "bpe", "name": "x", "pattern": r"\S+", "ranks": "not base64 at all\n", "special_tokens": {}},
    ],
)
def test_bad_spec(spec):
    with pytest.raises(GptMiniError, match="spec"):
        tokenizer_from_spec(spec)


def test_tokenizer_id():
    assert tokenizer_id(TokenizerConfig()) == "bpe-4096-gpt4"
    assert tokenizer_id(TokenizerConfig(vocab_size=512, pattern="gpt2")) == "bpe-512-gpt2"
    assert tokenizer_id(TokenizerConfig(name="gpt2")) == "gpt2"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(GptMiniError, match="gpt2") as info:
        TokenizerConfig(name="gtp2")
    assert "bpe" in str(info.value) and "cl100k_base" in str(info.value)
    with pytest.raises(GptMiniError, match="cl100k_base"):
        load_encoding("nope")
    assert valid_names()[0] == "bpe"


@pytest.mark.parametrize("vocab_size", [0, 256, 1_000_001])
def test_vocab_size_out_of_range(vocab_size):
    with pytest.raises(GptMiniError, match="vocab_size"):
        TokenizerConfig(vocab_size=vocab_size)
    with pytest.raises(GptMiniError, match="vocab_size"):
        train_bpe(TEXTS, vocab_size)


def test_smallest_vocab_is_bytes_plus_eot():
    enc = train_bpe(TEXTS, vocab_size=257)
    assert enc.n_vocab == 257 and enc.eot_token == 256


def test_unknown_pattern():
    with pytest.raises(GptMiniError, match="gpt4"):
        TokenizerConfig(pattern="gpt3")


def test_offline_named_encoding_gives_short_error(monkeypatch, tmp_path):
    # No cached files and no network: tiktoken's fetch fails as requests would.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def no_network(url):
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with warnings.catch_warnings(), pytest.raises(GptMiniError, match="TIKTOKEN_CACHE_DIR") as info:
        load_encoding("cl100k_base")
    assert "cl100k_base" in str(info.value)
    assert info.value.__cause__ is None  # a short message, not a chained network traceback
