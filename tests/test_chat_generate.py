"""Chat templates rendered to ids and masks, and ``generate.py chat=true``: one reply, and a conversation.

The templates are pinned on GPT-2's encoding (tiktoken's files, skipped when absent). The generation tests
use a tiny model with a one-byte-per-token vocabulary; where a test needs the model to say something exact
(a reply that ends at <|endoftext|> or a stop string), the token loop is replaced by one that yields it.
"""

import re

import pytest
import tiktoken
import torch
from conftest import save_tiny_checkpoint
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gptmini.common import GptMiniError
from gptmini.data.chat_template import TEMPLATES, alpaca_messages, render, render_text
from gptmini.data.tokenizer import EOT
from gptmini.generation import text as text_module
from gptmini.generation.prompt import quote_prompt_argument
from gptmini.generation.text import GenerateTextConfig, generate_text, register_config

BLOCK = 64
NOTE = "note: this checkpoint was not trained on a chat template; using the 'chat' template."


@pytest.fixture(scope="module")
def gpt2():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # noqa: BLE001 - any failure means the files are not reachable
        pytest.skip(f"tiktoken's gpt2 files are not available offline ({type(exc).__name__})")


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    """One token per byte, plus <|endoftext|> (256)."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(
        name="bytes-test", pat_str=r"""\S+|\s+""", mergeable_ranks=ranks, special_tokens={EOT: 256}
    )


def save_tiny(path, enc, template=None):
    """A random 2-layer model; with ``template``, its gptmini entry holds it as training would write it."""
    return save_tiny_checkpoint(path, enc, template, block_size=BLOCK)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, enc):
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "base.ckpt", enc)


@pytest.fixture(scope="module")
def alpaca_ckpt(tmp_path_factory, enc):
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "alpaca.ckpt", enc, TEMPLATES["alpaca"])


def make_cfg(ckpt, **overrides):
    cfg = OmegaConf.structured(
        GenerateTextConfig(ckpt=str(ckpt), max_new_tokens=8, seed=0, device="cpu", threads=1)
    )
    return OmegaConf.merge(cfg, {"chat": True, **overrides})


class Prompts(list):
    """The prompts the token loop was given; ``scripts``: what it says next."""

    scripts: list


@pytest.fixture
def scripted(monkeypatch, enc):
    """Replace the token loop: each call records its prompt ids and yields the next scripted text's bytes
    (``<|endoftext|>`` in a script is the token). Returns the list of prompts seen, as text."""
    prompts, scripts = Prompts(), []

    def fake_sample_tokens(model, prompt_ids, options, **kwargs):
        prompts.append(enc.decode(prompt_ids[0].tolist()))
        yield from enc.encode(scripts.pop(0), allowed_special="all")

    monkeypatch.setattr(text_module, "sample_tokens", fake_sample_tokens)
    prompts.scripts = scripts  # the test appends what the model will say
    return prompts


# ---------------------------------------------------------------------------------------------------------
# The templates: pinned ids and masks
# ---------------------------------------------------------------------------------------------------------


CONVERSATION = [
    ("system", "Be brief."),
    ("user", "Hi there!"),
    ("assistant", "Hello."),
    ("user", "2+2?"),
    ("assistant", "4"),
]
PINNED = {
    "alpaca": (
        [("user", "Add 2 and 2."), ("assistant", "4")],
        [50256, 21106, 318, 281, 12064, 326, 8477, 257, 4876, 13, 19430, 257, 2882, 326, 20431, 32543, 262,
         2581, 13, 198, 198, 21017, 46486, 25, 198, 4550, 362, 290, 362, 13, 198, 198, 21017, 18261, 25, 198,
         19, 50256],
        [36, 37],  # "4" and its <|endoftext|>
    ),
    "chat": (
        CONVERSATION,
        [50256, 11964, 25, 198, 3856, 4506, 13, 198, 198, 12982, 25, 198, 17250, 612, 0, 198, 198, 48902, 25,
         198, 15496, 13, 50256, 12982, 25, 198, 17, 10, 17, 30, 198, 198, 48902, 25, 198, 19, 50256],
        [20, 21, 22, 35, 36],  # "Hello" "." <|endoftext|>, "4" <|endoftext|>
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", ["alpaca", "chat"])
def test_each_template_renders_pinned_ids_and_mask(gpt2, name):
    messages, ids, masked = PINNED[name]
    rendered = render(TEMPLATES[name], messages, gpt2)
    assert rendered.ids == ids
    assert [i for i, m in enumerate(rendered.mask) if m] == masked
    assert gpt2.decode(ids) == render_text(TEMPLATES[name], messages)


@pytest.mark.parametrize("name", ["alpaca", "chat"])
def test_the_mask_covers_exactly_the_replies_and_their_ends(gpt2, name):
    replies = ["Héllo, naïve café!", " 東京タワー 🙂👍🏽", "Done.\n\nBye"]
    messages = [("system", "Be kind.")]
    for n, reply in enumerate(replies):
        messages += [("user", f"Question {n}: ünïcode?"), ("assistant", reply)]
    rendered = render(TEMPLATES[name], messages, gpt2)
    masked = [t for t, m in zip(rendered.ids, rendered.mask, strict=True) if m]
    assert gpt2.decode(masked) == "".join(reply + EOT for reply in replies)
    assert len(rendered.mask) == len(rendered.ids)


def test_an_alpaca_record_renders_as_the_chapters_prompt(gpt2):
    record = {
        "instruction": "Rewrite the sentence.",
        "input": "The cat sat.",
        "output": "The cat was sitting.",
    }
    chapter = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cat sat.\n\n### Response:\n"
    )
    alpaca = TEMPLATES["alpaca"]
    assert render_text(alpaca, alpaca_messages(record)) == EOT + chapter + "The cat was sitting." + EOT
    rendered = render(alpaca, alpaca_messages(record), gpt2)
    assert rendered.ids == gpt2.encode(EOT + chapter + "The cat was sitting." + EOT, allowed_special="all")
    no_input = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    assert render_text(alpaca, alpaca_messages(no_input), add_generation_prompt=False).endswith(
        "### Instruction:\nName a colour.\n\n### Response:\nBlue." + EOT
    )


# ---------------------------------------------------------------------------------------------------------
# generate.py chat=true prompt=...
# ---------------------------------------------------------------------------------------------------------


def test_chat_prints_only_the_reply_and_stops_at_endoftext(ckpt, enc, scripted, capsys):
    scripted.scripts.append(f"Hello!{EOT}never shown")
    assert generate_text(make_cfg(ckpt, prompt="Hi <|endoftext|>", max_new_tokens=20)) == ["Hello!"]
    out, err = capsys.readouterr()
    assert out == "Hello!\n"
    assert err.count(NOTE) == 1
    expected = render(TEMPLATES["chat"], [("user", "Hi <|endoftext|>")], enc, add_generation_prompt=True)
    assert scripted == [enc.decode(expected.ids)] == [f"{EOT}User:\nHi <|endoftext|>\n\nAssistant:\n"]


def test_chat_stops_at_the_templates_stop_string(ckpt, scripted, capsys):
    scripted.scripts.append("Fine.\nUser:\nand more")
    assert generate_text(make_cfg(ckpt, prompt="How are you?", max_new_tokens=20)) == ["Fine."]
    assert capsys.readouterr().out == "Fine.\n"


def test_a_trained_template_is_used_with_the_system_message_and_no_note(alpaca_ckpt, enc, scripted, capsys):
    scripted.scripts.append(f"Blue.{EOT}")
    assert generate_text(make_cfg(alpaca_ckpt, prompt="Hue?", system="Be terse.")) == ["Blue."]
    messages = [("system", "Be terse."), ("user", "Hue?")]  # the bytes fit the 64-token context
    expected = render(TEMPLATES["alpaca"], messages, enc, add_generation_prompt=True)
    assert scripted == [enc.decode(expected.ids)]
    assert "note:" not in capsys.readouterr().err


def test_a_template_this_gptmini_cannot_read_is_refused_before_generating(tmp_path, enc, scripted):
    path = save_tiny(tmp_path / "foreign.ckpt", enc)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["gptmini"]["chat_template"] = {"format": 2, "jinja": "{{ messages }}"}
    torch.save(checkpoint, path)
    with pytest.raises(GptMiniError, match=r"chat_template is not one this gptmini reads \(format 2, this"):
        generate_text(make_cfg(path, prompt="Hi"))
    assert scripted == []  # nothing generated


def test_chat_with_the_real_model_prints_what_it_returns(ckpt, capsys):
    replies = generate_text(make_cfg(ckpt, prompt="Hi", temperature=0.0, max_new_tokens=20, num_samples=2))
    assert len(replies) == 2 and "\nUser:\n" not in replies[0]
    assert capsys.readouterr().out == "".join(reply + "\n" for reply in replies)


def test_a_message_that_does_not_fit_is_one_line(ckpt):
    with pytest.raises(GptMiniError, match=f"does not fit the model's context of {BLOCK} tokens with 8 kept"):
        generate_text(make_cfg(ckpt, prompt="x" * BLOCK))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"chat": False, "system": "Be kind."},
            "system='Be kind.' is the system message of a chat; add chat=true",
        ),
        (
            {"interactive": True, "num_samples": 2},
            "keeps one reply per turn, so num_samples must be 1, got 2",
        ),
        ({}, "chat=true needs the user's message: prompt="),
    ],
)
def test_chat_options_are_checked(options, message):
    with pytest.raises(GptMiniError, match=re.escape(message)):
        GenerateTextConfig(**{"chat": True, **options})


# ---------------------------------------------------------------------------------------------------------
# Interactive chat
# ---------------------------------------------------------------------------------------------------------


def test_interactive_chat_keeps_the_history_and_reset_starts_over(ckpt, scripted, capsys, feed_input):
    scripted.scripts += [f"One.{EOT}", f"Two.{EOT}", f"Three.{EOT}"]
    feed_input(["ab", "cd", "/reset", "ef"])
    replies = generate_text(make_cfg(ckpt, interactive=True))
    assert replies == ["One.", "Two.", "Three."]
    first, second, after_reset = scripted
    assert first == f"{EOT}User:\nab\n\nAssistant:\n"
    assert second == first + f"One.{EOT}User:\ncd\n\nAssistant:\n"  # turn 1 and its reply are kept
    assert after_reset == f"{EOT}User:\nef\n\nAssistant:\n"
    out, err = capsys.readouterr()
    assert out == "One.\nTwo.\nThree.\n"
    assert "a new conversation starts." in err and err.count(NOTE) == 1


def test_interactive_chat_drops_the_oldest_turns_and_keeps_the_system(ckpt, scripted, capsys, feed_input):
    # BLOCK 64, max_new_tokens 4: prompts of at most 60 tokens (bytes). The opening and system message take
    # 12, an exchange "User:\nq1\n\nAssistant:\nR1.<|endoftext|>" 25 and a question with the generation
    # prompt 21: two exchanges and a question (83) no longer fit, one exchange and a question (58) do.
    scripted.scripts += [f"R1.{EOT}", f"R2.{EOT}", f"R3.{EOT}", f"R4.{EOT}"]
    feed_input(["q1", "q2", "q3", "y" * 60, "q4"])
    replies = generate_text(make_cfg(ckpt, interactive=True, system="S", max_new_tokens=4))
    assert replies == ["R1.", "R2.", "R3.", "R4."]
    third = scripted[2]
    assert third == f"{EOT}System:\nS\n\nUser:\nq2\n\nAssistant:\nR2.{EOT}User:\nq3\n\nAssistant:\n"
    err = capsys.readouterr().err
    dropped = "dropped the oldest 2 turns of the conversation: it no longer fits the model's context of 64"
    assert err.count(dropped + " tokens with 4 kept for the reply.") == 2  # at q3, and again at q4
    assert "error: the message does not fit the model's context" in err  # the 60-byte message; q4 still ran
    assert len(scripted) == 4 and scripted[3].endswith("User:\nq4\n\nAssistant:\n")


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def test_a_system_message_arrives_exactly_as_typed(repo_root):
    """system= is free text like prompt=: commas, colons and brackets must not trip Hydra's grammar."""
    register_config()
    system = "Be brief, kind: [always] {x} ${oc.env:HOME}"
    overrides = quote_prompt_argument(["chat=true", f"system={system}", "prompt=Hi, you (there)"])
    with initialize_config_dir(config_dir=str(repo_root / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=overrides)
    assert (cfg.system, cfg.prompt, cfg.chat) == (system, "Hi, you (there)", True)


@pytest.mark.slow  # two fresh interpreters: about 20 s on 2 busy cores
def test_cli_chat_prints_one_reply_and_a_bad_option_is_one_line(ckpt, tmp_path, run_cli, capsys):
    common = [f"ckpt={ckpt}", "device=cpu", "threads=1", "seed=0", "max_new_tokens=5", "temperature=0"]
    result = run_cli(
        "generate.py", *common, "chat=true", "prompt=Hi, there", "system=Be brief.", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    same = make_cfg(ckpt, prompt="Hi, there", system="Be brief.", max_new_tokens=5, temperature=0.0)
    assert result.stdout == generate_text(same)[0] + "\n"  # the reply alone on stdout
    assert NOTE in result.stderr
    bad = run_cli("generate.py", *common, "system=Be brief.", "prompt=Hi", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: system='Be brief.' is the system message of a chat; add chat=true (or leave system unset)."
    ]
    assert list(tmp_path.iterdir()) == []  # no files written
