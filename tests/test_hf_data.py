"""data=hf: local jsonl/parquet through datasets, the validation split (the one rule, over a stream),
sharded caches (resume after an interruption included), the DataModule across shards, and bad input. Hub
tests skip offline."""

import json
import os
import socket

import numpy as np
import pytest
import torch

import gptmini.data.hf_source as hf_source
import gptmini.data.shards as shards_mod
from gptmini.common import GptMiniError
from gptmini.data.corpus import DataConfig, HFConfig
from gptmini.data.datamodule import TextDataModule, TrainBatches, ValWindows
from gptmini.data.token_cache import open_cache, prepare_cache, read_meta
from gptmini.data.tokenizer import TokenizerConfig

pytest.importorskip("datasets")

GPT2 = TokenizerConfig(name="gpt2")
WORDS = "river stone light over under quick brown lazy fox dog ünï 42 the a of".split()


def documents(n: int = 120, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for i in range(n)]


def write_jsonl(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({field: text, "id": i}) + "\n")
    return path


def hf_data(tmp_path, files, **kwargs) -> DataConfig:
    hf = {"path": "json", "data_files": str(files), **kwargs.pop("hf", {})}
    kwargs.setdefault("shard_tokens", 200)
    kwargs.setdefault("val_fraction", 0.2)
    return DataConfig(name="hf", hf=hf, cache_dir=str(tmp_path / "cache"), **kwargs)


def expected_split(enc, texts, val_fraction=0.2):
    """What the cache must hold for a source smaller than one block: the last val_fraction of its text bytes
    is validation, and every document is preceded by <|endoftext|> (none where the cut falls)."""
    cut = int(sum(len(t.encode()) for t in texts) * (1 - val_fraction))
    out, offset = {"train": [], "val": []}, 0
    for text in texts:
        data = text.encode()
        if offset + len(data) <= cut:
            out["train"] += [enc.eot_token, *enc.encode_ordinary(text)]
        elif offset >= cut:
            out["val"] += [enc.eot_token, *enc.encode_ordinary(text)]
        else:
            at = cut - offset
            while 0x80 <= data[at] < 0xC0:  # at the next character
                at += 1
            out["train"] += [enc.eot_token, *enc.encode_ordinary(data[:at].decode())]
            out["val"] += enc.encode_ordinary(data[at:].decode())
        offset += len(data)
    return out


@pytest.fixture(autouse=True)
def _gpt2(gpt2_available):
    """Every test here encodes with tiktoken's gpt2 (exact tokens to compare against)."""


# --- reading local files ---


def test_local_jsonl_tokenized_into_shards_with_the_one_split_rule(tmp_path):
    texts = documents()
    data = hf_data(tmp_path, write_jsonl(tmp_path / "c" / "a.jsonl", texts))
    cache = open_cache(prepare_cache(data, GPT2))
    expected = expected_split(cache.tokenizer, texts)
    meta = cache.meta
    assert meta["train_documents"] + meta["val_documents"] == len(texts)
    for split in ("train", "val"):
        assert cache.stream(split)[:].tolist() == expected[split]
        lengths = meta["shards"][split]
        assert all(n == 200 for n in lengths[:-1]) and 0 < lengths[-1] <= 200 and len(lengths) >= 2
        assert [p.stat().st_size for p in cache.token_files(split)] == [2 * n for n in lengths]
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(t.encode()) for t in texts)
    assert 0 <= meta["train_bytes"] - int(sum(len(t.encode()) for t in texts) * 0.8) <= 3  # a character
    # Prepared again: the same folder, nothing rebuilt.
    assert prepare_cache(data, GPT2) == cache.folder


def test_an_imported_gpt2s_tokenizer_finds_the_tokenizer_gpt2_cache(tmp_path):
    from gptmini.data.tokenizer import tokenizer_from_spec
    from gptmini.weights import GPT2_TOKENIZER

    data = hf_data(tmp_path, write_jsonl(tmp_path / "a.jsonl", documents(20)))
    folder = prepare_cache(data, GPT2)
    imported = tokenizer_from_spec(GPT2_TOKENIZER)  # what init_from=gpt2 tokenizes with
    assert prepare_cache(data, TokenizerConfig(), imported) == folder


def test_parquet_gives_the_same_tokens_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = documents(60)
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet")
    parquet = hf_data(tmp_path, tmp_path / "c.parquet", hf={"path": "parquet", "text_field": "body"})
    jsonl = hf_data(tmp_path, write_jsonl(tmp_path / "c.jsonl", texts))
    a, b = open_cache(prepare_cache(parquet, GPT2)), open_cache(prepare_cache(jsonl, GPT2))
    assert a.folder != b.folder
    for split in ("train", "val"):
        assert a.stream(split)[:].tolist() == b.stream(split)[:].tolist()


def test_a_stream_longer_than_a_block_holds_out_the_tail_of_every_block(tmp_path, monkeypatch):
    # The rule needs no length in advance: each block (closed by the document that reaches its size) is split
    # on its own, so validation text comes from all over the stream.
    monkeypatch.setattr(shards_mod, "VAL_BLOCK_BYTES", 1500)
    texts = documents(300)
    cache = open_cache(prepare_cache(hf_data(tmp_path, write_jsonl(tmp_path / "a.jsonl", texts)), GPT2))
    expected, block, size = {"train": [], "val": []}, [], 0
    for i, text in enumerate(texts):
        block.append(text)
        size += len(text.encode())
        if size >= 1500 or i == len(texts) - 1:
            for split, tokens in expected_split(cache.tokenizer, block).items():
                expected[split] += tokens
            block, size = [], 0
    for split in ("train", "val"):
        assert cache.stream(split)[:].tolist() == expected[split]
    assert cache.meta["val_documents"] > 10  # from many blocks, not only the stream's end


def test_max_tokens_caps_the_cache_exactly(tmp_path):
    data = hf_data(tmp_path, write_jsonl(tmp_path / "a.jsonl", documents()), max_tokens=555)
    meta = open_cache(prepare_cache(data, GPT2)).meta
    assert (meta["train_tokens"], meta["val_tokens"]) == (444, 111)  # shared by data.val_fraction=0.2


# --- resume after an interruption ---


class Interrupt(BaseException):
    """Stands for Ctrl-C or kill -9 in the middle of a build."""


def _interrupt_after(monkeypatch, method: str, calls: int):
    original = getattr(shards_mod.ShardWriter, method)
    count = {"n": 0}

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            raise Interrupt
        return result

    monkeypatch.setattr(shards_mod.ShardWriter, method, wrapped)


@pytest.mark.parametrize(
    "where",
    ["after a commit", "after a shard was renamed, before its commit"],
)
def test_an_interrupted_build_resumes_without_redoing_finished_shards(tmp_path, monkeypatch, where):
    texts = documents(400)
    files = write_jsonl(tmp_path / "a.jsonl", texts)
    reference = open_cache(prepare_cache(hf_data(tmp_path / "ref", files), GPT2))
    data = hf_data(tmp_path, files)
    monkeypatch.setattr(shards_mod, "BATCH_DOCS", 16)
    monkeypatch.setattr(shards_mod, "COMMIT_EVERY_S", 0.0)
    with monkeypatch.context() as patch:
        if where == "after a commit":
            original = shards_mod._write_progress
            commits = {"n": 0}

            def write_then_stop(*args):
                original(*args)
                commits["n"] += 1
                if commits["n"] == 6:
                    raise Interrupt

            patch.setattr(shards_mod, "_write_progress", write_then_stop)
        else:
            _interrupt_after(patch, "_finish_shard", 3)
        with pytest.raises(Interrupt):
            prepare_cache(data, GPT2)
    building = next((tmp_path / "cache" / "hf" / "json" / "gpt2").glob(".*.building"))
    state = json.loads((building / "progress.json").read_text())
    assert state["next_doc"] > 0
    finished = {p.name: p.stat().st_ino for p in building.glob("train_*.bin")}
    finished = {
        name: ino
        for name, ino in finished.items()
        if int(name[6:12]) < len(state["splits"]["train"]["lengths"])
    }
    assert finished
    starts = []
    original_iter = hf_source.iter_documents
    monkeypatch.setattr(
        hf_source,
        "iter_documents",
        lambda ds, hf, start: starts.append(start) or original_iter(ds, hf, start),
    )
    cache = open_cache(prepare_cache(data, GPT2))
    assert starts == [state["next_doc"]]  # reading resumed where the state says, not at document 0
    for name, inode in finished.items():
        assert (cache.folder / name).stat().st_ino == inode  # a finished shard is never written again
    assert cache.meta["shards"] == reference.meta["shards"]
    for split in ("train", "val"):
        assert cache.stream(split)[:].tolist() == reference.stream(split)[:].tolist()
    assert not list(cache.folder.glob("*.partial")) and not (cache.folder / "progress.json").exists()


# --- the DataModule across shards ---


def test_windows_span_shards_and_keep_the_resume_and_rank_guarantees(tmp_path):
    data = hf_data(tmp_path, write_jsonl(tmp_path / "a.jsonl", documents(300)), batch_size=8, shard_tokens=97)
    cache = open_cache(prepare_cache(data, GPT2))
    whole = np.asarray(cache.stream("train")[:])
    assert len(cache.token_files("train")) > 5
    stream = TrainBatches(cache.token_files("train"), "uint16", 16, 8, seed=3, rank=0, start=0)
    crossing = 0
    for k in range(20):
        x, y = stream.batch(k)
        rng = np.random.default_rng([3, 0, k])
        starts = rng.integers(0, len(whole) - 16, size=8)
        assert x.tolist() == [whole[s : s + 16].tolist() for s in starts]
        assert torch.equal(x[:, 1:], y[:, :-1])
        crossing += sum((s // 97) != ((s + 16) // 97) for s in starts)
    assert crossing > 0  # some windows ran on into the next shard
    other_rank = TrainBatches(cache.token_files("train"), "uint16", 16, 8, seed=3, rank=1, start=0)
    assert not torch.equal(other_rank.batch(0)[0], stream.batch(0)[0])
    dm = TextDataModule(cache, data, block_size=16, seed=3)
    batches = iter(dm.train_dataloader())
    first = [next(batches)[0] for _ in range(3)]
    resumed = TextDataModule(cache, data, block_size=16, seed=3)
    resumed.load_state_dict({"batches_consumed": 2})
    assert torch.equal(next(iter(resumed.train_dataloader()))[0], first[2])
    val = np.asarray(cache.stream("val")[:])
    windows = ValWindows(cache.token_files("val"), "uint16", len(val), 16)
    covered = [t for i in range(len(windows)) for t in windows[i][1].tolist()]
    assert covered == val[1 : 1 + len(covered)].tolist() and len(val) - 1 - len(covered) < 16


def test_a_damaged_shard_is_named(tmp_path):
    data = hf_data(tmp_path, write_jsonl(tmp_path / "a.jsonl", documents()))
    folder = prepare_cache(data, GPT2)
    (folder / "train_000001.bin").write_bytes(b"\0\0")
    with pytest.raises(
        GptMiniError, match=r"damaged \(train_000001.bin has 2 bytes, meta.json says 200 tokens\)"
    ):
        read_meta(folder)
    (folder / "train_000001.bin").unlink()
    with pytest.raises(GptMiniError, match=r"damaged \(train_000001.bin is missing\); delete that folder"):
        open_cache(folder)


# --- bad input ---


def test_bad_hf_settings_are_one_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", documents(10))
    with pytest.raises(GptMiniError, match="data=hf needs data.hf.path"):
        DataConfig(name="hf")
    with pytest.raises(GptMiniError, match="data.max_tokens=5 only applies to data=hf"):
        DataConfig(name="text", path="x", max_tokens=5)
    with pytest.raises(GptMiniError, match="data.shard_tokens=0 must be"):
        DataConfig(shard_tokens=0)
    with pytest.raises(GptMiniError, match="data.hf.text_field='' must name a column"):
        HFConfig(path="json", text_field="")
    with pytest.raises(GptMiniError, match=r"data.hf.data_files='.*nothing\*.jsonl' matches no files"):
        prepare_cache(hf_data(tmp_path, tmp_path / "nothing*.jsonl"), GPT2)
    with pytest.raises(
        GptMiniError, match="data.hf.text_field='body' is not a column .* its columns are: text, id"
    ):
        prepare_cache(hf_data(tmp_path, tmp_path / "a.jsonl", hf={"text_field": "body"}), GPT2)
    write_jsonl(tmp_path / "empty.jsonl", [""] * 5)
    with pytest.raises(GptMiniError, match="gave no training text"):
        prepare_cache(hf_data(tmp_path, tmp_path / "empty.jsonl", val_fraction=0.0), GPT2)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')
    with pytest.raises(GptMiniError, match=r"bad.jsonl line 2 is not JSON \(Expecting value at column 10\)"):
        prepare_cache(hf_data(tmp_path, tmp_path / "bad.jsonl"), GPT2)
    assert not list((tmp_path / "cache").rglob("meta.json"))


def _prepare_fails(data) -> str:
    """The one-line message prepare_cache raises for ``data``, after checking no cache was finished."""
    with pytest.raises(GptMiniError) as info:
        prepare_cache(data, GPT2)
    assert "\n" not in str(info.value) and not list((tmp_path_of(data) / "cache").rglob("meta.json"))
    return str(info.value)


def tmp_path_of(data: DataConfig):
    from pathlib import Path

    return Path(data.cache_dir).parent


def test_a_local_folder_is_keyed_by_its_files(tmp_path):
    folder = tmp_path / "corpus"
    write_jsonl(folder / "a.jsonl", documents(20))
    data = DataConfig(
        name="hf", hf={"path": str(folder)}, cache_dir=str(tmp_path / "cache"), shard_tokens=200
    )
    first = open_cache(prepare_cache(data, GPT2))
    assert first.meta["train_documents"] + first.meta["val_documents"] == 20
    write_jsonl(folder / "a.jsonl", documents(30, seed=1))  # changed in place
    second = open_cache(prepare_cache(data, GPT2))
    assert second.folder != first.folder
    assert second.meta["train_documents"] + second.meta["val_documents"] == 30
    write_jsonl(folder / "b.jsonl", documents(5, seed=2))  # a file added
    third = open_cache(prepare_cache(data, GPT2))
    assert third.folder not in (first.folder, second.folder)
    assert third.meta["train_documents"] + third.meta["val_documents"] == 35
    # data_files under a folder are paths inside it, as datasets reads them
    only_b = DataConfig(
        name="hf", hf={"path": str(folder), "data_files": "b.jsonl"}, cache_dir=data.cache_dir
    )
    assert hf_source.local_files(only_b.hf) == [folder / "b.jsonl"]


def test_a_file_named_twice_is_read_once_and_empty_files_are_skipped(tmp_path):
    texts = documents(40)
    a = write_jsonl(tmp_path / "c" / "a.jsonl", texts)
    (tmp_path / "c" / "empty.jsonl").write_text("")  # datasets' json reader fails on one after another file
    (tmp_path / "link.jsonl").symlink_to(a)
    files = [str(a), str(tmp_path / "c" / "empty.jsonl"), str(a), str(tmp_path / "c" / "*.jsonl")]
    data = hf_data(tmp_path, None, hf={"data_files": [*files, str(tmp_path / "link.jsonl")]})
    cache = open_cache(prepare_cache(data, GPT2))
    expected = expected_split(cache.tokenizer, texts)
    for split in ("train", "val"):
        assert cache.stream(split)[:].tolist() == expected[split]


def test_an_empty_source_is_one_line(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.jsonl").write_text("")
    empty = tmp_path / "c" / "empty.jsonl"
    assert _prepare_fails(hf_data(tmp_path, empty)) == (
        f"Hugging Face dataset json files {empty}, split train is empty: its 1 file(s) hold 0 bytes "
        f"({empty}); point data.hf.data_files at files with documents."
    )
    folder = DataConfig(name="hf", hf={"path": str(tmp_path / "c")}, cache_dir=str(tmp_path / "cache"))
    assert "is empty: its 1 file(s) hold 0 bytes" in _prepare_fails(folder)
    assert "point data.hf.path at files with documents" in _prepare_fails(folder)


NOT_TEXT = {
    "5": "a number (5)",
    "1.5": "a number (1.5)",
    "true": "a boolean (True)",
    "null": "null (or is missing)",
    '["x"]': "a list (['x'])",
    '{"a": 1}': "a dict ({'a': 1})",
}


@pytest.mark.parametrize("value", list(NOT_TEXT))
def test_a_record_that_is_not_text_is_refused_naming_file_line_and_field(tmp_path, value):
    # A file of good documents first: datasets would cast a later file's values to its text type ("5").
    first = write_jsonl(tmp_path / "a.jsonl", documents(30))
    second = tmp_path / "b.jsonl"
    second.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": ' + value + ', "id": 3}\n')
    message = _prepare_fails(hf_data(tmp_path, None, hf={"data_files": [str(first), str(second)]}))
    assert message == (
        f"{second} line 4: the field 'text' holds {NOT_TEXT[value]}, not text. Every document must be a "
        "string: fix or remove that record, or set data.hf.text_field to the column that holds the text."
    )


def test_bad_records_in_other_formats_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "p1.parquet")
    pq.write_table(pa.table({"text": [3, 4]}), tmp_path / "p2.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "p3.parquet")
    parquet = {"path": "parquet", "data_files": [str(tmp_path / "p1.parquet"), str(tmp_path / "p2.parquet")]}
    assert _prepare_fails(hf_data(tmp_path, None, hf=parquet)).startswith(
        f"{tmp_path / 'p2.parquet'} row 1: the field 'text' holds a number (3), not text."
    )
    parquet["data_files"] = [str(tmp_path / "p1.parquet"), str(tmp_path / "p3.parquet")]
    assert _prepare_fails(hf_data(tmp_path, None, hf=parquet)).startswith(
        f"{tmp_path / 'p3.parquet'} row 2: the field 'text' holds null (or is missing), not text."
    )
    (tmp_path / "array.json").write_text('[\n{"text": "x"},\n{"body": "y"}\n]\n')
    assert _prepare_fails(hf_data(tmp_path, tmp_path / "array.json")).startswith(
        f"{tmp_path / 'array.json'} record 2: the field 'text' holds null (or is missing), not text."
    )


def test_a_malformed_or_non_utf8_line_is_named_by_its_real_line(tmp_path):
    lines = [json.dumps({"text": t}) for t in documents(3000)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines, '{"text": "cut short', *lines[:50]]) + "\n")
    message = _prepare_fails(hf_data(tmp_path, bad))
    assert (
        message
        == f"{bad} line 3001 is not JSON (Invalid control character at column 20); fix or remove that line."
    )
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert _prepare_fails(hf_data(tmp_path, latin)) == (
        f"{latin} line 2 is not UTF-8 (byte 14 of the line); save the file as UTF-8."
    )


def test_a_validation_split_too_small_for_one_window_is_refused(tmp_path):
    data = hf_data(tmp_path, write_jsonl(tmp_path / "a.jsonl", documents(20)), val_fraction=0.0001)
    cache = open_cache(prepare_cache(data, GPT2))
    assert cache.meta["val_tokens"] < 2
    with pytest.raises(GptMiniError) as info:
        TextDataModule(cache, data, block_size=16)
    size = cache.meta["train_bytes"] + cache.meta["val_bytes"]
    assert str(info.value) == (
        f"the validation split of {cache.meta['source']} has {cache.meta['val_tokens']} token(s), too few "
        f"for one validation window (data.val_fraction=0.0001 of its {size} bytes), so the run would train "
        "without a validation loss; use more text, a larger data.val_fraction, or data.val_fraction=0 to "
        "train without validation."
    )


def test_hub_dataset_offline_is_one_line(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = DataConfig(name="hf", hf={"path": "gptmini-tests/no-such-dataset"}, cache_dir=str(tmp_path))
    with pytest.raises(
        GptMiniError, match=r"offline and not cached .* or use local files: data.hf.path=json"
    ) as info:
        prepare_cache(data, GPT2)
    assert "\n" not in str(info.value)


def test_compose_data_hf_and_typos(compose_train):
    cfg = compose_train(["data=hf", "data.hf.path=json", "data.hf.data_files=[a.jsonl,b.jsonl]"])
    assert cfg.data.hf.data_files == ["a.jsonl", "b.jsonl"] and cfg.data.hf.text_field == "text"
    with pytest.raises(Exception, match="pth"):
        compose_train(["data=hf", "data.hf.pth=json"])


def _hub_online() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_hub_dataset_streams(tmp_path):
    if not _hub_online():
        pytest.skip("the Hugging Face Hub is not reachable (offline)")
    hf = {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"}
    data = DataConfig(name="hf", hf=hf, max_tokens=20_000, shard_tokens=4096, cache_dir=str(tmp_path))
    meta = open_cache(prepare_cache(data, GPT2)).meta
    assert meta["train_tokens"] + meta["val_tokens"] == 20_000


@pytest.mark.slow
def test_kill_9_mid_build_then_resume_in_a_new_process(tmp_path):
    """A real SIGKILL (no cleanup code runs) between commits; the next process finishes the same cache."""
    import signal
    import subprocess
    import sys
    import time

    files = write_jsonl(tmp_path / "a.jsonl", documents(600))
    reference = open_cache(prepare_cache(hf_data(tmp_path / "ref", files), GPT2))
    script = f"""
import time
import gptmini.data.hf_source as hf_source, gptmini.data.shards as shards
from gptmini.data.corpus import DataConfig
from gptmini.data.token_cache import prepare_cache
from gptmini.data.tokenizer import TokenizerConfig
shards.BATCH_DOCS, shards.COMMIT_EVERY_S = 8, 0.0
original = hf_source.iter_documents
def slow(*args):
    for document in original(*args):
        time.sleep(0.006)
        yield document
hf_source.iter_documents = slow
data = DataConfig(name="hf", hf={{"path": "json", "data_files": {str(files)!r}}}, shard_tokens=200,
                  val_fraction=0.2, cache_dir={str(tmp_path / "cache")!r})
prepare_cache(data, TokenizerConfig(name="gpt2"))
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    progress = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "cache").glob("hf/json/gpt2/.*.building/progress.json"))
        if found and json.loads(found[0].read_text()).get("next_doc", 0) > 200:
            progress = found[0]
            break
        time.sleep(0.05)
    assert progress is not None, "the build did not get far enough to be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_shard = (progress.parent / "train_000000.bin").stat().st_ino
    cache = open_cache(prepare_cache(hf_data(tmp_path, files), GPT2))
    assert (cache.folder / "train_000000.bin").stat().st_ino == first_shard  # kept, not rebuilt
    for split in ("train", "val"):
        assert cache.stream(split)[:].tolist() == reference.stream(split)[:].tolist()


def test_without_the_datasets_package_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    data = hf_data(tmp_path, write_jsonl(tmp_path / "a.jsonl", documents(5)))
    with pytest.raises(
        GptMiniError, match=r"data=hf needs the datasets package: pip install -e '.\[datasets\]'"
    ):
        prepare_cache(data, GPT2)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd (Linux)")
def test_a_build_leaves_no_file_descriptor_open(tmp_path):
    prepare_cache(hf_data(tmp_path / "warm", write_jsonl(tmp_path / "w.jsonl", documents(20))), GPT2)
    data = hf_data(tmp_path, write_jsonl(tmp_path / "a.jsonl", documents(40)))
    before = _open_descriptors()
    prepare_cache(data, GPT2)
    assert _open_descriptors() == before
    # A build that fails after its shard files were opened closes them too.
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' * 3 + '{"text": oops\n')
    before = _open_descriptors()
    with pytest.raises(GptMiniError):
        prepare_cache(hf_data(tmp_path, tmp_path / "bad.jsonl"), GPT2)
    assert _open_descriptors() == before
