"""Overfit, end to end: a tiny model trained with data=chat on three conversations answers them word for word,
through ``generate.py chat=true`` (one reply, and an interactive conversation of two turns) and through the
exported folder in ``transformers`` (greedy, prompted with ``apply_chat_template``).

What it proves: the template the run trained on travels in the checkpoint to generate.py and into the export,
each reply ends at its <|endoftext|>, and the masked loss learns the replies (and nothing forces it to learn
the prompts). One run, shared by the tests of this file.
"""

import json

import pytest

from gptmini.training.run import train

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
    ],
    [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven is prime."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Eleven, also prime."},
    ],
]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """The last checkpoint of a run that learnt CONVERSATIONS by heart."""
    from gptmini.training.config import compose_config

    folder = tmp_path_factory.mktemp("overfit")
    path = folder / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS), encoding="utf-8")
    overrides = [
        "debug=smoke",  # CPU, one thread, no progress bar; the sizes below replace its own
        "data=chat",
        f"data.path={path}",
        f"data.cache_dir={folder / 'cache'}",
        "data.val_fraction=0",  # every conversation is trained on: this test is about recall
        "data.batch_size=3",
        "model.n_embd=64",
        "model.block_size=64",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "trainer.max_steps=120",
        "trainer.val_check_interval=120",
        "sample.max_new_tokens=1",
    ]
    summary = train(compose_config(overrides), out_dir=folder / "run")
    assert summary["train_loss"] < 0.05, summary["train_loss"]  # learnt, not merely lucky below
    return folder / "run" / "checkpoints" / "last.ckpt"


def test_generate_chat_answers_a_trained_question_word_for_word(overfit, run_cli):
    result = run_cli(
        "generate.py",
        f"ckpt={overfit}",
        "chat=true",
        "system=You answer in one word.",
        "prompt=Colour of the sky?",
        "temperature=0",
        "max_new_tokens=12",  # the reply's room: the rest of the 64-token context holds the conversation
        "threads=1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Blue."
    assert "note:" not in result.stderr  # the checkpoint carries the template it was trained on


def test_interactive_chat_keeps_the_history_for_the_second_turn(overfit, run_cli):
    """The second question only has its trained answer after the first turn's reply: the history is kept."""
    result = run_cli(
        "generate.py",
        f"ckpt={overfit}",
        "chat=true",
        "interactive=true",
        "temperature=0",
        "max_new_tokens=12",  # the reply's room: the rest of the 64-token context holds the conversation
        "threads=1",
        input_text="Name a prime number.\nAnother one?\n",
    )
    assert result.returncode == 0, result.stderr
    first, second = "Seven is prime.", "Eleven, also prime."
    assert first in result.stdout and second in result.stdout
    assert result.stdout.index(first) < result.stdout.index(second)


def test_the_exported_model_answers_every_conversation_in_transformers(overfit, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    import torch

    from gptmini.hf.export import export

    folder = export(str(overfit), tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for conversation in CONVERSATIONS:
        for n, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            ids = tokenizer.apply_chat_template(
                conversation[:n], add_generation_prompt=True, return_dict=False
            )
            prompt = torch.tensor([ids])
            with torch.no_grad():
                out = model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=False,
                    max_new_tokens=20,
                    eos_token_id=eot,
                    pad_token_id=eot,
                )
            new = out[0, len(ids) :].tolist()
            assert new[-1] == eot, "the reply ends with its end token"
            assert tokenizer.decode(new[:-1]) == message["content"]
