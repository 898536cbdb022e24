"""GPT-2 in and out: Hugging Face imports and exports, proven on small random models without a network.

Each test builds a small random ``transformers.GPT2LMHeadModel`` (or a gptmini GPT), saves it, and checks that
what comes out the other side computes the same logits, generates the same tokens and tokenizes alike.
"""

import dataclasses
import json

import pytest
import torch

from gptmini.common import GptMiniError
from gptmini.data.tokenizer import EOT, tokenizer_to_spec, train_bpe
from gptmini.generation.sampling import SamplingOptions, sample_tokens
from gptmini.model.config import GPTConfig
from gptmini.model.gpt import GPT
from gptmini.weights import load_checkpoint, read_weights, save_model_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from gptmini.hf.convert import state_dict_from_hf  # noqa: E402
from gptmini.hf.export import export  # noqa: E402 - needs the hf extra
from gptmini.hf.export import main as export_main  # noqa: E402

GPT2_VOCAB = 50257
# Code, prose, Unicode (accents, CJK, emoji), whitespace runs, and the end-of-text token between documents.
TEXT = (
    "import os\n\ndef f(x):\n    return {'a': [1, 22, 333, 4444]}  # comment\t\n"
    "It's a truth universally acknowledged... DON'T panic! Ünïcödé, 日本語, 🙂 ∑ ≠ ∞\r\n   \n"
    f"{EOT}Second document, 12345 tokens.  "
)


def hf_model(n_positions: int = 32, seed: int = 0, init: float = 0.2):
    """A small random GPT-2 with GPT-2's vocabulary (so GPT-2's tokenizer fits it); large initial weights
    make its greedy text vary instead of repeating one token."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2, initializer_range=init
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture
def hf_folder(tmp_path):
    """(the model, the folder it was saved in with save_pretrained)."""
    model = hf_model()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model, folder


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


# ---------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------


def test_import_of_a_folder_gives_the_same_logits(hf_folder, gpt2_available):
    model, folder = hf_folder
    loaded = load_checkpoint(folder)
    idx = torch.randint(0, GPT2_VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    assert (logits_of(loaded.model, idx) - logits_of(model, idx)).abs().max() <= 1e-4
    assert loaded.tokenizer.name == "gpt2"
    assert loaded.model.config.padded_vocab_size == GPT2_VOCAB  # no padding rows (see gptmini.hf.convert)


def test_import_of_pytorch_model_bin_with_old_key_names(hf_folder, tmp_path, gpt2_available):
    """Old GPT-2 files: pytorch_model.bin, keys without "transformer.", causal-mask buffers, no lm_head."""
    model, folder = hf_folder
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((folder / "config.json").read_text())
    state = {
        k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    torch.save(state, old / "pytorch_model.bin")
    idx = torch.randint(0, GPT2_VOCAB, (1, 20))
    assert (logits_of(load_checkpoint(old).model, idx) - logits_of(model, idx)).abs().max() <= 1e-4


def test_greedy_generation_is_token_identical_to_transformers(hf_folder, gpt2_available):
    model, folder = hf_folder
    ours = load_checkpoint(folder).model
    prompt = torch.tensor([[464, 2068, 7586, 21831]])
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    tokens = sample_tokens(ours, prompt, SamplingOptions(max_new_tokens=20, temperature=0.0))
    got = [int(t) for t in tokens]
    assert got == expected
    assert len(set(got)) > 3  # a model whose text varies, so the comparison means something


def test_generate_from_a_hf_folder_streams_text(hf_folder, capsys, gpt2_available):
    from gptmini.generation.text import GenerateTextConfig, generate_text

    _, folder = hf_folder
    texts = generate_text(
        GenerateTextConfig(ckpt=str(folder), prompt="Hello", max_new_tokens=8, temperature=0.0, device="cpu")
    )
    out = capsys.readouterr()
    assert texts[0] and out.out.startswith(texts[0])
    assert f"loaded {folder}" in out.err


def test_init_from_a_hf_folder_takes_its_shape_and_crops_the_context(
    hf_folder, tmp_path, tiny_train_overrides, compose_train, gpt2_available
):
    from gptmini.training.run import train
    from gptmini.weights import read_checkpoint

    _, folder = hf_folder
    fast = ["trainer.max_steps=2", "trainer.limit_val_batches=2", "sample.max_new_tokens=0"]
    # debug=smoke sets 2 layers x 2 heads x 32 (as the folder's) and block_size 16 (< its 32: cropped).
    train(compose_train(tiny_train_overrides + fast + [f"init_from={folder}"]), out_dir=tmp_path / "run")
    saved = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert saved["gptmini"]["model_config"]["block_size"] == 16
    assert saved["gptmini"]["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"}
    assert saved["gptmini"]["init_from"] == str(folder)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_layer=5", r"model.n_layer=5 contradicts the init_from weights, which have n_layer=2; drop"),
        ("model.block_size=64", r"model.block_size=64 contradicts .* block_size=32 \(it may only be cropped"),
        ("model.bias=false", r"model.bias=False contradicts the init_from weights, which have bias=True"),
    ],
)
def test_a_model_override_contradicting_the_imported_shape_is_one_line(
    hf_folder, override, message, tiny_train_overrides, compose_train, tmp_path
):
    from gptmini.training.run import train

    _, folder = hf_folder
    cfg = compose_train(tiny_train_overrides + [f"init_from={folder}", override])
    with pytest.raises(GptMiniError, match=message):
        train(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # refused before any data was prepared


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------


def test_unknown_model_name_lists_the_names():
    with pytest.raises(GptMiniError, match=r"checkpoint not found: gpt3\. .* GPT-2 name \(gpt2, gpt2-medium"):
        read_weights("gpt3")


def test_offline_with_nothing_cached_says_what_is_missing(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no folder called gpt2 here
    message = r"gpt2: cannot get config.json of openai-community/gpt2 \(HF_HUB_OFFLINE is set .*local folder"
    with pytest.raises(GptMiniError, match=message):
        read_weights("gpt2")


def test_hf_folder_without_weights_or_config(hf_folder):
    _, folder = hf_folder
    (folder / "model.safetensors").unlink()
    with pytest.raises(
        GptMiniError, match=r"has no weights: expected model.safetensors or pytorch_model.bin"
    ):
        read_weights(folder)
    (folder / "config.json").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(GptMiniError, match=r"has no config.json, so the model's shape is unknown"):
        read_weights(folder)


def test_hf_folder_with_corrupt_weights(hf_folder):
    _, folder = hf_folder
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        GptMiniError, match=r"cannot read the weights .*model.safetensors .*truncated or corrupt"
    ):
        read_weights(folder)


def test_hf_config_gptmini_cannot_reproduce_is_refused(hf_folder):
    _, folder = hf_folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(
        GptMiniError, match=r"activation_function='relu', which gptmini's GPT cannot reproduce"
    ):
        read_weights(folder)


@pytest.mark.slow
def test_real_hub_download_when_online():
    """Skips cleanly offline; online it downloads OpenAI's GPT-2 small (once, into the HF cache)."""
    import socket

    try:  # a quick look first: huggingface_hub's own retries take ~20 s to give up
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as exc:
        pytest.skip(f"the Hugging Face Hub is not reachable ({type(exc).__name__})")
    from gptmini.hf.hub import resolve_hf

    files = resolve_hf("gpt2")
    assert files.config["n_layer"] == 12 and files.weights.name == "model.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def test_import_export_round_trip_keeps_logits_and_gpt2_tokenizer(hf_folder, tmp_path, gpt2_available):
    model, folder = hf_folder
    out = export(str(folder), tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert name in names
    assert {"vocab.json", "merges.txt"} <= names  # GPT-2's standard tokenizer files
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, GPT2_VOCAB, (2, 32))
    assert (logits_of(again, idx) - logits_of(model, idx)).abs().max() <= 1e-4
    enc = load_checkpoint(folder).tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == enc.encode(TEXT, allowed_special="all")
    assert tokenizer.decode(ids) == TEXT


@pytest.mark.parametrize("bias", [True, False])
def test_export_of_a_gptmini_model_with_a_corpus_bpe(tmp_path, bias):
    """A model trained here (padded vocabulary, GPT-4 split pattern): same logits in transformers, and a
    tokenizer.json that PreTrainedTokenizerFast loads and that encodes and decodes exactly like tiktoken."""
    corpus = TEXT * 3 + open(__file__, encoding="utf-8").read()
    enc = train_bpe([corpus], vocab_size=400, pattern="gpt4")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=enc.n_vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=bias)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms away from their 0 / 1 start
    assert config.padded_vocab_size > enc.n_vocab  # padding rows to drop
    save_model_checkpoint(tmp_path / "m.ckpt", model, tokenizer_to_spec(enc))
    assert export_main([f"ckpt={tmp_path / 'm.ckpt'}", f"out={tmp_path / 'out'}"]) == 0

    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, enc.n_vocab, (2, 16))
    assert (logits_of(again, idx) - logits_of(model, idx)).abs().max() <= 1e-4
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    ids = fast(TEXT)["input_ids"]
    assert ids == enc.encode(TEXT, allowed_special="all")
    assert fast.decode(ids) == TEXT == enc.decode(ids)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == EOT


def test_export_refuses_an_option_gpt2_cannot_express(tmp_path, capsys):
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    if "norm" not in fields:
        pytest.skip("this GPTConfig has no switches beyond GPT-2")
    enc = train_bpe([TEXT * 5], vocab_size=300)
    config = GPTConfig(vocab_size=enc.n_vocab, block_size=16, n_layer=1, n_head=2, n_embd=32, norm="rmsnorm")
    save_model_checkpoint(tmp_path / "m.ckpt", GPT(config), tokenizer_to_spec(enc))
    assert export_main([f"ckpt={tmp_path / 'm.ckpt'}", f"out={tmp_path / 'out'}"]) == 2
    assert (
        "error: model.norm='rmsnorm' cannot be expressed in GPT-2's Hugging Face format"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_export_arguments_are_checked(capsys):
    assert export_main(["ckpt=latest"]) == 2
    assert "out= is required" in capsys.readouterr().err
    assert export_main(["output=x"]) == 2
    assert "unknown argument 'output=x'; use ckpt=<checkpoint> out=<folder>" in capsys.readouterr().err


def test_state_dict_conversion_transposes_conv1d_only(hf_folder):
    model, _ = hf_folder
    config = read_weights(hf_folder[1]).model_config
    state = state_dict_from_hf(model.state_dict(), config)
    hf_state = model.state_dict()
    assert torch.equal(state["blocks.1.attn.qkv.weight"], hf_state["transformer.h.1.attn.c_attn.weight"].t())
    assert torch.equal(state["blocks.1.mlp.proj.bias"], hf_state["transformer.h.1.mlp.c_proj.bias"])
    assert state["lm_head.weight"] is state["wte.weight"]


def test_a_tokenizer_that_would_split_differently_is_not_exported():
    from gptmini.hf.tokenizer_export import build_tokenizer, check_same_encoding

    corpus = TEXT * 3 + open(__file__, encoding="utf-8").read()
    gpt4_split = train_bpe([corpus], vocab_size=300, pattern="gpt4")
    gpt2_split = train_bpe([corpus], vocab_size=300, pattern="gpt2")
    with pytest.raises(GptMiniError, match=r"would split text differently from tiktoken's 'bpe-300-gpt2'"):
        check_same_encoding(gpt2_split, build_tokenizer(gpt4_split))


# ---------------------------------------------------------------------------------------------------------
# Damaged folders, sharded saves, offline Hub names, and the tokenizer a folder is read with
# ---------------------------------------------------------------------------------------------------------


def _edit_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **values}))


def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def _as_bin(folder, state):
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda f: _edit_weights(f, lambda s: s.update({"transformer.h.0.attn.extra": torch.zeros(2)})),
            r"do not fit the model its config describes: unexpected blocks.0.attn.extra",
        ),
        (
            lambda f: _as_bin(f, {"transformer.wte.weight": [1.0, 2.0]}),
            r"pytorch_model.bin holds a list under the key 'transformer.wte.weight', where a weights file",
        ),
        (lambda f: _as_bin(f, {1: torch.zeros(2)}), r"pytorch_model.bin holds a Tensor under the key 1"),
        (
            lambda f: _edit_config(f, layer_norm_epsilon="1e-5"),
            r"config.json has layer_norm_epsilon='1e-5', which gptmini's GPT cannot reproduce",
        ),
        (lambda f: _edit_config(f, layer_norm_epsilon=None), r"config.json has layer_norm_epsilon=None"),
        (
            lambda f: _edit_config(f, n_positions=10**12),
            r"config.json has n_positions=1,000,000,000,000, far past any model gptmini runs",
        ),
        (
            lambda f: _edit_config(f, n_head=3),
            r"config.json describes no valid GPT-2 \(GPTConfig.n_embd=32 is",
        ),
        (
            lambda f: _edit_config(f, vocab_size=1000),
            r"config.json has vocab_size=1000, fewer than its tokenizer's 50257 tokens",
        ),
        (
            lambda f: _edit_weights(f, lambda s: s["transformer.wpe.weight"].__setitem__(0, float("nan"))),
            r"model.safetensors: the weight wpe.weight holds NaN or infinite values",
        ),
        (
            lambda f: _edit_weights(
                f, lambda s: s.update({"transformer.wpe.weight": s["transformer.wpe.weight"].long()})
            ),
            r"model.safetensors: the weight wpe.weight is int64, not floating point",
        ),
        (
            lambda f: (f / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}'),
            r"cannot read the tokenizer .*tokenizer.json: its model is not a BPE with a vocabulary",
        ),
    ],
    ids=[
        "unexpected-key",
        "non-tensor-value",
        "int-key",
        "epsilon-a-string",
        "epsilon-null",
        "absurd-n-positions",
        "n-head-not-dividing",
        "vocab-below-the-tokenizer",
        "nan-weights",
        "int64-weights",
        "foreign-tokenizer-json",
    ],
)
def test_a_damaged_hf_folder_is_one_line(hf_folder, damage, message):
    _, folder = hf_folder
    damage(folder)
    with pytest.raises(GptMiniError, match=message) as info:
        load_checkpoint(folder)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_a_sharded_save_loads(tmp_path, gpt2_available):
    model = hf_model()
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    idx = torch.randint(0, GPT2_VOCAB, (2, 32))
    assert (logits_of(load_checkpoint(folder).model, idx) - logits_of(model, idx)).abs().max() <= 1e-4
    next(folder.glob("model-*-of-*.safetensors")).unlink()
    with pytest.raises(GptMiniError, match=r"names the shard model-.*, which is missing from"):
        read_weights(folder)


def test_ckpt_gpt2_without_a_network_asks_the_cache_alone(tmp_path, monkeypatch):
    """No network and HF_HUB_OFFLINE unset: the cache is asked with local_files_only (no ~25 s of retries)."""
    import huggingface_hub
    from huggingface_hub import constants

    import gptmini.data.hf_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(gptmini.data.hf_source, "_hub_reachable", lambda: False)
    asked, real = [], huggingface_hub.hf_hub_download
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda *a, **kw: asked.append(kw) or real(*a, **kw)
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        GptMiniError, match=r"no network: the Hub cannot be reached, and it is not in the cache"
    ):
        read_weights("gpt2")
    assert asked == [{"local_files_only": True}]


def test_the_gpt2_ranks_fingerprint_is_tiktokens(gpt2_available):
    import hashlib

    import tiktoken

    from gptmini.data.tokenizer import _ranks_to_text
    from gptmini.hf.tokenizer_import import GPT2_RANKS_SHA256

    ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
    assert hashlib.sha256(_ranks_to_text(ranks).encode()).hexdigest() == GPT2_RANKS_SHA256


@pytest.mark.slow
def test_a_gpt2_tokenizer_json_reads_as_gpt2s_tokenizer(hf_folder, tmp_path, gpt2_available):
    """gptmini's own GPT-2 export, and transformers' save of that tokenizer (ByteLevel with its regex)."""
    model, folder = hf_folder
    out = export(str(folder), tmp_path / "out")
    assert read_weights(out).tokenizer_spec == {"kind": "tiktoken", "name": "gpt2"}
    resaved = tmp_path / "resaved"
    model.save_pretrained(resaved)
    transformers.AutoTokenizer.from_pretrained(out).save_pretrained(resaved)
    assert json.loads((resaved / "tokenizer.json").read_text())["pre_tokenizer"]["type"] == "ByteLevel"
    assert read_weights(resaved).tokenizer_spec == {"kind": "tiktoken", "name": "gpt2"}
