"""The export's chat template: ``AutoTokenizer.apply_chat_template`` on the exported folder gives exactly the
ids (and the text) gptmini renders, for GPT-2's tokenizer and a gptmini-trained BPE, with both templates.

Each tokenizer is exported once, from a checkpoint that carries a template (GPT-2: alpaca) or none (the BPE:
the ``chat`` default); the other template's Jinja is then set on the loaded tokenizer, so both templates are
checked on both tokenizers. One known difference is left as it is: ``<|endoftext|>`` typed inside a message
is text to gptmini and the special token to Hugging Face.
"""

import json

import pytest
import tiktoken
import torch
from conftest import save_tiny_checkpoint

from gptmini.common import GptMiniError
from gptmini.data.chat_template import TEMPLATES, jinja, render, render_text
from gptmini.data.tokenizer import EOT, train_bpe

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from gptmini.hf.export import export  # noqa: E402 - needs the hf extra

CONVERSATIONS = {
    "system, several turns, asking": [
        {"role": "system", "content": "Be brief; answer in French."},
        {"role": "user", "content": "Héllo, naïve café? 東京タワー!"},
        {"role": "assistant", "content": "Bonjour 🙂👍🏽 — très bien.\n\nEt vous ?"},
        {"role": "user", "content": "  leading spaces, a tab\tand ∑x² ≤ ∞"},
    ],
    "no system, one question": [{"role": "user", "content": "What is 2+2?"}],
    "no system, ending with a reply": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in Japanese."},
        {"role": "assistant", "content": "赤 (aka)."},
    ],
    "system, ending with a reply": [
        {"role": "system", "content": "You write code."},
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": "    return {'a': [1, 22, 333]}\n"},
    ],
}


def tiny_checkpoint(path, enc, template=None):
    """A random 1-layer model for ``enc``; with ``template`` in its gptmini entry, as training writes it."""
    return save_tiny_checkpoint(path, enc, template, block_size=32, n_layer=1, n_embd=16)


def exported(tmp_path_factory, enc, template):
    """(the exported folder, the AutoTokenizer loaded from it)."""
    folder = tmp_path_factory.mktemp("export")
    export(str(tiny_checkpoint(folder / "m.ckpt", enc, template)), folder / "hf")
    return folder / "hf", transformers.AutoTokenizer.from_pretrained(folder / "hf")


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    """GPT-2's tokenizer, exported from a checkpoint trained on the alpaca template."""
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as exc:  # noqa: BLE001 - any failure means the files are not reachable
        pytest.skip(f"tiktoken's gpt2 files are not available offline ({type(exc).__name__})")
    return (enc, *exported(tmp_path_factory, enc, TEMPLATES["alpaca"]))


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
    """A BPE trained here (GPT-4's split pattern), exported from a checkpoint without a template."""
    corpus = "".join(text for turns in CONVERSATIONS.values() for m in turns for text in m.values()) * 20
    enc = train_bpe([corpus + open(__file__, encoding="utf-8").read()], vocab_size=400, pattern="gpt4")
    return (enc, *exported(tmp_path_factory, enc, None))


def check_round_trip(enc, tokenizer, template) -> None:
    """apply_chat_template (ids and text) == render / render_text, on every conversation."""
    for name, messages in CONVERSATIONS.items():
        for prompt in (True, False) if messages[-1]["role"] == "assistant" else (True,):
            expected = render(template, messages, enc, add_generation_prompt=prompt).ids
            got = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False)
            assert got == expected, f"{template.name}, {name}, add_generation_prompt={prompt}"
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert text == render_text(template, messages, add_generation_prompt=prompt)


def test_a_bpe_export_holds_the_default_template_and_renders_like_gptmini(bpe_export, capsys):
    enc, folder, tokenizer = bpe_export
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == jinja(TEMPLATES["chat"])  # no template trained: what serve uses
    check_round_trip(enc, tokenizer, TEMPLATES["chat"])
    tokenizer.chat_template = jinja(TEMPLATES["alpaca"])
    check_round_trip(enc, tokenizer, TEMPLATES["alpaca"])


@pytest.mark.slow  # GPT-2's 50k merges: about 25 s to export and load on 2 busy cores
def test_a_gpt2_export_holds_the_trained_template_and_renders_like_gptmini(gpt2_export):
    enc, folder, tokenizer = gpt2_export
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == jinja(TEMPLATES["alpaca"])
    check_round_trip(enc, tokenizer, TEMPLATES["alpaca"])
    tokenizer.chat_template = jinja(TEMPLATES["chat"])
    check_round_trip(enc, tokenizer, TEMPLATES["chat"])


def test_a_checkpoint_template_this_gptmini_cannot_read_is_not_exported(tmp_path):
    enc = train_bpe(["a small corpus, a small corpus. " * 20], vocab_size=300)
    path = tiny_checkpoint(tmp_path / "m.ckpt", enc)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["gptmini"]["chat_template"] = {"format": 2, "jinja": "{{ messages }}"}
    torch.save(checkpoint, path)
    with pytest.raises(GptMiniError, match="chat_template is not one this gptmini reads"):
        export(str(path), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_endoftext_typed_in_a_message_is_text_to_gptmini_and_the_token_to_hugging_face(bpe_export):
    """The one known difference, pinned so a change on either side is noticed."""
    enc, _, tokenizer = bpe_export
    tokenizer.chat_template = jinja(TEMPLATES["chat"])
    messages = [{"role": "user", "content": f"a {EOT} b"}]
    ours = render(TEMPLATES["chat"], messages, enc, add_generation_prompt=True).ids
    theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ours.count(enc.eot_token) == 1 and theirs.count(enc.eot_token) == 2
