"""data=chat: records and their errors, the chat cache and split, padded batches, masks, resume, SFT runs."""

import errno
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import gptmini.data.chat_cache as chat_cache_mod
from gptmini.common import GptMiniError
from gptmini.data.chat_cache import mask_name, offsets_name, split_records
from gptmini.data.chat_datamodule import ChatDataModule, ChatTrainBatches
from gptmini.data.chat_records import chat_files, file_records
from gptmini.data.chat_template import get_template, render, to_entry
from gptmini.data.corpus import DataConfig
from gptmini.data.token_cache import open_cache, prepare_cache
from gptmini.data.tokenizer import TokenizerConfig
from gptmini.model.config import GPTConfig
from gptmini.model.gpt import GPT
from gptmini.training.run import train
from gptmini.training.settings import check_settings
from gptmini.weights import read_checkpoint

TOK = TokenizerConfig(name="bpe", vocab_size=300)
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
INSTRUCTION_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"


def conversation(rng: random.Random, reply: str | None = None, turns: int = 1) -> dict:
    """A random conversation; ``reply`` fixes every assistant reply (a pattern a model learns fast)."""
    messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
    for _ in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))})
        answer = reply or " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def some_records(n: int = 40, seed: int = 0, **kwargs) -> list[dict]:
    rng = random.Random(seed)
    return [conversation(rng, turns=rng.randint(1, 3), **kwargs) for _ in range(n)]


def chat_config(tmp_path: Path, path: Path, **kwargs) -> DataConfig:
    return DataConfig(name="chat", path=str(path), cache_dir=str(tmp_path / "cache"), **kwargs)


def chat_cache(tmp_path: Path, records: list | None = None, **kwargs):
    path = write_jsonl(tmp_path / "chats.jsonl", some_records() if records is None else records)
    data = chat_config(tmp_path, path, **kwargs)
    return open_cache(prepare_cache(data, TOK)), data


# ------------------------------------------------------------------------------------------------------------
# Records


def test_records_are_read_from_json_jsonl_a_folder_and_a_glob(tmp_path):
    rng = random.Random(1)
    one, two, three = (conversation(rng) for _ in range(3))
    write_jsonl(tmp_path / "d" / "a.jsonl", [one, two])
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b.json").write_text(json.dumps([three], indent=2))
    (tmp_path / "d" / "notes.txt").write_text("not records")
    expected = [[(m["role"], m["content"]) for m in r["messages"]] for r in (one, two, three)]

    for spec in (tmp_path / "d", f"{tmp_path}/d/**/*.json*"):
        records = file_records(chat_files(str(spec)))
        assert [r.messages for r in records] == expected
    records = file_records(chat_files(str(tmp_path / "d" / "sub" / "b.json")))
    assert records[0].where == f"{tmp_path / 'd' / 'sub' / 'b.json'}:2 (record 0)"
    with pytest.raises(GptMiniError, match=r"names no \.json or \.jsonl file"):
        chat_files(str(tmp_path / "d" / "notes.txt"))


BAD_RECORDS = [
    (
        '{"messages": [{"role": "bot", "content": "hi"}]}',
        r"chats.jsonl:2: message 0 has role 'bot'; use one of",
    ),
    ('{"messages": []}', r"chats.jsonl:2: the conversation is empty"),
    (
        '{"messages": [{"role": "user", "content": "hi"}]}',
        r"chats.jsonl:2: .*ends with a user turn.*assistant",
    ),
    (
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
        r"chats.jsonl:2: message 0's content is an int, not a string",
    ),
    (
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
        r"chats.jsonl:2: message 0 has no 'content' field",
    ),
    ('{"instruction": "Add 1 and 2"}', r"chats.jsonl:2: the Alpaca record has no 'output' field"),
    ('{"prompt": "hi"}', r"chats.jsonl:2: the record has no 'messages' field .* Alpaca record"),
    ('{"messages": [', r"chats.jsonl:2: invalid JSON"),
    ("[1, 2]", r"chats.jsonl:2: the record is a list, not an object"),
]


@pytest.mark.parametrize(("line", "message"), BAD_RECORDS)
def test_a_bad_jsonl_record_is_one_line_naming_file_line_and_field(tmp_path, line, message):
    good = json.dumps(conversation(random.Random(0)))
    path = tmp_path / "chats.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(GptMiniError, match=message) as error:
        prepare_cache(chat_config(tmp_path, path), TOK)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not list((tmp_path / "cache").rglob("meta.json")), "a bad record must leave no cache"


def test_a_bad_record_in_a_json_list_is_named_by_its_line_and_index(tmp_path):
    good = conversation(random.Random(0))
    path = tmp_path / "chats.json"
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}
    path.write_text(json.dumps([good, bad], indent=1))
    starts = [n for n, text in enumerate(json.dumps([good, bad], indent=1).splitlines(), 1) if text == " {"]
    line = starts[1]  # where the second record opens
    with pytest.raises(GptMiniError, match=rf"chats.json:{line} \(record 1\): message 1's content is null"):
        prepare_cache(chat_config(tmp_path, path), TOK)
    path.write_text('[{"messages": [}]')
    with pytest.raises(GptMiniError, match=r"chats.json:1: invalid JSON"):
        prepare_cache(chat_config(tmp_path, path), TOK)


def test_chat_settings_are_checked_and_refused_where_they_would_do_nothing(tmp_path, compose_train):
    with pytest.raises(GptMiniError, match=r"data.template='chatml' is unknown; use one of: alpaca, chat"):
        DataConfig(name="chat", path="x.jsonl", template="chatml")
    with pytest.raises(GptMiniError, match=r"data.epochs=0 must be an integer >= 1"):
        DataConfig(name="chat", path="x.jsonl", epochs=0)
    with pytest.raises(GptMiniError, match=r"data=chat needs exactly one source"):
        DataConfig(name="chat")
    for key, value in (("template", "alpaca"), ("mask_prompt", False), ("epochs", 2), ("split_seed", 7)):
        with pytest.raises(GptMiniError, match=rf"data.{key}=.* only applies to data=chat"):
            DataConfig(name="text", path="x.txt", **{key: value})
    cfg = compose_train(["data=chat", "data.path=x.jsonl", "data.epochs=2", "optim.schedule_by=time"])
    cfg.trainer.max_time = "00:00:01:00"
    with pytest.raises(
        GptMiniError, match=r"data.epochs=2 sets the run's length in steps, but optim.schedule_by"
    ):
        check_settings(cfg, tmp_path)


# ------------------------------------------------------------------------------------------------------------
# The cache and the split


def test_an_alpaca_record_renders_as_its_one_turn_conversation(tmp_path):
    alpaca = [
        {"instruction": "Add the numbers.", "input": "1 and 2", "output": "3"},
        {"instruction": "Say hi.", "output": "Hi!"},
    ]
    messages = [
        {
            "messages": [
                {"role": "user", "content": "Add the numbers.\n\n### Input:\n1 and 2"},
                {"role": "assistant", "content": "3"},
            ]
        },
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    ]
    folders = []
    for name, records in (("alpaca", alpaca), ("messages", messages)):
        path = write_jsonl(tmp_path / name / "r.jsonl", records)
        data = chat_config(tmp_path, path, template="alpaca", val_fraction=0.0)
        folders.append(prepare_cache(data, TokenizerConfig(name="bpe", vocab_size=270)))
    for name in ("train_000000.bin", mask_name("train"), offsets_name("train")):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    cache = open_cache(folders[0])
    text = cache.tokenizer.decode(cache.stream("train")[:].tolist())
    assert (
        "### Instruction:\nAdd the numbers.\n\n### Input:\n1 and 2\n\n### Response:\n3<|endoftext|>" in text
    )


def test_the_split_is_by_record_fixed_by_split_seed_and_disjoint(tmp_path):
    train, val = split_records(100, 0.1, 1337)
    assert (train, val) == split_records(100, 0.1, 1337)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_records(100, 0.1, 1)[1] != val
    assert split_records(2, 0.01, 0)[1] != [] and split_records(5, 0.0, 0)[1] == []

    records = some_records(30)
    cache, _ = chat_cache(tmp_path, records, val_fraction=0.2, split_seed=5)
    assert (cache.meta["train_records"], cache.meta["val_records"], cache.meta["kind"]) == (24, 6, "chat")
    # The validation split holds exactly the chosen records, in record order.
    expected = [records[i] for i in split_records(30, 0.2, 5)[1]]
    ids = cache.stream("val")[:].tolist()
    offsets = np.fromfile(cache.folder / offsets_name("val"), dtype=np.int64)
    template, enc = get_template("chat"), cache.tokenizer
    for n, record in enumerate(expected):
        assert ids[offsets[n] : offsets[n + 1]] == render(template, record["messages"], enc).ids
    again, _ = chat_cache(tmp_path, records, val_fraction=0.2, split_seed=5)
    other, _ = chat_cache(tmp_path, records, val_fraction=0.2, split_seed=6)
    assert again.folder == cache.folder != other.folder  # found again; another split is another cache
    assert not list((tmp_path / "cache").rglob("*.building"))


def test_a_damaged_chat_cache_is_a_one_line_error(tmp_path):
    cache, _ = chat_cache(tmp_path)
    (cache.folder / mask_name("val")).write_bytes(b"\x00")
    with pytest.raises(
        GptMiniError, match=r"is damaged \(val_mask.bin has 1 bytes, meta.json says \d+ bytes\)"
    ):
        open_cache(cache.folder)
    (cache.folder / offsets_name("train")).unlink()
    with pytest.raises(GptMiniError, match=r"is damaged \(train_offsets.bin is missing\)"):
        open_cache(cache.folder)


def test_an_unwritable_or_full_cache_folder_is_one_line_and_leaves_nothing(
    tmp_path, read_only_dir, monkeypatch
):
    path = write_jsonl(tmp_path / "chats.jsonl", some_records(10))
    data = DataConfig(name="chat", path=str(path), cache_dir=str(read_only_dir / "cache"))
    with pytest.raises(
        GptMiniError, match=r"the token cache under .*; set data.cache_dir=/a/folder/you/can/write"
    ):
        prepare_cache(data, TOK)

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chat_cache_mod, "_write_split", disk_full)
    with pytest.raises(GptMiniError, match=r"free some space there, or set data.cache_dir"):
        prepare_cache(chat_config(tmp_path, path), TOK)
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_dir()]
    assert not [name for name in leftovers if name.endswith(".building")] and not list(
        (tmp_path / "cache").rglob("meta.json")
    )


def test_gptmini_eval_refuses_chat_data_rather_than_scoring_the_prompts():
    from gptmini.eval.val import evaluate_val

    data = DataConfig(name="chat", path="chats.jsonl")
    with pytest.raises(GptMiniError, match=r"does not score data=chat yet"):
        evaluate_val(None, None, data, torch.device("cpu"), batch_size=4)


def test_instruction_data_of_the_book_reads_as_1100_alpaca_records():
    if not INSTRUCTION_DATA.is_file():
        pytest.skip(f"the book's instruction-data.json is not at {INSTRUCTION_DATA}")
    records = file_records(chat_files(str(INSTRUCTION_DATA)))
    raw = json.loads(INSTRUCTION_DATA.read_text())
    assert len(records) == len(raw) == 1100
    first = raw[0]
    user = first["instruction"] + (f"\n\n### Input:\n{first['input']}" if first["input"] else "")
    assert records[0].messages == [("user", user), ("assistant", first["output"])]


# ------------------------------------------------------------------------------------------------------------
# Batches


def test_padding_is_never_in_the_loss_and_changing_it_changes_nothing(tmp_path):
    cache, data = chat_cache(tmp_path, batch_size=6, mask_prompt=False)
    dm = ChatDataModule(cache, data, block_size=256, seed=3)
    x, y = next(iter(dm.train_dataloader()))
    kept = (y != -1).sum(dim=1)  # mask_prompt=false: every target of the conversation is kept
    assert x.shape[1] == int(kept.max()) < 256  # padded to the longest row, not to block_size
    for row, n in enumerate(kept.tolist()):
        assert (y[row, n:] == -1).all() and (x[row, n:] == cache.meta["eot_id"]).all()
        assert (y[row, :n] != -1).all()  # everything but padding is a target
        assert (y[row, : n - 1] == x[row, 1:n]).all()  # the next tokens
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=cache.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    other = x.clone()
    other[y == -1] = torch.randint(0, 256, (int((y == -1).sum()),))
    with torch.no_grad():
        assert torch.equal(model(x, y)[1], model(other, y)[1])
        assert torch.allclose(model.loss(x, y), model(x, y)[1])


def test_mask_prompt_keeps_only_the_replies_and_their_end_tokens(tmp_path):
    records = some_records(12, seed=4)
    cache, data = chat_cache(tmp_path, records, batch_size=4, val_fraction=0.0)
    dm = ChatDataModule(cache, data, block_size=200, seed=0)
    x, y = dm.train.batch(range(len(records)))
    eot = cache.tokenizer.eot_token
    for row, record in enumerate(records):
        kept = [int(t) for t in y[row] if t != -1]
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert kept.count(eot) == len(replies)  # each reply's end token is learned
        text = cache.tokenizer.decode([t for t in kept if t != eot])
        assert text == "".join(replies)
    assert dm.val_targets == 0 and dm.summary_fields["truncated_conversations"] == 0


def test_long_conversations_are_cut_to_a_window_and_counted(tmp_path, capsys):
    records = some_records(30, seed=2)
    cache, data = chat_cache(tmp_path, records, batch_size=4)
    lengths = np.diff(np.fromfile(cache.folder / offsets_name("train"), dtype=np.int64))
    lengths = np.concatenate([lengths, np.diff(np.fromfile(cache.folder / offsets_name("val"), np.int64))])
    block = int(np.median(lengths))
    dm = ChatDataModule(cache, data, block_size=block, seed=0)
    too_long = int((lengths > block + 1).sum())
    assert 0 < dm.summary_fields["truncated_conversations"] == too_long
    assert f"{too_long} of 30 conversations are longer than block_size + 1" in capsys.readouterr().err
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1] <= block
    fields = dm.summary_fields
    assert fields["train_conversations"] + fields["val_conversations"] + fields["skipped_conversations"] == 30


def test_the_training_stream_is_epoch_permutations_and_resumes_exactly(tmp_path):
    cache, data = chat_cache(tmp_path, some_records(24), batch_size=4, val_fraction=0.0)
    dm = ChatDataModule(cache, data, block_size=256, seed=9)
    stream = ChatTrainBatches(dm.train, 4, seed=9, rank=0, world=1, start=0)
    rows = [stream.rows(k) for k in range(12)]  # two epochs of 24
    assert sorted(sum(rows[:6], [])) == sorted(sum(rows[6:], [])) == list(range(24))
    assert sum(rows[:6], []) != sum(rows[6:], [])  # each epoch in its own order
    resumed = iter(ChatTrainBatches(dm.train, 4, seed=9, rank=0, world=1, start=5))
    for k in range(5, 9):
        x, y = next(resumed)
        ex, ey = stream.batch(k)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    ranks = [ChatTrainBatches(dm.train, 4, seed=9, rank=r, world=2, start=0).rows(0) for r in (0, 1)]
    assert ranks == [rows[0], rows[1]]  # two ranks split the same stream: disjoint batches
    dm.load_state_dict({"batches_consumed": 3})
    assert dm.state_dict() == {"batches_consumed": 3}
    assert torch.equal(next(iter(dm.train_dataloader()))[0], stream.batch(3)[0])


def test_too_few_conversations_for_a_batch_or_for_validation_are_refused(tmp_path):
    cache, data = chat_cache(tmp_path, some_records(10), batch_size=16)
    with pytest.raises(GptMiniError, match=r"9 conversations .* fewer than one batch \(data.batch_size=16\)"):
        ChatDataModule(cache, data, block_size=256)
    cache, data = chat_cache(tmp_path / "one", some_records(1), batch_size=1)
    with pytest.raises(GptMiniError, match=r"data.val_fraction=0.1 asked for validation.*0 records"):
        ChatDataModule(cache, data, block_size=256)


# ------------------------------------------------------------------------------------------------------------
# Training runs


def chat_overrides(tmp_path: Path, path: Path, *extra: str) -> list[str]:
    """A seconds-long CPU run on data=chat (debug=smoke's sizes, without its corpus)."""
    return [
        "debug=smoke",
        "data=chat",
        f"data.path={path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=4",
        "model.block_size=64",
        *extra,
    ]


@pytest.mark.slow
def test_a_chat_run_resumed_from_its_checkpoint_equals_the_straight_run(tmp_path, compose_train):
    path = write_jsonl(tmp_path / "chats.jsonl", some_records(30))
    overrides = chat_overrides(
        tmp_path, path, "trainer.max_steps=8", "optim.decay_steps=8", "trainer.val_check_interval=4"
    )
    train(compose_train(overrides), out_dir=tmp_path / "straight")
    train(compose_train([*overrides, "trainer.max_steps=4"]), out_dir=tmp_path / "first")
    train(compose_train([*overrides, f"ckpt_path={tmp_path / 'first'}"]), out_dir=tmp_path / "resumed")
    ours, theirs = (
        read_checkpoint(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("resumed", "straight")
    )
    assert ours["global_step"] == theirs["global_step"] == 8
    assert all(torch.equal(ours["state_dict"][k], v) for k, v in theirs["state_dict"].items())
    assert ours["gptmini"]["chat_template"] == to_entry(get_template("chat"))


@pytest.mark.slow
def test_the_masked_loss_falls_on_replies_a_model_can_learn(tmp_path, compose_train):
    records = [conversation(random.Random(n), reply="Sure thing.") for n in range(40)]
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    overrides = chat_overrides(
        tmp_path,
        path,
        "trainer.max_steps=30",
        "trainer.val_check_interval=30",
        "optim.lr=1e-2",
        "model.block_size=128",
    )
    summary = train(compose_train(overrides), out_dir=tmp_path / "run")
    # The replies are "Sure thing." and an end token: a few tokens, each almost certain once learned.
    assert summary["val_loss"] < 0.25 * math.log(300)
    # The validation loss is over the reply tokens alone: what the mask marks.
    (meta,) = (tmp_path / "cache").rglob("meta.json")
    assert summary["val_tokens"] == int(np.fromfile(meta.parent / mask_name("val"), np.uint8).sum()) > 0


@pytest.mark.slow
def test_experiment_sft_alpaca_runs_on_cpu_from_a_tiny_model(tmp_path, compose_train):
    rng = random.Random(0)
    records = [
        {
            "instruction": " ".join(rng.choices(WORDS, k=5)),
            "input": rng.choice(["", "alpha beta"]),
            "output": " ".join(rng.choices(WORDS, k=3)),
        }
        for _ in range(40)
    ]
    path = tmp_path / "instruction-data.json"
    path.write_text(json.dumps(records, indent=4))
    overrides = [
        "experiment=sft_alpaca",
        f"data.path={path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "init_from=null",  # a tiny model trained from scratch instead of GPT-2's 124M
        "tokenizer=bpe",
        "tokenizer.vocab_size=300",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=128",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "threads=1",
        "sample.max_new_tokens=4",
    ]
    summary = train(compose_train(overrides), out_dir=tmp_path / "run")
    # 40 records, 5% validation (2), batch 8, two epochs: ceil(2 * 38 / 8) steps.
    assert summary["steps"] == math.ceil(2 * 38 / 8) == 10
    assert summary["train_conversations"] == 38 and summary["val_conversations"] == 2
    entry = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["gptmini"]
    assert entry["chat_template"] == to_entry(get_template("alpaca"))
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert "### Instruction:" in samples and "### Response:" in samples
    # finetune=lora composes with it: adapters on the run's weights, its tokenizer, one epoch.
    lora = [*overrides, f"init_from={tmp_path / 'run'}", "finetune=lora", "data.epochs=1"]
    summary = train(compose_train(lora), out_dir=tmp_path / "lora")
    assert summary["steps"] == math.ceil(38 / 8)
    checkpoint = read_checkpoint(tmp_path / "lora" / "checkpoints" / "last.ckpt")
    assert checkpoint["gptmini"]["chat_template"] == entry["chat_template"]
    assert checkpoint["state_dict"] and all("lora" in name for name in checkpoint["state_dict"])


@pytest.mark.slow
def test_a_hugging_face_dataset_with_a_messages_column_gives_the_same_cache_as_its_file(tmp_path):
    pytest.importorskip("datasets")
    records = [{"id": n, "chat": r["messages"]} for n, r in enumerate(some_records(20))]
    path = write_jsonl(tmp_path / "hf" / "chats.jsonl", records)
    hf = {"path": "json", "data_files": str(path), "messages_field": "chat"}
    from_hf = prepare_cache(DataConfig(name="chat", hf=hf, cache_dir=str(tmp_path / "cache")), TOK)
    as_files = write_jsonl(tmp_path / "files" / "chats.jsonl", [{"messages": r["chat"]} for r in records])
    from_files = prepare_cache(chat_config(tmp_path, as_files), TOK)
    for name in ("train_000000.bin", "val_000000.bin", mask_name("train"), offsets_name("val")):
        assert (from_hf / name).read_bytes() == (from_files / name).read_bytes(), name
    records[7]["chat"][-1]["role"] = "bot"
    write_jsonl(path, records)
    with pytest.raises(GptMiniError, match=rf"{path} line 8: message \d+ has role 'bot'"):
        prepare_cache(DataConfig(name="chat", hf=hf, cache_dir=str(tmp_path / "cache")), TOK)
