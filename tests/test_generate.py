"""generate.py and gptmini.generation: options, prompts, streaming, stop strings, plots and bad input."""

import io
import re
import shlex
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
from gptmini.common import GptMiniError
from gptmini.data.tokenizer import EOT, tokenizer_to_spec
from gptmini.generation import text as text_module
from gptmini.generation.attention_plot import plot_attention, token_window
from gptmini.generation.prompt import MAX_PROMPT_BYTES, encode_prompt, quote_prompt_argument, read_prompt
from gptmini.generation.sampling import SamplingOptions
from gptmini.generation.streaming import StopFilter, StreamDecoder
from gptmini.generation.text import GenerateTextConfig, generate_text, register_config
from gptmini.weights import save_model_checkpoint

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
    cfg = OmegaConf.structured(GenerateTextConfig(ckpt=str(ckpt), max_new_tokens=12, seed=0, device="cpu"))
    return OmegaConf.merge(cfg, overrides)


# ---------------------------------------------------------------------------------------------------------
# Output: only text on stdout, reproducible with a seed
# ---------------------------------------------------------------------------------------------------------


def test_stdout_carries_only_the_text(ckpt, capsys):
    texts = generate_text(make_cfg(ckpt, prompt="Hello"))
    out, err = capsys.readouterr()
    assert len(texts) == 1 and texts[0]
    assert out == texts[0] + "\n"
    assert "loaded" in err and "tokens/s" in err


def test_not_streaming_prints_the_same_text(ckpt, capsys):
    streamed = generate_text(make_cfg(ckpt, prompt="Hello"))
    capsys.readouterr()
    whole = generate_text(make_cfg(ckpt, prompt="Hello", stream=False))
    assert whole == streamed
    assert capsys.readouterr().out == whole[0] + "\n"


def test_same_seed_same_text_different_seed_different_text(ckpt, capsys):
    def run(seed):
        return generate_text(make_cfg(ckpt, prompt="abc", temperature=1.0, seed=seed, max_new_tokens=20))

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_num_samples_and_cache_off(ckpt, capsys):
    texts = generate_text(make_cfg(ckpt, prompt="abc", num_samples=3, temperature=1.0))
    assert len(texts) == 3 and len(set(texts)) == 3
    greedy = dict(prompt="abc", temperature=0.0, max_new_tokens=2 * BLOCK)  # crosses block_size
    assert generate_text(make_cfg(ckpt, **greedy)) == generate_text(make_cfg(ckpt, use_cache=False, **greedy))


def test_stop_string_ends_the_sample(ckpt, capsys):
    full = generate_text(make_cfg(ckpt, prompt="abc", temperature=1.0, max_new_tokens=30))[0]
    stop = full[5:7]
    capsys.readouterr()
    stopped = generate_text(make_cfg(ckpt, prompt="abc", temperature=1.0, max_new_tokens=30, stop=[stop]))[0]
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
    expected = generate_text(make_cfg(ckpt, prompt="once upon"))
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("once upon", encoding="utf-8")
    assert generate_text(make_cfg(ckpt, prompt=f"@{prompt_file}")) == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO("once upon"))
    assert generate_text(make_cfg(ckpt, prompt="-")) == expected


def test_prompt_from_stdin_that_is_closed_or_empty_is_refused(ckpt, monkeypatch):
    fix = "pipe the text in (echo 'Once upon' | python generate.py prompt=-), or leave prompt unset"
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when started with stdin closed (<&-)
    with pytest.raises(GptMiniError, match=re.escape(f"but stdin is closed; {fix}")):
        generate_text(make_cfg(ckpt, prompt="-"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(
        GptMiniError, match=re.escape(f"prompt=- read nothing from stdin (it was empty); {fix}")
    ):
        generate_text(make_cfg(ckpt, prompt="-"))


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom", "a huge file", "stdin"])
def test_an_endless_or_huge_prompt_is_refused_at_the_cap(ckpt, tmp_path, monkeypatch, source):
    """prompt=@/dev/zero read without end; now at most MAX_PROMPT_BYTES + 1 bytes are read, then refused."""
    over = b"a" * (MAX_PROMPT_BYTES + 1)
    if source == "stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(over)))
        prompt, name = "-", "stdin"
    else:
        path = tmp_path / "huge.txt" if source == "a huge file" else Path(source)
        if source == "a huge file":
            path.write_bytes(over)
        elif not path.exists():
            pytest.skip(f"no {source} on this system")
        prompt, name = f"@{path}", f"prompt file {path}"
    message = (
        f"{name} holds more than 4 MiB, the most a prompt may be (the model sees only its last block_size"
    )
    with pytest.raises(GptMiniError, match="^" + re.escape(message)):
        generate_text(make_cfg(ckpt, prompt=prompt))


def test_a_prompt_of_exactly_the_cap_is_read(tmp_path):
    path = tmp_path / "cap.txt"
    path.write_bytes(b"a" * MAX_PROMPT_BYTES)
    assert read_prompt(f"@{path}") == "a" * MAX_PROMPT_BYTES


def test_a_prompt_file_that_is_a_folder_or_not_utf8_is_one_line(ckpt, tmp_path):
    with pytest.raises(GptMiniError, match=f"^prompt file {re.escape(str(tmp_path))} is a directory"):
        generate_text(make_cfg(ckpt, prompt=f"@{tmp_path}"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    message = f"prompt file {latin1} is not UTF-8 text (byte 0xe9 at offset 3); pass a UTF-8 text file"
    with pytest.raises(GptMiniError, match="^" + re.escape(message)):
        generate_text(make_cfg(ckpt, prompt=f"@{latin1}"))


def test_empty_prompt_starts_from_endoftext(ckpt, enc, capsys):
    assert encode_prompt("", enc, BLOCK) == [enc.eot_token]
    assert generate_text(make_cfg(ckpt, prompt="")) == generate_text(make_cfg(ckpt, prompt=EOT))


def test_long_prompt_keeps_the_end_and_warns_once(ckpt, enc, capsys):
    prompt = "x" * 10 + "the last sixteen"  # 26 byte tokens, block_size 16
    assert encode_prompt(prompt, enc, BLOCK) == enc.encode("the last sixteen")
    capsys.readouterr()
    texts = generate_text(make_cfg(ckpt, prompt=prompt, num_samples=2))
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "26 tokens" in err
    assert texts == generate_text(make_cfg(ckpt, prompt="the last sixteen", num_samples=2))


# ---------------------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------------------


def test_attention_plot_has_a_panel_per_layer_and_head_and_a_colour_scale(ckpt, tmp_path, capsys):
    path = tmp_path / "plots" / "attn.png"
    generate_text(make_cfg(ckpt, prompt="Hello there", attention_plot=str(path)))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100
    assert f"to {path}" in capsys.readouterr().err
    maps = torch.softmax(torch.randn(N_LAYER, N_HEAD, 5, 5), dim=-1)
    fig = plot_attention(maps, list("abcde"), n_prompt=2)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == N_LAYER * N_HEAD
    assert len(fig.axes) == N_LAYER * N_HEAD + 1  # the shared colour bar
    assert "attention weight" in fig.axes[-1].get_ylabel()


def test_attention_plot_covers_the_prompt_and_the_generated_text(ckpt, enc, tmp_path, monkeypatch, capsys):
    """It used to draw the prompt's tokens only: a 2 x 2 map for a two-token prompt."""
    drawn = []
    real_plot = text_module.plot_attention

    def spy(maps, tokens, **kwargs):
        drawn.append((maps.shape, tokens, kwargs))
        return real_plot(maps, tokens, **kwargs)

    monkeypatch.setattr(text_module, "plot_attention", spy)
    path = tmp_path / "attn.png"
    (text,) = generate_text(make_cfg(ckpt, prompt="Hi", max_new_tokens=6, attention_plot=str(path)))
    ((shape, tokens, kwargs),) = drawn
    assert shape == (N_LAYER, N_HEAD, 2 + 6, 2 + 6)
    assert kwargs["n_prompt"] == 2
    assert tokens[:2] == ["H", "i"] and text
    assert path.is_file() and "2 prompt + 6 generated tokens" in capsys.readouterr().err


def test_attention_plot_labels_every_token_on_the_outer_panels():
    tokens = [f"t{i}" for i in range(20)]
    fig = plot_attention(torch.rand(2, 2, 20, 20), tokens, n_prompt=5)
    bottom_left = fig.axes[2]  # row 1, column 0: both axes labelled
    assert [label.get_text() for label in bottom_left.get_xticklabels()] == tokens
    assert [label.get_text() for label in bottom_left.get_yticklabels()] == tokens
    colours = {label.get_color() for label in bottom_left.get_xticklabels()}
    assert len(colours) == 2  # prompt and generated tokens told apart


def test_attention_plot_caps_the_labels():
    fig = plot_attention(torch.rand(1, 3, 40, 40), [f"t{i}" for i in range(40)], max_labels=8)
    assert len(fig.axes) == 3 + 1
    assert 1 < len(fig.axes[0].get_yticks()) <= 8


@pytest.mark.parametrize(
    ("n_prompt", "n_generated", "window"),
    [
        (2, 10, (0, 12)),  # everything fits
        (3, 200, (0, 48)),  # the whole prompt, then as much text as fits
        (100, 200, (76, 124)),  # the end of the prompt and the start of the text, half and half
        (100, 5, (57, 105)),  # a short text leaves the rest to the prompt
    ],
)
def test_attention_window_keeps_the_seam_within_48_tokens(n_prompt, n_generated, window):
    assert token_window(n_prompt, n_generated) == window


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
        generate_text(make_cfg(ckpt, prompt="a", **{option: value}))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("temperature", float("nan"), "temperature=nan must be a finite number, not nan or inf; the default"),
        ("temperature", float("inf"), "temperature=inf must be a finite number"),
        ("top_p", float("nan"), "top_p=nan must be a finite number"),
        ("repetition_penalty", float("nan"), "repetition_penalty=nan must be a finite number"),
        ("repetition_penalty", float("inf"), "repetition_penalty=inf must be a finite number"),
        # train.py's seed rule and message: one range for both commands.
        ("seed", -1, "seed=-1 must be an integer in 0..4294967295; try seed=1337."),
        ("seed", 2**64, f"seed={2**64} must be an integer in 0..4294967295; try seed=1337."),
    ],
)  # fmt: skip
def test_non_finite_values_and_seeds_out_of_range_are_refused(ckpt, option, value, message):
    with pytest.raises(GptMiniError, match="^" + re.escape(message)):
        generate_text(make_cfg(ckpt, prompt="a", **{option: value}))


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(GptMiniError, match="not found") as info:
        generate_text(make_cfg(missing, prompt="a"))
    assert str(missing) in str(info.value)


def test_corrupt_checkpoint(tmp_path):
    corrupt = tmp_path / "bad.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(GptMiniError, match="corrupt") as info:
        generate_text(make_cfg(corrupt, prompt="a"))
    assert str(corrupt) in str(info.value)


def test_checkpoint_without_tokenizer(tmp_path):
    config = GPTConfig(vocab_size=257, block_size=BLOCK, n_layer=1, n_head=2, n_embd=32)
    path = save_model_checkpoint(tmp_path / "notok.ckpt", GPT(config), tokenizer_spec={})
    with pytest.raises(GptMiniError, match="tokenizer"):
        generate_text(make_cfg(path, prompt="a"))


def test_missing_prompt_file(ckpt, tmp_path):
    with pytest.raises(GptMiniError, match="prompt file not found"):
        generate_text(make_cfg(ckpt, prompt=f"@{tmp_path / 'missing.txt'}"))


def test_unavailable_device(ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(GptMiniError, match="device=cuda"):
        generate_text(make_cfg(ckpt, device="cuda"))


def test_checkpoint_with_a_vocabulary_padded_past_the_tokenizer(enc, tmp_path, capsys):
    """model.vocab_size 300 > the tokenizer's 257: ids 257..299 cannot be decoded (KeyError before)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, block_size=BLOCK, n_layer=1, n_head=2, n_embd=32)
    path = save_model_checkpoint(tmp_path / "padded.ckpt", GPT(config), tokenizer_to_spec(enc))
    texts = generate_text(make_cfg(path, prompt="abc", temperature=2.0, max_new_tokens=60, num_samples=2))
    assert len(texts) == 2 and all(texts)


def test_huge_max_new_tokens_runs_until_a_stop(ckpt, capsys):
    """max_new_tokens=10**18 used to fail allocating a 10**18-token buffer; now it runs until stopped."""
    stops = list("aeiou.,;: ")
    (text,) = generate_text(make_cfg(ckpt, prompt="abc", temperature=1.0, max_new_tokens=10**18, stop=stops))
    assert not any(stop in text for stop in stops)
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("maps.bmp", "cannot write .bmp files; use .png"),
        ("maps", "has no file extension"),
        ("a_file.txt/maps.png", "is a file, not a folder"),
    ],
)
def test_bad_attention_plot_path_fails_before_generating(ckpt, tmp_path, capsys, name, message):
    (tmp_path / "a_file.txt").write_text("not a folder")
    value = str(tmp_path / name)
    with pytest.raises(GptMiniError, match=message) as info:
        generate_text(make_cfg(ckpt, prompt="a", attention_plot=value))
    assert f"attention_plot={value}" in str(info.value)
    assert capsys.readouterr().out == ""  # checked before any text was generated


def test_attention_plot_write_failure_leaves_the_old_picture_whole(ckpt, tmp_path, monkeypatch, capsys):
    import errno

    from matplotlib.figure import Figure

    path = tmp_path / "attn.png"
    path.write_bytes(b"the previous picture")

    def disk_full(self, handle, **kwargs):
        handle.write(b"half a picture")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(GptMiniError, match="disk is full.*attention_plot"):
        generate_text(make_cfg(ckpt, prompt="a", attention_plot=str(path)))
    assert path.read_bytes() == b"the previous picture"
    assert [p.name for p in tmp_path.iterdir()] == ["attn.png"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------
# Interactive mode
# ---------------------------------------------------------------------------------------------------------


def test_interactive_quits_on_empty_line(ckpt, capsys, feed_input):
    feed_input(["Hello", "abc", "", "never read"])
    texts = generate_text(make_cfg(ckpt, interactive=True))
    assert len(texts) == 2
    assert capsys.readouterr().out == "".join(t + "\n" for t in texts)


def test_interactive_quits_on_eof(ckpt, capsys, feed_input):
    feed_input(["Hello"])
    assert len(generate_text(make_cfg(ckpt, interactive=True))) == 1


def test_interactive_ctrl_c_stops_only_the_sample(ckpt, monkeypatch, capsys, feed_input):
    real_push, calls = StreamDecoder.push, []

    def push_then_interrupt(self, token_id):
        calls.append(token_id)
        if len(calls) == 3:  # Ctrl-C during the first sample
            raise KeyboardInterrupt
        return real_push(self, token_id)

    monkeypatch.setattr(StreamDecoder, "push", push_then_interrupt)
    feed_input(["Hello", "again"])
    texts = generate_text(make_cfg(ckpt, interactive=True, max_new_tokens=8))
    assert len(texts) == 2 and len(calls) > 8  # the second prompt still ran
    assert "stopped" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The Hydra config and the command line
# ---------------------------------------------------------------------------------------------------------


def test_yaml_matches_the_schema_and_rejects_typos(repo_root):
    register_config()
    with initialize_config_dir(config_dir=str(repo_root / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=["prompt=@file.txt", "top_k=5"])
        expected = GenerateTextConfig(prompt="@file.txt", top_k=5)
        assert OmegaConf.to_object(cfg) == expected
        assert isinstance(expected, SamplingOptions)  # one options type, passed whole to the loop
        with pytest.raises(Exception, match="tempreature"):
            compose(config_name="generate", overrides=["tempreature=1"])


def test_cli_prints_text_and_writes_no_files(ckpt, tmp_path, run_cli):
    result = run_cli(
        "generate.py",
        *[f"ckpt={ckpt}", "prompt=Hello world", "max_new_tokens=5", "seed=1", "device=cpu"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and "loaded" not in result.stdout
    assert "tokens/s" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, no .hydra/, no log file


def _one_error_line(result, start: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(f"error: {start}")
    assert "Traceback" not in result.stderr


def test_cli_bad_option_exits_2_without_traceback(ckpt, tmp_path, run_cli):
    _one_error_line(run_cli("generate.py", f"ckpt={ckpt}", "temperature=-1", cwd=tmp_path), "temperature")


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["temperature=nan"], "temperature=nan must be a finite number"),
        (["prompt=@/dev/zero"], "prompt file /dev/zero holds more than 4 MiB"),
    ],
)
def test_cli_bad_sampling_values_and_prompts_exit_2_with_one_line(ckpt, tmp_path, run_cli, args, start):
    if "/dev/zero" in args[0] and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero on this system")
    _one_error_line(run_cli("generate.py", f"ckpt={ckpt}", "prompt=a", *args, cwd=tmp_path), start)


def test_cli_prompt_from_a_closed_stdin_exits_2_with_one_line(ckpt, tmp_path, repo_root):
    if not Path("/bin/sh").exists():
        pytest.skip("needs a POSIX shell")
    script = shlex.join([sys.executable, str(repo_root / "generate.py"), f"ckpt={ckpt}", "prompt=-"])
    result = subprocess.run(f"{script} <&-", shell=True, cwd=tmp_path, capture_output=True, text=True)
    _one_error_line(result, "prompt=- reads the prompt from stdin, but stdin is closed")


def test_cli_unsupported_plot_extension_exits_2(ckpt, tmp_path, run_cli):
    result = run_cli("generate.py", f"ckpt={ckpt}", "attention_plot=maps.bmp", cwd=tmp_path)
    _one_error_line(result, "attention_plot=maps.bmp")
    assert list(tmp_path.iterdir()) == []


def test_cli_attention_plot_into_a_folder(ckpt, tmp_path, run_cli):
    """A folder used to be reported as written while the picture went to <folder>.png beside it."""
    folder = tmp_path / "plots"
    folder.mkdir()
    args = [f"ckpt={ckpt}", "prompt=Hi", "max_new_tokens=4", "seed=0", "device=cpu"]
    result = run_cli("generate.py", *args, f"attention_plot={folder}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in folder.iterdir()] == ["attention.png"]
    assert not (tmp_path / "plots.png").exists()
    assert f"to {folder / 'attention.png'}" in result.stderr


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
def test_prompt_argument_arrives_exactly_as_typed(prompt, repo_root):
    """The shell's prompt="def main(" must not trip Hydra's override grammar or OmegaConf's interpolation."""
    register_config()
    (override,) = quote_prompt_argument([f"prompt={prompt}"])
    with initialize_config_dir(config_dir=str(repo_root / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[override])
    assert cfg.prompt == prompt
    assert quote_prompt_argument(["prompt='already quoted'", "ckpt=x"]) == [
        "prompt='already quoted'",
        "ckpt=x",
    ]
