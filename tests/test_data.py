"""Corpora, token caches and the DataModule: splits, caching, windows, resume, ranks and bad input."""

import json
import multiprocessing
import random
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

import gptmini.data.corpus as corpus_mod
import gptmini.data.token_cache as cache_mod
from gptmini.common import GptMiniError
from gptmini.data.corpus import DataConfig, resolve_corpus
from gptmini.data.datamodule import TextDataModule, TrainBatches, ValWindows
from gptmini.data.token_cache import load_cached_tokenizer, open_tokens, prepare_cache, read_meta
from gptmini.data.tokenizer import EOT, TokenizerConfig

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


def tokens_of(folder: Path, split: str) -> np.ndarray:
    return np.asarray(open_tokens(folder / f"{split}.bin", read_meta(folder)["dtype"]))


def datamodule(tmp_path: Path, block_size: int = 16, batch_size: int = 4, **kwargs) -> TextDataModule:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        make_corpus(corpus)
    data = text_config(tmp_path, corpus, batch_size=batch_size)
    dm = TextDataModule(data, TOK, block_size=block_size, **kwargs)
    dm.setup()
    return dm


def first_batches(dm: TextDataModule, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    iterator = iter(dm.train_dataloader())
    return [next(iterator) for _ in range(n)]


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
    dm = TextDataModule(data, {"name": "bpe", "vocab_size": 300}, block_size=8)
    assert dm.data_config.name == "text" and dm.tokenizer_config.vocab_size == 300
    with pytest.raises(GptMiniError, match="valid keys"):
        TextDataModule({"name": "text", "pth": "x"}, TOK, block_size=8)


def test_missing_path(tmp_path):
    with pytest.raises(GptMiniError, match="does not exist"):
        prepare_cache(text_config(tmp_path, tmp_path / "nope.txt"), TOK)
    with pytest.raises(GptMiniError, match="matches no files"):
        prepare_cache(text_config(tmp_path, tmp_path / "*.nothing"), TOK)
    with pytest.raises(GptMiniError, match="does not exist"):
        prepare_cache(DataConfig(name="shakespeare", path=str(tmp_path / "nope.txt")), TOK)


def test_empty_file_and_empty_directory(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptMiniError, match="empty"):
        prepare_cache(text_config(tmp_path, tmp_path / "empty.txt"), TOK)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(GptMiniError, match="no text files"):
        prepare_cache(text_config(tmp_path, tmp_path / "nothing"), TOK)
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "a.bin").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.warns(UserWarning, match="binary"), pytest.raises(GptMiniError, match="no text files"):
        prepare_cache(text_config(tmp_path, tmp_path / "binaries"), TOK)


def test_corpus_shorter_than_one_window(tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words here\n" * 3)
    dm = TextDataModule(text_config(tmp_path, tmp_path / "tiny.txt"), TOK, block_size=512)
    with pytest.raises(GptMiniError, match="block_size") as info:
        dm.setup()
    train_tokens = read_meta(prepare_cache(dm.data_config, TOK))["train_tokens"]
    assert f"has {train_tokens} tokens" in str(info.value) and "513" in str(info.value)


def test_bad_block_size_and_seed(tmp_path):
    with pytest.raises(GptMiniError, match="block_size"):
        TextDataModule(DataConfig(), TOK, block_size=0)
    with pytest.raises(GptMiniError, match="seed"):
        TextDataModule(DataConfig(), TOK, block_size=8, seed=-1)


# --- corpora and splits ---


def test_documents_joined_by_eot_id(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    texts[1] = f"this document mentions {EOT} literally\n" + texts[1]
    (tmp_path / "corpus" / "doc1.txt").write_text(texts[1])
    folder = prepare_cache(text_config(tmp_path, tmp_path / "corpus", val_fraction=0.0), TOK)
    enc = load_cached_tokenizer(folder)
    tokens = tokens_of(folder, "train").tolist()
    assert tokens.count(enc.eot_token) == len(texts) - 1  # separators only; the literal is ordinary text
    assert enc.decode(tokens) == EOT.join(texts)
    meta = read_meta(folder)
    assert meta["val_tokens"] == 0 and meta["train_bytes"] == sum(len(t.encode()) for t in texts)


def test_split_is_last_fraction_by_bytes_at_a_character_boundary(tmp_path):
    text = "".join(f"línea {i}: ünïcödé ✓ 🙂\n" for i in range(300))
    path = tmp_path / "one.txt"
    path.write_text(text)
    for fraction in (0.1, 0.37):
        folder = prepare_cache(text_config(tmp_path, path, val_fraction=fraction), TOK)
        enc = load_cached_tokenizer(folder)
        train, val = (
            enc.decode(tokens_of(folder, "train").tolist()),
            enc.decode(tokens_of(folder, "val").tolist()),
        )
        assert train + val == text
        cut = int(len(text.encode()) * (1 - fraction))
        assert 0 <= len(train.encode()) - cut <= 3  # moved forward to the next character at most
        meta = read_meta(folder)
        assert (meta["train_bytes"], meta["val_bytes"]) == (len(train.encode()), len(val.encode()))


def test_long_documents_encode_as_if_whole(tmp_path, monkeypatch):
    # Tiny blocks and pieces force many cuts; the tokens must equal encoding the whole text at once.
    monkeypatch.setattr(corpus_mod, "READ_BLOCK_BYTES", 97)
    monkeypatch.setattr(corpus_mod, "PIECE_CHARS", 256)
    text = "".join(f"    indented {i}\n\n\nword{i} x = [{i}]\n  \n" for i in range(200))
    (tmp_path / "long.txt").write_text(text)
    folder = prepare_cache(text_config(tmp_path, tmp_path / "long.txt", val_fraction=0.0), TOK)
    enc = load_cached_tokenizer(folder)
    assert tokens_of(folder, "train").tolist() == enc.encode_ordinary(text)


def test_invalid_utf8_is_replaced_and_reported(tmp_path):
    good = make_text(0)
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"caf\xe9 \xff\xfe end\n")
    with pytest.warns(UserWarning, match="replaced 3 invalid UTF-8"):
        folder = prepare_cache(text_config(tmp_path, tmp_path / "bad.txt", val_fraction=0.0), TOK)
    assert read_meta(folder)["invalid_utf8_bytes"] == 3
    enc = load_cached_tokenizer(folder)
    assert enc.decode(tokens_of(folder, "train").tolist()).endswith("caf\ufffd \ufffd\ufffd end\n")


def test_binary_and_hidden_files_are_skipped(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "corpus" / ".git").mkdir()
    (tmp_path / "corpus" / ".git" / "config").write_text("[core]\n")
    with pytest.warns(UserWarning, match=r"skipped 1 binary file.*image\.png"):
        corpus = resolve_corpus(text_config(tmp_path, tmp_path / "corpus"))
    assert [p.name for p in corpus.files] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    assert len(corpus.files) == len(texts)


def test_glob_path(tmp_path):
    make_corpus(tmp_path / "corpus")
    corpus = resolve_corpus(text_config(tmp_path, tmp_path / "corpus" / "**" / "*.txt"))
    assert sorted(p.name for p in corpus.files) == ["doc0.txt", "doc1.txt", "doc2.txt"]


def test_pystdlib_corpus_lists_library_source_only():
    corpus = resolve_corpus(DataConfig())
    names = [p.as_posix() for p in corpus.files]
    assert any(name.endswith("/json/decoder.py") for name in names)
    assert not any(
        "/test/" in n or "/tests/" in n or "/idle_test/" in n or "site-packages" in n for n in names
    )
    assert len(names) > 300 and sum(p.stat().st_size for p in corpus.files) > 5_000_000


def test_pystdlib_default_cache(tmp_path):
    dm = TextDataModule(DataConfig(cache_dir=str(tmp_path)), TokenizerConfig(), block_size=64)
    dm.setup()
    assert dm.vocab_size == 4096 and dm.meta["dtype"] == "uint16"
    assert dm.cache_dir.parent == tmp_path / "pystdlib" / "bpe-4096-gpt4"
    assert 2.5 < dm.bytes_per_token("val") < 6  # code tokenizes at ~3.5 bytes per token
    assert dm.meta["train_bytes"] > 8 * dm.meta["val_bytes"]


def test_default_cache_dir_is_the_repository_data_folder():
    assert corpus_mod.DEFAULT_CACHE_DIR == Path(corpus_mod.__file__).resolve().parents[2] / "data"


def test_token_dtype():
    assert cache_mod._token_dtype(50257) is np.uint16
    assert cache_mod._token_dtype(65535) is np.uint16
    assert cache_mod._token_dtype(100277) is np.uint32


# --- shakespeare ---


def test_shakespeare_local_copy_split_matches_nanogpt(tmp_path, shakespeare_path):
    data = DataConfig(name="shakespeare", path=str(shakespeare_path), cache_dir=str(tmp_path))
    folder = prepare_cache(data, TokenizerConfig(vocab_size=512))
    enc = load_cached_tokenizer(folder)
    text = shakespeare_path.read_text()
    assert len(text) == 1_115_394
    assert enc.decode(tokens_of(folder, "val").tolist()) == text[int(len(text) * 0.9) :]


def test_shakespeare_download_verified_and_atomic(tmp_path, monkeypatch, shakespeare_path):
    content = shakespeare_path.read_bytes()
    calls = []

    class Response:
        def __init__(self, body):
            self.body = body

        def read(self):
            return self.body

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return Response(content)

    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", fake_urlopen)
    corpus = resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(tmp_path)))
    assert corpus.files == [tmp_path / "shakespeare" / "input.txt"]
    assert corpus.files[0].read_bytes() == content
    assert calls[0][0] == corpus_mod.SHAKESPEARE_URL and calls[0][1] <= 30
    resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(tmp_path)))
    assert len(calls) == 1  # downloaded once

    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", lambda url, timeout: Response(b"corrupt"))
    with pytest.raises(GptMiniError, match="sha256"):
        resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(tmp_path / "other")))
    assert not (tmp_path / "other" / "shakespeare" / "input.txt").exists()


def test_shakespeare_offline_gives_both_remedies(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", offline)
    with pytest.raises(GptMiniError, match="data.path") as info:
        resolve_corpus(DataConfig(name="shakespeare", cache_dir=str(tmp_path)))
    assert "internet" in str(info.value)


def test_shakespeare_modified_copy_warns(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(make_text(0))
    with pytest.warns(UserWarning, match="not the reference"):
        resolve_corpus(DataConfig(name="shakespeare", path=str(path), cache_dir=str(tmp_path)))


# --- caches ---


def test_cache_reused_then_invalidated(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    data = text_config(tmp_path, tmp_path / "corpus")
    folder = prepare_cache(data, TOK)
    stamp = (folder / "train.bin").stat().st_mtime_ns
    before = tokens_of(folder, "train").copy()
    assert prepare_cache(data, TOK) == folder
    assert (folder / "train.bin").stat().st_mtime_ns == stamp  # not re-tokenized

    (tmp_path / "corpus" / "doc0.txt").write_text(texts[0] + "a brand new closing line.\n")
    changed = prepare_cache(data, TOK)
    assert changed != folder and not np.array_equal(tokens_of(changed, "train"), before)
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
    folder = Path(folders[0])
    meta = read_meta(folder)
    assert (folder / "train.bin").stat().st_size == meta["train_tokens"] * 2
    assert (folder / "val.bin").stat().st_size == meta["val_tokens"] * 2
    entries = sorted(p.name for p in folder.parent.iterdir())
    assert entries == [folder.name, folder.name + ".lock"]  # no temporary folders left behind


# --- the DataModule ---


def test_windows_are_shifted_contiguous_slices(tmp_path):
    dm = datamodule(tmp_path, block_size=16, batch_size=4)
    tokens = tokens_of(dm.cache_dir, "train")
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
    tokens = tokens_of(dm.cache_dir, "val")
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


def test_datamodule_attributes(tmp_path):
    dm = datamodule(tmp_path)
    assert dm.vocab_size == dm.tokenizer.n_vocab == 300
    assert dm.tokenizer_spec["kind"] == "bpe"
    assert {"train_tokens", "val_tokens", "train_bytes", "val_bytes"} <= set(dm.meta)
    assert dm.bytes_per_token("val") == dm.meta["val_bytes"] / dm.meta["val_tokens"]
    json.dumps(dm.tokenizer_spec)  # plain values only


def test_train_batches_pickle_without_the_memmap(tmp_path):
    import pickle

    dm = datamodule(tmp_path)
    stream = TrainBatches(dm.cache_dir / "train.bin", dm.meta["dtype"], 16, 4, seed=1, rank=0, start=0)
    stream.batch(0)
    assert pickle.loads(pickle.dumps(stream))._tokens is None


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
    full = _Recorder(full_dm.vocab_size)
    _trainer(tmp_path, 6).fit(full, datamodule=full_dm)
    assert len(full.seen) == 6
    assert full_dm.state_dict() == {"batches_consumed": 6}  # validation batches are not counted

    first_dm = datamodule(tmp_path)
    first = _Recorder(first_dm.vocab_size)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(first, datamodule=first_dm)
    trainer.save_checkpoint(tmp_path / "half.ckpt")

    resumed_dm = datamodule(tmp_path)
    resumed = _Recorder(resumed_dm.vocab_size)
    _trainer(tmp_path, 6).fit(resumed, datamodule=resumed_dm, ckpt_path=tmp_path / "half.ckpt")
    assert first.seen + resumed.seen == full.seen
    assert resumed_dm.state_dict() == {"batches_consumed": 6}
