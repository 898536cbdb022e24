"""Corpora, token caches and the DataModule: splits, caching, windows, resume, ranks and bad input."""

import errno
import json
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import tiktoken
import torch

import gptmini.data.corpus as corpus_mod
import gptmini.data.shards as shards_mod
from gptmini.common import GptMiniError
from gptmini.data.corpus import DataConfig, cache_root, resolve_corpus
from gptmini.data.datamodule import TextDataModule, TrainBatches, ValWindows
from gptmini.data.token_cache import TokenCache, TokenStream, open_cache, prepare_cache, read_meta
from gptmini.data.tokenizer import EOT, TokenizerConfig, tokenizer_to_spec, train_bpe

TOK = TokenizerConfig(name="bpe", vocab_size=300)
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def make_text(seed: int, lines: int = 200) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choices(WORDS, k=8)) + ".\n" for _ in range(lines))


def make_corpus(root: Path, n_files: int = 3, lines: int = 200) -> list[str]:
    """Write n_files text files under root (one in a subfolder) and return their texts in corpus order."""
    texts = []
    for i in range(n_files):
        path = root / (f"sub/doc{i}.txt" if i == n_files - 1 else f"doc{i}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = make_text(i, lines)
        path.write_text(text)
        texts.append(text)
    return texts


def text_config(tmp_path: Path, path: Path, **kwargs) -> DataConfig:
    return DataConfig(name="text", path=str(path), cache_dir=str(tmp_path / "cache"), **kwargs)


def prepared(data: DataConfig, tok: TokenizerConfig = TOK, encoding=None) -> TokenCache:
    return open_cache(prepare_cache(data, tok, encoding))


def decoded(cache: TokenCache, split: str) -> str:
    return cache.tokenizer.decode(cache.stream(split)[:].tolist())


def datamodule(tmp_path: Path, block_size: int = 16, batch_size: int = 4, **kwargs) -> TextDataModule:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        make_corpus(corpus)
    data = text_config(tmp_path, corpus, batch_size=batch_size)
    return TextDataModule(prepared(data), data, block_size=block_size, **kwargs)


def first_batches(dm: TextDataModule, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    iterator = iter(dm.train_dataloader())
    return [next(iterator) for _ in range(n)]


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders anywhere under root (what a failed or killed build could leave)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp"))


def one_line_error(info: pytest.ExceptionInfo) -> str:
    """The message of a GptMiniError that train.py prints as one line, with no chained traceback."""
    message = str(info.value)
    error = info.value
    assert "\n" not in message and error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return message


# --- configs and bad input ---


def test_config_validation():
    with pytest.raises(GptMiniError, match="pystdlib, shakespeare, text"):
        DataConfig(name="wikipedia")
    with pytest.raises(GptMiniError, match="data.path"):
        DataConfig(name="text")
    with pytest.raises(GptMiniError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(GptMiniError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(GptMiniError, match="num_workers"):
        DataConfig(num_workers=-1)


def test_mapping_configs_are_accepted_and_checked(tmp_path):
    make_corpus(tmp_path / "corpus")
    data = {"name": "text", "path": str(tmp_path / "corpus"), "cache_dir": str(tmp_path / "cache")}
    cache = open_cache(prepare_cache(data, {"name": "bpe", "vocab_size": 300}))
    dm = TextDataModule(cache, data, block_size=8)
    assert dm.data_config.name == "text" and cache.vocab_size == 300
    with pytest.raises(GptMiniError, match="valid keys"):
        TextDataModule(cache, {"name": "text", "pth": "x"}, block_size=8)
    with pytest.raises(GptMiniError, match="valid keys"):
        prepare_cache(data, {"name": "bpe", "vocab": 300})


def test_missing_path(tmp_path):
    with pytest.raises(GptMiniError, match="does not exist"):
        prepare_cache(text_config(tmp_path, tmp_path / "nope.txt"), TOK)
    with pytest.raises(GptMiniError, match="matches no files"):
        prepare_cache(text_config(tmp_path, tmp_path / "*.nothing"), TOK)
    with pytest.raises(GptMiniError, match="matches no files"):
        prepare_cache(text_config(tmp_path, tmp_path / "no-such-folder" / "*.txt"), TOK)
    with pytest.raises(GptMiniError, match="does not exist"):
        prepare_cache(DataConfig(name="shakespeare", path=str(tmp_path / "nope.txt")), TOK)


def test_empty_file_and_empty_directory(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptMiniError, match="empty"):
        prepare_cache(text_config(tmp_path, tmp_path / "empty.txt"), TOK)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(GptMiniError, match="no text files"):
        prepare_cache(text_config(tmp_path, tmp_path / "nothing"), TOK)
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "a.bin").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(GptMiniError, match="no text files"):
        prepare_cache(text_config(tmp_path, tmp_path / "binaries"), TOK)
    assert "skipped 1 binary file(s)" in capsys.readouterr().err


def test_corpus_shorter_than_one_window(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("just a few words here\n" * 3)
    data = text_config(tmp_path, tmp_path / "tiny.txt")
    cache = prepared(data)
    assert "only supported" in capsys.readouterr().err  # too little text for 300 tokens
    with pytest.raises(GptMiniError, match="block_size") as info:
        TextDataModule(cache, data, block_size=512)
    assert f"has {cache.meta['train_tokens']} tokens" in str(info.value) and "513" in str(info.value)


def test_a_validation_split_too_small_for_one_window_is_refused(tmp_path):
    (tmp_path / "c.txt").write_text(make_text(0))
    data = text_config(tmp_path, tmp_path / "c.txt", val_fraction=0.00005)  # the last byte: one token
    cache = prepared(data)
    assert cache.meta["val_tokens"] == 1
    with pytest.raises(GptMiniError) as info:
        TextDataModule(cache, data, block_size=16)
    assert one_line_error(info).startswith(
        f"the validation split of text files from {tmp_path / 'c.txt'} has 1 token(s), too few for one "
        f"validation window (data.val_fraction=5e-05 of its {len(make_text(0))} bytes), so the run would "
        "train without a validation loss; use more text, a larger data.val_fraction, or data.val_fraction=0"
    )
    no_validation = text_config(tmp_path, tmp_path / "c.txt", val_fraction=0.0)
    assert TextDataModule(prepared(no_validation), no_validation, block_size=16).cache.meta["val_tokens"] == 0


def test_batch_larger_than_the_training_split(tmp_path):
    (tmp_path / "small.txt").write_text(make_text(0, lines=20))
    data = text_config(tmp_path, tmp_path / "small.txt", batch_size=64)
    with pytest.raises(GptMiniError, match="data.batch_size=64"):
        TextDataModule(prepared(data), data, block_size=32)


def test_bad_block_size_seed_and_cache(tmp_path):
    dm = datamodule(tmp_path)
    with pytest.raises(GptMiniError, match="block_size"):
        TextDataModule(dm.cache, dm.data_config, block_size=0)
    with pytest.raises(GptMiniError, match="seed"):
        TextDataModule(dm.cache, dm.data_config, block_size=8, seed=-1)
    with pytest.raises(GptMiniError, match="open_cache"):
        TextDataModule(dm.cache.folder, dm.data_config, block_size=8)


# --- corpora and splits ---


def test_every_document_is_preceded_by_the_eot_id(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    texts[1] = f"this document mentions {EOT} literally\n" + texts[1]
    (tmp_path / "corpus" / "doc1.txt").write_text(texts[1])
    cache = prepared(text_config(tmp_path, tmp_path / "corpus", val_fraction=0.0))
    tokens = cache.stream("train")[:].tolist()
    assert tokens.count(cache.tokenizer.eot_token) == len(texts)  # one before each; the literal is text
    assert cache.tokenizer.decode(tokens) == EOT + EOT.join(texts)
    assert cache.meta["val_tokens"] == 0 and cache.meta["train_bytes"] == sum(len(t.encode()) for t in texts)
    assert len(cache.stream("val")[:]) == 0


def test_split_is_last_fraction_by_bytes_at_a_character_boundary(tmp_path):
    text = "".join(f"línea {i}: ünïcödé ✓ 🙂\n" for i in range(300))
    path = tmp_path / "one.txt"
    path.write_text(text)
    for fraction in (0.1, 0.37):
        cache = prepared(text_config(tmp_path, path, val_fraction=fraction))
        train, val = decoded(cache, "train"), decoded(cache, "val")
        assert train.startswith(EOT) and EOT not in val  # the file's start, not the cut, is a document start
        train = train.removeprefix(EOT)
        assert train + val == text
        cut = int(len(text.encode()) * (1 - fraction))
        assert 0 <= len(train.encode()) - cut <= 3  # moved forward to the next character at most
        assert (cache.meta["train_bytes"], cache.meta["val_bytes"]) == (
            len(train.encode()),
            len(val.encode()),
        )


def test_long_documents_encode_as_if_whole(tmp_path, monkeypatch):
    # Tiny blocks and pieces force many cuts; the tokens must equal encoding the whole text at once.
    monkeypatch.setattr(corpus_mod, "READ_BLOCK_BYTES", 97)
    monkeypatch.setattr(corpus_mod, "PIECE_CHARS", 256)
    text = "".join(f"    indented {i}\n\n\nword{i} x = [{i}]\n  \n" for i in range(200))
    (tmp_path / "long.txt").write_text(text)
    cache = prepared(text_config(tmp_path, tmp_path / "long.txt", val_fraction=0.0))
    assert cache.stream("train")[:].tolist() == [
        cache.tokenizer.eot_token,
        *cache.tokenizer.encode_ordinary(text),
    ]


def test_invalid_utf8_is_replaced_and_reported(tmp_path, capsys):
    good = make_text(0)
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"caf\xe9 \xff\xfe end\n")
    cache = prepared(text_config(tmp_path, tmp_path / "bad.txt", val_fraction=0.0))
    assert "replaced 3 invalid UTF-8 byte(s) by U+FFFD" in capsys.readouterr().err
    assert cache.meta["invalid_utf8_bytes"] == 3
    assert decoded(cache, "train").endswith("caf\ufffd \ufffd\ufffd end\n")


def test_binary_and_hidden_files_are_skipped(tmp_path, capsys):
    texts = make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "corpus" / ".git").mkdir()
    (tmp_path / "corpus" / ".git" / "config").write_text("[core]\n")
    corpus = resolve_corpus(text_config(tmp_path, tmp_path / "corpus"))
    said = capsys.readouterr().err
    assert "skipped 1 binary file(s)" in said and "image.png" in said
    assert [p.name for p in corpus.files] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    assert len(corpus.files) == len(texts)


def test_glob_path(tmp_path):
    make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "notes.md").write_text("# notes\n")
    (tmp_path / "corpus" / ".hidden").mkdir()
    (tmp_path / "corpus" / ".hidden" / "secret.txt").write_text("hidden\n")
    names = {
        pattern: [p.relative_to(tmp_path / "corpus").as_posix() for p in files]
        for pattern in ("**/*.txt", "*.txt", "*", "sub/*", "doc[01].txt", "**/.hidden/*.txt")
        for files in [resolve_corpus(text_config(tmp_path, tmp_path / "corpus" / pattern)).files]
    }
    assert names == {  # as glob.glob(recursive=True) matches; a matched folder stands for its files
        "**/*.txt": ["doc0.txt", "doc1.txt", "sub/doc2.txt"],
        "*.txt": ["doc0.txt", "doc1.txt"],
        "*": ["doc0.txt", "doc1.txt", "notes.md", "sub/doc2.txt"],
        "sub/*": ["sub/doc2.txt"],
        "doc[01].txt": ["doc0.txt", "doc1.txt"],
        "**/.hidden/*.txt": [".hidden/secret.txt"],
    }


def test_glob_does_not_follow_links_to_folders(tmp_path, capsys):
    # A link to the parent folder: glob.glob("**") followed it dozens of times, so the validation split (the
    # last files) also sat in the training split, again and again.
    root = tmp_path / "corpus"
    texts = make_corpus(root, n_files=4)
    (root / "sub" / "up").symlink_to("..", target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "zz-again.txt").symlink_to(root / "doc0.txt")  # the same file by a second path
    glob_data = text_config(tmp_path, root / "**" / "*.txt", val_fraction=0.25)
    started = time.perf_counter()
    cache = prepared(glob_data)
    assert time.perf_counter() - started < 30
    said = capsys.readouterr().err
    assert "skipped 1 file(s) under" in said and "links to a file already in the corpus" in said
    assert "zz-again.txt" in said
    files = resolve_corpus(glob_data).files
    assert [p.relative_to(root).as_posix() for p in files] == [
        "doc0.txt",
        "doc1.txt",
        "doc2.txt",
        "sub/doc3.txt",
    ]
    train, val = decoded(cache, "train"), decoded(cache, "val")
    assert train.replace(EOT, "") + val == "".join(texts)  # each text once
    assert len(val) > 1000 and val not in train
    # The directory form lists the same files in the same order, so it shares the cache.
    assert prepare_cache(text_config(tmp_path, root, val_fraction=0.25), TOK) == cache.folder
    assert "links to a file" in capsys.readouterr().err


def test_pystdlib_corpus_lists_library_source_only():
    corpus = resolve_corpus(DataConfig())
    names = [p.as_posix() for p in corpus.files]
    assert any(name.endswith("/json/decoder.py") for name in names)
    assert not any(
        "/test/" in n or "/tests/" in n or "/idle_test/" in n or "site-packages" in n for n in names
    )
    assert len(names) > 300 and sum(p.stat().st_size for p in corpus.files) > 5_000_000


def test_pystdlib_default_cache(tmp_path):
    cache = prepared(DataConfig(cache_dir=str(tmp_path)), TokenizerConfig())
    assert cache.vocab_size == 4096 and cache.meta["dtype"] == "uint16"
    assert cache.folder.parent == tmp_path / "pystdlib" / "bpe-4096-gpt4"
    assert 2.5 < cache.bytes_per_token("val") < 6  # code tokenizes at ~3.5 bytes per token
    assert cache.meta["train_bytes"] > 8 * cache.meta["val_bytes"]


def test_default_cache_dir_is_the_repository_data_folder(tmp_path, monkeypatch, repo_root):
    monkeypatch.chdir(tmp_path)  # not the directory you run in
    assert cache_root(DataConfig()) == repo_root / "data"
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "mine"))) == tmp_path / "mine"


def test_an_installed_wheel_caches_in_the_users_cache_folder_not_site_packages(tmp_path, monkeypatch):
    import gptmini.common as common

    monkeypatch.setattr(common, "checkout_root", lambda: None)  # what a wheel in site-packages sees
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert common.default_cache_dir() == tmp_path / "xdg" / "gptmini"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert common.default_cache_dir() == tmp_path / "home" / ".cache" / "gptmini"


def test_token_files_hold_every_id(tmp_path):
    # 300 ids fit two bytes per token; a vocabulary beyond 65535 ids needs four, and its ids must survive.
    make_corpus(tmp_path / "corpus")
    small = prepared(text_config(tmp_path, tmp_path / "corpus"))
    assert (small.folder / "train_000000.bin").stat().st_size == 2 * small.meta["train_tokens"]
    # Every byte pair is a token and single bytes (each one a pre-token here) have the ids above 65535.
    ranks = {bytes([a, b]): a * 256 + b for a in range(256) for b in range(256)}
    ranks |= {bytes([i]): 65536 + i for i in range(256)}
    ranks = dict(sorted(ranks.items(), key=lambda item: item[1]))
    big = tiktoken.Encoding("bytes-big", pat_str=r"\S|\s", mergeable_ranks=ranks, special_tokens={EOT: 65792})
    cache = prepared(text_config(tmp_path, tmp_path / "corpus"), encoding=big)
    assert cache.vocab_size == 65793 and cache.stream("train")[:].max() > 65535
    assert (cache.folder / "train_000000.bin").stat().st_size == 4 * cache.meta["train_tokens"]
    assert decoded(cache, "train").split(EOT)[1] == (tmp_path / "corpus" / "doc0.txt").read_text()


# --- shakespeare ---


def test_shakespeare_local_copy_split_matches_nanogpt(tmp_path, shakespeare_path):
    data = DataConfig(name="shakespeare", path=str(shakespeare_path), cache_dir=str(tmp_path))
    cache = prepared(data, TokenizerConfig(vocab_size=512))
    text = shakespeare_path.read_text()
    assert len(text) == 1_115_394
    assert decoded(cache, "val") == text[int(len(text) * 0.9) :]


class _Response:
    def __init__(self, body):
        self.body = body

    def read(self):
        return self.body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_shakespeare_download_verified_and_atomic(tmp_path, monkeypatch, shakespeare_path):
    content = shakespeare_path.read_bytes()
    calls = []

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return _Response(content)

    # An orphan of a download killed mid-write (kill -9) is cleaned up by the next one.
    orphan = tmp_path / "shakespeare" / ".input.txt.abc123.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd) or real_fsync(fd))
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", fake_urlopen)
    corpus = resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(tmp_path)))
    assert corpus.files == [tmp_path / "shakespeare" / "input.txt"]
    assert corpus.files[0].read_bytes() == content and fsynced  # on disk before it is renamed into place
    assert calls[0][0] == corpus_mod.SHAKESPEARE_URL and calls[0][1] <= 30
    assert leftovers(tmp_path) == []
    resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(tmp_path)))
    assert len(calls) == 1  # downloaded once

    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", lambda url, timeout: _Response(b"corrupt"))
    with pytest.raises(GptMiniError, match="sha256"):
        resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(tmp_path / "other")))
    assert not (tmp_path / "other" / "shakespeare" / "input.txt").exists()


def test_shakespeare_download_into_a_read_only_folder(read_only_dir, monkeypatch, shakespeare_path):
    monkeypatch.setattr(
        corpus_mod.urllib.request, "urlopen", lambda url, timeout: _Response(shakespeare_path.read_bytes())
    )
    with pytest.raises(GptMiniError, match="cannot write Tiny Shakespeare") as info:
        resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(read_only_dir)))
    assert "data.cache_dir=" in one_line_error(info) and str(read_only_dir) in str(info.value)


def test_shakespeare_offline_gives_both_remedies(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", offline)
    with pytest.raises(GptMiniError, match="data.path") as info:
        resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(tmp_path)))
    assert "internet" in str(info.value)


def test_shakespeare_modified_copy_warns(tmp_path, capsys):
    path = tmp_path / "mine.txt"
    path.write_text(make_text(0))
    resolve_corpus(DataConfig(name="shakespeare", path=str(path), cache_dir=str(tmp_path)))
    assert "is not the reference Tiny Shakespeare" in capsys.readouterr().err


# --- caches ---


def test_cache_reused_then_invalidated(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    data = text_config(tmp_path, tmp_path / "corpus")
    folder = prepare_cache(data, TOK)
    stamp = (folder / "train_000000.bin").stat().st_mtime_ns
    before = open_cache(folder).stream("train")[:].copy()
    assert prepare_cache(data, TOK) == folder
    assert (folder / "train_000000.bin").stat().st_mtime_ns == stamp  # not re-tokenized

    (tmp_path / "corpus" / "doc0.txt").write_text(texts[0] + "a brand new closing line.\n")
    changed = prepare_cache(data, TOK)
    assert changed != folder and not np.array_equal(open_cache(changed).stream("train")[:], before)
    other_tokenizer = prepare_cache(data, TokenizerConfig(vocab_size=300, pattern="gpt2"))
    assert other_tokenizer.parent.name == "bpe-300-gpt2"
    other_split = prepare_cache(text_config(tmp_path, tmp_path / "corpus", val_fraction=0.2), TOK)
    assert len({folder, changed, other_tokenizer, other_split}) == 4


def test_meta_contents(tmp_path):
    make_corpus(tmp_path / "corpus")
    meta = read_meta(prepare_cache(text_config(tmp_path, tmp_path / "corpus"), TOK))
    for key in (
        "tokenizer_id",
        "dtype",
        "train_tokens",
        "val_tokens",
        "train_bytes",
        "val_bytes",
        "fingerprint",
    ):
        assert key in meta
    assert meta["tokenizer_id"] == "bpe-300-gpt4" and meta["dtype"] == "uint16"


def test_token_cache_attributes(tmp_path):
    make_corpus(tmp_path / "corpus")
    cache = prepared(text_config(tmp_path, tmp_path / "corpus"))
    assert cache.vocab_size == cache.tokenizer.n_vocab == 300
    assert (
        cache.tokenizer_spec == tokenizer_to_spec(cache.tokenizer) and cache.tokenizer_spec["kind"] == "bpe"
    )
    json.dumps(cache.tokenizer_spec)  # plain values only
    for split in ("train", "val"):
        assert len(cache.stream(split)[:]) == cache.meta[f"{split}_tokens"] > 0
        assert cache.bytes_per_token(split) == cache.meta[f"{split}_bytes"] / cache.meta[f"{split}_tokens"]
    with pytest.raises(GptMiniError, match="split='test'"):
        cache.bytes_per_token("test")


def test_bpe_training_reports_one_line_not_rustbpe_progress(tmp_path, caplog, capsys):
    make_corpus(tmp_path / "corpus")
    caplog.set_level("INFO")  # as train.py's logging shows it
    prepare_cache(text_config(tmp_path, tmp_path / "corpus"), TOK)
    assert [r for r in caplog.records if r.name.startswith("rustbpe")] == []
    lines = capsys.readouterr().err.splitlines()
    assert any(
        line.startswith("training a 300-token BPE on up to 32 MB of text files from") for line in lines
    )
    assert any(line.startswith("trained the BPE on") for line in lines) and len(lines) <= 4


def test_given_encoding_is_used_exactly_and_cached_apart(tmp_path, capsys):
    texts = make_corpus(tmp_path / "corpus")
    data = text_config(tmp_path, tmp_path / "corpus", val_fraction=0.0)
    trained = prepared(data)
    # A checkpoint's tokenizer, trained on other text with the same settings: same name, other vocabulary.
    other = train_bpe([make_text(seed, 300) for seed in (7, 8, 9)], vocab_size=300)
    assert other.name == trained.tokenizer.name and tokenizer_to_spec(other) != trained.tokenizer_spec
    capsys.readouterr()
    cache = prepared(data, encoding=other)
    assert "training a" not in capsys.readouterr().err  # no BPE trained
    assert cache.folder != trained.folder and cache.tokenizer_spec == tokenizer_to_spec(other)
    assert cache.stream("train")[:].tolist()[1:50] == other.encode_ordinary(texts[0])[:49]
    assert prepare_cache(data, TOK, other) == cache.folder  # found again
    assert open_cache(trained.folder).tokenizer_spec == trained.tokenizer_spec  # the other is untouched


def test_given_named_encoding(tmp_path, gpt2_available):
    make_corpus(tmp_path / "corpus")
    cache = prepared(text_config(tmp_path, tmp_path / "corpus"), encoding=tiktoken.get_encoding("gpt2"))
    assert cache.tokenizer_spec == {"kind": "tiktoken", "name": "gpt2"} and cache.vocab_size == 50257
    assert cache.folder.parent.name == "gpt2"


def test_gpt2_has_one_cache_key_however_it_was_obtained(tmp_path, gpt2_available):
    from gptmini.data.shards import tokenizer_identity
    from gptmini.data.tokenizer import tokenizer_from_spec
    from gptmini.weights import GPT2_TOKENIZER

    gpt2 = TokenizerConfig(name="gpt2")
    imported = tokenizer_from_spec(GPT2_TOKENIZER)  # the tokenizer an imported GPT-2 carries (init_from=gpt2)
    tik = tiktoken.get_encoding("gpt2")
    rebuilt = tiktoken.Encoding(  # the same contents in another object
        "gpt2", pat_str=tik._pat_str, mergeable_ranks=dict(tik._mergeable_ranks), special_tokens={EOT: 50256}
    )
    for enc in (tik, imported, rebuilt):
        assert tokenizer_identity(TOK, enc) == tokenizer_identity(gpt2, None)
        assert tokenizer_identity(TOK, enc)[0] == "gpt2"
    make_corpus(tmp_path / "corpus")
    data = text_config(tmp_path, tmp_path / "corpus")
    folder = prepare_cache(data, gpt2)
    assert prepare_cache(data, TOK, imported) == folder  # found, not tokenized again
    # An encoding merely called "gpt2" is keyed, saved and reopened by its contents, never by that name.
    impostor = tiktoken.Encoding(
        "gpt2",
        pat_str=tik._pat_str,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
    )
    assert tokenizer_identity(TOK, impostor)[1] != tokenizer_identity(gpt2, None)[1]
    assert tokenizer_to_spec(impostor)["kind"] == "bpe"
    cache = prepared(data, encoding=impostor)
    assert cache.folder != folder and cache.vocab_size == 257
    assert cache.stream("train")[:].tolist()[1:20] == impostor.encode_ordinary(make_text(0))[:19]


def test_encoding_without_end_of_text_is_refused(tmp_path):
    make_corpus(tmp_path / "corpus")
    plain = tiktoken.Encoding(
        "plain", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}
    )
    with pytest.raises(GptMiniError, match="no <\\|endoftext\\|>"):
        prepare_cache(text_config(tmp_path, tmp_path / "corpus"), TOK, plain)


def _prepare_in_subprocess(barrier, results, data, tok):
    barrier.wait()  # both processes start preparing at the same moment
    results.put(str(prepare_cache(data, tok)))


@pytest.mark.slow  # two spawned interpreters import torch and lightning: ~8 s on 2 cores
def test_two_processes_prepare_one_cache(tmp_path):
    make_corpus(tmp_path / "corpus", n_files=6, lines=2000)
    data = text_config(tmp_path, tmp_path / "corpus")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    processes = [
        ctx.Process(target=_prepare_in_subprocess, args=(barrier, results, data, TOK)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    folders = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert folders[0] == folders[1]
    cache = open_cache(Path(folders[0]))
    assert (cache.folder / "train_000000.bin").stat().st_size == cache.meta["train_tokens"] * 2
    assert (cache.folder / "val_000000.bin").stat().st_size == cache.meta["val_tokens"] * 2
    assert leftovers(tmp_path / "cache") == []  # no temporary folders left behind
    assert [p.name for p in cache.folder.parent.iterdir() if not p.name.endswith(".lock")] == [
        cache.folder.name
    ]


# --- environment faults: unwritable or full cache directories, Ctrl-C, kill -9 ---


def test_read_only_cache_dir(tmp_path, read_only_dir):
    make_corpus(tmp_path / "corpus")
    data = DataConfig(name="text", path=str(tmp_path / "corpus"), cache_dir=str(read_only_dir))
    with pytest.raises(GptMiniError, match="cannot write the token cache under") as info:
        prepare_cache(data, TOK)
    message = one_line_error(info)
    assert str(read_only_dir) in message and "no permission" in message and "data.cache_dir=" in message


def test_full_disk_leaves_no_half_written_cache(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")
    data = text_config(tmp_path, tmp_path / "corpus")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # the disk fills up while the cache is written
    with pytest.raises(GptMiniError, match="the disk is full") as info:
        prepare_cache(data, TOK)
    assert f"under {tmp_path / 'cache'}" in one_line_error(info) and "data.cache_dir=" in str(info.value)
    assert leftovers(tmp_path) == []
    assert not [p for p in (tmp_path / "cache").rglob("meta.json")]
    monkeypatch.undo()
    assert open_cache(prepare_cache(data, TOK)).meta["train_tokens"] > 0  # room again: builds normally


def test_every_cache_file_is_fsynced_before_it_appears(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd) or real_fsync(fd))
    folder = prepare_cache(text_config(tmp_path, tmp_path / "corpus"), TOK)
    # token files, meta.json and the BPE's two files: each written by gptmini.common.atomic_file
    assert len(fsynced) >= len(list(folder.iterdir())) == 5


def test_ctrl_c_during_tokenizing_leaves_no_partial_cache(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")
    data = text_config(tmp_path, tmp_path / "corpus")
    real_encode = tiktoken.Encoding.encode_to_numpy
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(tiktoken.Encoding, "encode_to_numpy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(data, TOK)
    assert leftovers(tmp_path) == [] and not list((tmp_path / "cache").rglob("*.bin"))
    assert list((tmp_path / "cache").rglob(".*.building/progress.json"))  # kept, to resume
    monkeypatch.undo()
    assert open_cache(prepare_cache(data, TOK)).meta["train_tokens"] > 0


# The child's corpus reader, once tokenizing has begun: it hands over its first batch, says so on stdout and
# then waits on its stdin, a pipe the test holds open. The SIGINT can only land mid-tokenizing, however
# fast or slow the machine is (the old version raced a 240,000-line corpus against the clock).
HELD_TOKENIZER = """
import sys
from gptmini.data.corpus import DataConfig, TextSource
from gptmini.data.token_cache import prepare_cache
from gptmini.data.tokenizer import TokenizerConfig

real_items, calls = TextSource.items, []


def held_items(self, start):
    calls.append(start)
    items = real_items(self, start)
    if len(calls) == 1:  # the BPE's training reads the corpus too: only tokenizing is held
        yield from items
        return
    yield next(items)
    print("tokenizing", flush=True)
    sys.stdin.read()  # never returns: the test keeps the pipe open until this process has exited
    yield from items


TextSource.items = held_items
data = DataConfig(name="text", path=sys.argv[1], cache_dir=sys.argv[2])
prepare_cache(data, TokenizerConfig(vocab_size=300))
"""


def test_sigint_during_tokenizing_in_a_real_process(tmp_path):
    make_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", HELD_TOKENIZER, str(tmp_path / "corpus"), str(cache)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            said = process.stdout.readline()  # returns once the child is held mid-tokenizing (or has died)
            assert said == "tokenizing\n", (tmp_path / "stderr.txt").read_text()[-2000:]
            assert list(cache.rglob("train_000000.bin.partial"))  # the token files are open, being written
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
        finally:
            process.kill()  # a no-op once it has exited
            process.stdin.close()
            process.stdout.close()
        stderr.seek(0)
        output = stderr.read()
    assert process.returncode != 0 and "KeyboardInterrupt" in output, output[-2000:]
    assert leftovers(tmp_path) == [] and not list(cache.rglob("meta.json"))


def test_orphans_of_killed_builds_are_removed_at_the_next_prepare(tmp_path):
    make_corpus(tmp_path / "corpus")
    data = text_config(tmp_path, tmp_path / "corpus")
    parent = prepare_cache(data, TOK).parent
    # What kill -9 leaves beside the caches: the 0-byte temporary file of an atomic write (a killed build
    # itself is resumed, see test_ctrl_c_during_tokenizing_leaves_no_partial_cache).
    orphan = parent / ".meta.json.x1y2.tmp"
    orphan.write_bytes(b"")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    prepare_cache(data, TOK)
    assert leftovers(parent) == []


def test_an_interrupted_text_build_resumes_keeping_its_shards_and_its_bpe(tmp_path, monkeypatch, capsys):
    make_corpus(tmp_path / "corpus", n_files=6, lines=2000)
    data = text_config(tmp_path, tmp_path / "corpus", shard_tokens=4000)
    reference = prepared(text_config(tmp_path / "ref", tmp_path / "corpus", shard_tokens=4000))
    monkeypatch.setattr(corpus_mod, "PIECE_CHARS", 4096)  # many batches, so there is something to resume
    monkeypatch.setattr(shards_mod, "BATCH_CHARS", 4096)
    monkeypatch.setattr(shards_mod, "COMMIT_EVERY_S", 0.0)
    real_write, commits = shards_mod._write_progress, []

    def write_then_stop(*args):
        real_write(*args)
        commits.append(1)
        if len(commits) == 5:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(shards_mod, "_write_progress", write_then_stop)
        with pytest.raises(KeyboardInterrupt):
            prepare_cache(data, TOK)
    (building,) = (tmp_path / "cache").rglob(".*.building")
    kept = {p.name: p.stat().st_ino for p in building.glob("train_*.bin")}
    capsys.readouterr()
    cache = prepared(data)
    said = capsys.readouterr().err
    assert "resuming the interrupted build" in said and "training a" not in said
    assert kept and all((cache.folder / name).stat().st_ino == ino for name, ino in kept.items())
    assert cache.meta["shards"] == reference.meta["shards"]
    for split in ("train", "val"):
        assert cache.stream(split)[:].tolist() == reference.stream(split)[:].tolist()


# --- damaged caches ---


def _damage_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.tiktoken").write_bytes(bytes(range(256)) * 2)  # not even UTF-8


def _damage_ids(folder: Path) -> None:
    tokens = np.fromfile(folder / "train_000000.bin", dtype=np.uint16)
    tokens[len(tokens) // 2] = 40000  # the vocabulary has 300 ids; the size is unchanged
    tokens.tofile(folder / "train_000000.bin")


def _damage_meta(key, value):
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        meta[key] = value
        (folder / "meta.json").write_text(json.dumps(meta))

    return damage


def _truncate_val(folder: Path) -> None:
    with open(folder / "val_000000.bin", "r+b") as f:
        f.truncate(10)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_damage_tokenizer, "is not a saved BPE tokenizer"),
        (_damage_ids, "train_000000.bin holds token id 40000, the tokenizer has 300"),
        (_damage_meta("dtype", "banana"), "dtype 'banana'"),
        (_damage_meta("dtype", "float16"), "dtype 'float16'"),  # same size as uint16: passed the size check
        (_damage_meta("vocab_size", 5000), "its tokenizer has 300 ids"),
        (_damage_meta("train_tokens", "many"), "no valid train_tokens"),
        (_truncate_val, "val_000000.bin has 10 bytes"),
        (lambda folder: (folder / "meta.json").write_text("{not json"), "meta.json is unreadable"),
        (lambda folder: (folder / "train_000000.bin").unlink(), "train_000000.bin is missing"),
    ],
    ids=["tokenizer", "ids", "dtype", "float-dtype", "vocab", "counts", "size", "meta", "missing"],
)
def test_damaged_cache_is_one_line_naming_the_folder_and_the_fix(tmp_path, damage, reason):
    make_corpus(tmp_path / "corpus")
    folder = prepare_cache(text_config(tmp_path, tmp_path / "corpus"), TOK)
    damage(folder)
    with pytest.raises(GptMiniError, match="is damaged") as info:
        open_cache(folder)
    message = one_line_error(info)
    assert reason in message and str(folder) in message and "delete that folder" in message


def test_open_cache_of_a_missing_folder(tmp_path):
    with pytest.raises(GptMiniError, match="there is no token cache at .*prepare_cache"):
        open_cache(tmp_path / "nope")


def test_cache_of_an_older_version_is_rebuilt_under_a_new_key(tmp_path, monkeypatch, capsys):
    make_corpus(tmp_path / "corpus")
    data = text_config(tmp_path, tmp_path / "corpus")
    monkeypatch.setattr(shards_mod, "CACHE_VERSION", shards_mod.CACHE_VERSION - 1)
    old = prepare_cache(data, TOK)
    monkeypatch.undo()
    capsys.readouterr()
    new = prepare_cache(data, TOK)
    assert (
        f"rebuilding the token cache: the cache(s) in {old.parent} were written in another format"
        in capsys.readouterr().err
    )
    assert new != old and new.parent == old.parent and open_cache(new).meta["train_tokens"] > 0
    with pytest.raises(GptMiniError, match="written by another gptmini") as info:
        open_cache(old)
    assert str(old) in one_line_error(info) and "delete that folder" in str(info.value)


# --- the DataModule ---


def test_windows_are_shifted_contiguous_slices(tmp_path):
    dm = datamodule(tmp_path, block_size=16, batch_size=4)
    tokens = np.asarray(dm.cache.stream("train")[:])
    all_windows = np.lib.stride_tricks.sliding_window_view(tokens, 17)
    for x, y in first_batches(dm, 3):
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(y[:, :-1], x[:, 1:])
        for row_x, row_y in zip(x, y, strict=True):
            window = torch.cat([row_x, row_y[-1:]]).numpy()
            assert (all_windows == window).all(axis=1).any()


def test_reproducible_from_seed_and_different_for_other_seeds(tmp_path):
    first = first_batches(datamodule(tmp_path, seed=7), 4)
    again = first_batches(datamodule(tmp_path, seed=7), 4)
    other = first_batches(datamodule(tmp_path, seed=8), 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_resume_from_state_continues_the_stream(tmp_path):
    stream = first_batches(datamodule(tmp_path), 8)
    dm = datamodule(tmp_path)
    dm.load_state_dict({"batches_consumed": 5})
    resumed = first_batches(dm, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(stream[5:], resumed, strict=True))
    assert dm.state_dict() == {"batches_consumed": 5}


def test_workers_preserve_order(tmp_path):
    single = first_batches(datamodule(tmp_path), 6)
    dm = datamodule(tmp_path)
    dm.data_config.num_workers = 2
    multi = first_batches(dm, 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, multi, strict=True))


def test_ranks_get_different_windows(tmp_path):
    dm0, dm1 = datamodule(tmp_path), datamodule(tmp_path)
    dm1.trainer = SimpleNamespace(global_rank=1, world_size=2, training=False)
    rank0, rank1 = first_batches(dm0, 3), first_batches(dm1, 3)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(rank0, rank1, strict=True))


def test_validation_windows_cover_the_split(tmp_path):
    dm = datamodule(tmp_path, block_size=16, batch_size=4)
    tokens = np.asarray(dm.cache.stream("val")[:])
    ys = torch.cat([y for _, y in dm.val_dataloader()]).flatten().numpy()
    xs = torch.cat([x for x, _ in dm.val_dataloader()]).flatten().numpy()
    covered = len(ys)
    assert len(tokens) - 1 - covered < 16  # only a remainder shorter than one window is left out
    assert np.array_equal(ys, tokens[1 : 1 + covered]) and np.array_equal(xs, tokens[:covered])


def test_short_validation_split_gives_one_short_window(tmp_path):
    (tmp_path / "t.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    windows = ValWindows(tmp_path / "t.bin", "uint16", 10, block_size=64)
    assert len(windows) == 1
    x, y = windows[0]
    assert x.tolist() == list(range(9)) and y.tolist() == list(range(1, 10))
    assert len(ValWindows(tmp_path / "t.bin", "uint16", 1, block_size=64)) == 0


def test_datamodule_never_tokenizes(tmp_path):
    # Everything a run asks of the DataModule comes from the opened cache: the corpus is not read again.
    dm = datamodule(tmp_path)
    expected = first_batches(datamodule(tmp_path), 2)
    for path in sorted((tmp_path / "corpus").rglob("*.txt")):
        path.unlink()
    dm.prepare_data()
    dm.setup("fit")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first_batches(dm, 2), expected, strict=True))
    assert len(list(dm.val_dataloader())) > 0


def test_train_batches_pickle_without_the_token_file(tmp_path):
    # Loader workers get the stream by pickle: it must carry the path, not the (memory-mapped) tokens.
    make_corpus(tmp_path / "corpus", n_files=3, lines=2000)
    dm = datamodule(tmp_path)
    stream = TrainBatches(
        dm.cache.token_files("train")[0], dm.cache.meta["dtype"], 16, 4, seed=1, rank=0, start=0
    )
    x, _ = stream.batch(0)
    copy = pickle.loads(pickle.dumps(stream))
    assert len(pickle.dumps(stream)) < dm.cache.token_files("train")[0].stat().st_size / 10
    assert torch.equal(copy.batch(0)[0], x)


def test_token_stream_reads_any_range_like_a_slice(tmp_path):
    parts = [np.arange(0, 5, dtype=np.uint16), np.arange(5, 12, dtype=np.uint16)]
    for i, part in enumerate(parts):
        part.tofile(tmp_path / f"p{i}.bin")
    stream = TokenStream([tmp_path / "p0.bin", tmp_path / "p1.bin"], "uint16")
    whole = np.arange(12)
    for start, stop in [(3, 3), (5, 5), (12, 12), (7, 2), (3, 9), (0, 12), (10, 40)]:
        got = stream.read(start, stop)
        assert got.dtype == np.uint16 and got.tolist() == whole[start:stop].tolist(), (start, stop)
    assert stream[4:4].tolist() == [] and stream[-3:].tolist() == [9, 10, 11]


class _Recorder(L.LightningModule):
    """A tiny model that remembers the first token of every training batch it sees."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x[:, 0].tolist())
        logits = self.embed(x)
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.embed(x)
        self.log("val/loss", torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        val_check_interval=2,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )


def test_lightning_counts_consumed_batches_and_resumes_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    full_dm = datamodule(tmp_path)
    full = _Recorder(full_dm.cache.vocab_size)
    _trainer(tmp_path, 6).fit(full, datamodule=full_dm)
    assert len(full.seen) == 6
    assert full_dm.state_dict() == {"batches_consumed": 6}  # validation batches are not counted

    first_dm = datamodule(tmp_path)
    first = _Recorder(first_dm.cache.vocab_size)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(first, datamodule=first_dm)
    trainer.save_checkpoint(tmp_path / "half.ckpt")

    resumed_dm = datamodule(tmp_path)
    resumed = _Recorder(resumed_dm.cache.vocab_size)
    _trainer(tmp_path, 6).fit(resumed, datamodule=resumed_dm, ckpt_path=tmp_path / "half.ckpt")
    assert first.seen + resumed.seen == full.seen
    assert resumed_dm.state_dict() == {"batches_consumed": 6}
