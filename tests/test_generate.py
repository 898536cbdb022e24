"""generate.py and gptmini.generation: options, prompts, streaming, stop strings, plots and bad input."""

import builtins
import io
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import tiktoken
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gptmini import GPT, GPTConfig
from gptmini.checkpoint import save_model_checkpoint
from gptmini.common import GptMiniError
from gptmini.data.tokenizer import EOT, tokenizer_to_spec
from gptmini.generation.attention_plot import plot_attention
from gptmini.generation.text import (
    GenerateConfig,
    StopFilter,
    StreamDecoder,
    encode_prompt,
    generate,
    register_config,
)

REPO = Path(__file__).resolve().parents[1]
BLOCK = 16
N_LAYER, N_HEAD = 2, 2


def byte_encoding() -> tiktoken.Encoding:
    """One token per byte: multi-byte characters always span several tokens."""
    return tiktoken.Encoding(
        name="bytes-test",
        pat_str=r"""\S+|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
    )


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return byte_encoding()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, enc) -> Path:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=enc.n_vocab, block_size=BLOCK, n_layer=N_LAYER, n_head=N_HEAD, n_embd=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    return save_model_checkpoint(path, GPT(config), tokenizer_to_spec(enc))


def make_cfg(ckpt, **overrides):
    """The structured config, as Hydra would build it (typed, and unknown keys rejected)."""
    cfg = OmegaConf.structured(GenerateConfig(ckpt=str(ckpt), max_new_tokens=12, seed=0, device="cpu"))
    return OmegaConf.merge(cfg, overrides)


# ---------------------------------------------------------------------------------------------------------
# Output: only text on stdout, reproducible with a seed
# ---------------------------------------------------------------------------------------------------------


def test_stdout_carries_only_the_text(ckpt, capsys):
    texts = generate(make_cfg(ckpt, prompt="Hello"))
    out, err = capsys.readouterr()
    assert len(texts) == 1 and texts[0]
    assert out == texts[0] + "\n"
    assert "loaded" in err and "tokens/s" in err


def test_not_streaming_prints_the_same_text(ckpt, capsys):
    streamed = generate(make_cfg(ckpt, prompt="Hello"))
    capsys.readouterr()
    whole = generate(make_cfg(ckpt, prompt="Hello", stream=False))
    assert whole == streamed
    assert capsys.readouterr().out == whole[0] + "\n"


def test_same_seed_same_text_different_seed_different_text(ckpt, capsys):
    run = lambda seed: generate(make_cfg(ckpt, prompt="abc", temperature=1.0, seed=seed, max_new_tokens=20))
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_num_samples_and_cache_off(ckpt, capsys):
    texts = generate(make_cfg(ckpt, prompt="abc", num_samples=3, temperature=1.0))
    assert len(texts) == 3 and len(set(texts)) == 3
    greedy = dict(prompt="abc", temperature=0.0, max_new_tokens=2 * BLOCK)  # crosses block_size
    assert generate(make_cfg(ckpt, **greedy)) == generate(make_cfg(ckpt, use_cache=False, **greedy))


def test_stop_string_ends_the_sample(ckpt, capsys):
    full = generate(make_cfg(ckpt, prompt="abc", temperature=1.0, max_new_tokens=30))[0]
    stop = full[5:7]
    capsys.readouterr()
    stopped = generate(make_cfg(ckpt, prompt="abc", temperature=1.0, max_new_tokens=30, stop=[stop]))[0]
    assert stopped == full[: full.index(stop)]
    assert capsys.readouterr().out == stopped + "\n"  # the held-back start of the stop never printed


def test_stop_filter_holds_back_a_possible_stop():
    stops = StopFilter(["END", "\n\n"])
    assert stops.feed("abc E") == "abc "  # "E" may start "END"
    assert stops.feed("x") == "Ex"  # it did not
    assert stops.feed("y\n") == "y"
    assert stops.feed("\nmore") == ""
    assert stops.stopped
    other = StopFilter(["END"])
    assert other.feed("xEN") == "x"
    assert other.flush() == "EN" and not other.stopped


def test_stream_decoder_never_splits_a_character(enc):
    text = "héllo 😀 中文 ok"
    decoder = StreamDecoder(enc)
    pieces = [decoder.push(t) for t in enc.encode(text)]
    assert "".join(pieces) + decoder.flush() == text
    assert "\ufffd" not in "".join(pieces)
    # The emoji is four one-byte tokens: nothing appears until its last byte arrives.
    emoji = [decoder.push(t) for t in enc.encode("😀")]
    assert emoji == ["", "", "", "😀"]


def test_stream_decoder_flushes_a_truncated_character(enc):
    decoder = StreamDecoder(enc)
    assert decoder.push(enc.encode("中")[0]) == ""
    assert decoder.flush() == "\ufffd"


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


def test_prompt_from_file_and_stdin(ckpt, tmp_path, monkeypatch, capsys):
    expected = generate(make_cfg(ckpt, prompt="once upon"))
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("once upon", encoding="utf-8")
    assert generate(make_cfg(ckpt, prompt=f"@{prompt_file}")) == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO("once upon"))
    assert generate(make_cfg(ckpt, prompt="-")) == expected


def test_empty_prompt_starts_from_endoftext(ckpt, enc, capsys):
    assert encode_prompt("", enc, BLOCK) == [enc.eot_token]
    assert generate(make_cfg(ckpt, prompt="")) == generate(make_cfg(ckpt, prompt=EOT))


def test_long_prompt_keeps_the_end_and_warns_once(ckpt, enc, capsys):
    prompt = "x" * 10 + "the last sixteen"  # 26 byte tokens, block_size 16
    assert encode_prompt(prompt, enc, BLOCK) == enc.encode("the last sixteen")
    capsys.readouterr()
    texts = generate(make_cfg(ckpt, prompt=prompt, num_samples=2))
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "26 tokens" in err
    assert texts == generate(make_cfg(ckpt, prompt="the last sixteen", num_samples=2))


# ---------------------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------------------


def test_attention_plot_has_a_panel_per_layer_and_head(ckpt, tmp_path, capsys):
    path = tmp_path / "plots" / "attn.png"
    generate(make_cfg(ckpt, prompt="Hello there", attention_plot=str(path)))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100
    maps = torch.softmax(torch.randn(N_LAYER, N_HEAD, 5, 5), dim=-1)
    fig = plot_attention(maps, list("abcde"))
    assert len(fig.axes) == N_LAYER * N_HEAD


def test_attention_plot_caps_the_labels():
    fig = plot_attention(torch.rand(1, 3, 40, 40), [f"t{i}" for i in range(40)], max_labels=8)
    assert len(fig.axes) == 3
    assert 1 < len(fig.axes[0].get_xticks()) <= 8


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 1.2),
        ("top_k", 0),
        ("max_new_tokens", -1),
        ("repetition_penalty", 0.0),
        ("num_samples", 0),
    ],
)
def test_bad_option_names_the_option(ckpt, option, value):
    with pytest.raises(GptMiniError, match=option):
        generate(make_cfg(ckpt, prompt="a", **{option: value}))


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(GptMiniError, match="not found") as info:
        generate(make_cfg(missing, prompt="a"))
    assert str(missing) in str(info.value)


def test_corrupt_checkpoint(tmp_path):
    corrupt = tmp_path / "bad.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(GptMiniError, match="corrupt") as info:
        generate(make_cfg(corrupt, prompt="a"))
    assert str(corrupt) in str(info.value)


def test_checkpoint_without_tokenizer(tmp_path):
    config = GPTConfig(vocab_size=257, block_size=BLOCK, n_layer=1, n_head=2, n_embd=32)
    path = save_model_checkpoint(tmp_path / "notok.ckpt", GPT(config), tokenizer_spec={})
    with pytest.raises(GptMiniError, match="tokenizer"):
        generate(make_cfg(path, prompt="a"))


def test_missing_prompt_file(ckpt, tmp_path):
    with pytest.raises(GptMiniError, match="prompt file not found"):
        generate(make_cfg(ckpt, prompt=f"@{tmp_path / 'missing.txt'}"))


def test_unavailable_device(ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(GptMiniError, match="device=cuda"):
        generate(make_cfg(ckpt, device="cuda"))


# ---------------------------------------------------------------------------------------------------------
# Interactive mode
# ---------------------------------------------------------------------------------------------------------


def _feed_input(monkeypatch, lines):
    """Replace input() with one that returns ``lines`` and then behaves like Ctrl-D."""
    queue = list(lines)

    def fake_input(prompt=""):
        if not queue:
            raise EOFError
        return queue.pop(0)

    monkeypatch.setattr(builtins, "input", fake_input)


def test_interactive_quits_on_empty_line(ckpt, monkeypatch, capsys):
    _feed_input(monkeypatch, ["Hello", "abc", "", "never read"])
    texts = generate(make_cfg(ckpt, interactive=True))
    assert len(texts) == 2
    assert capsys.readouterr().out == "".join(t + "\n" for t in texts)


def test_interactive_quits_on_eof(ckpt, monkeypatch, capsys):
    _feed_input(monkeypatch, ["Hello"])
    assert len(generate(make_cfg(ckpt, interactive=True))) == 1


def test_interactive_ctrl_c_stops_only_the_sample(ckpt, monkeypatch, capsys):
    import gptmini.generation.text as generation

    real_push, calls = generation.StreamDecoder.push, []

    def push_then_interrupt(self, token_id):
        calls.append(token_id)
        if len(calls) == 3:  # Ctrl-C during the first sample
            raise KeyboardInterrupt
        return real_push(self, token_id)

    monkeypatch.setattr(generation.StreamDecoder, "push", push_then_interrupt)
    _feed_input(monkeypatch, ["Hello", "again"])
    texts = generate(make_cfg(ckpt, interactive=True, max_new_tokens=8))
    assert len(texts) == 2 and len(calls) > 8  # the second prompt still ran
    assert "stopped" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The Hydra config and the command line
# ---------------------------------------------------------------------------------------------------------


def test_yaml_matches_the_schema_and_rejects_typos():
    register_config()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=["prompt=@file.txt", "top_k=5"])
        assert OmegaConf.to_object(cfg) == GenerateConfig(prompt="@file.txt", top_k=5)
        with pytest.raises(Exception, match="tempreature"):
            compose(config_name="generate", overrides=["tempreature=1"])


def _run_cli(args, cwd):
    command = [sys.executable, str(REPO / "generate.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_prints_text_and_writes_no_files(ckpt, tmp_path):
    result = _run_cli(
        [f"ckpt={ckpt}", "prompt=Hello world", "max_new_tokens=5", "seed=1", "device=cpu"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and "loaded" not in result.stdout
    assert "tokens/s" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, no .hydra/, no log file


def test_cli_bad_option_exits_2_without_traceback(ckpt, tmp_path):
    result = _run_cli([f"ckpt={ckpt}", "temperature=-1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: temperature")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "prompt",
    [
        "def main(",
        "it's a, b: [c] {d}",
        "a\\b",
        "end\\",
        "a\\'b",
        "${oc.env:HOME}",
        "\\${x}",
        "k=v",
        "日本 😀",
    ],
)
def test_prompt_argument_arrives_exactly_as_typed(prompt):
    """The shell's prompt="def main(" must not trip Hydra's override grammar or OmegaConf's interpolation."""
    from gptmini.generation.text import quote_prompt_argument, register_config

    register_config()
    (override,) = quote_prompt_argument([f"prompt={prompt}"])
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[override])
    assert cfg.prompt == prompt
    assert quote_prompt_argument(["prompt='already quoted'", "ckpt=x"]) == [
        "prompt='already quoted'",
        "ckpt=x",
    ]
