"""Every value of an option works end to end: train (validation and its samples), resume, generate, plot."""

import re

import pytest
import torch

from gptmini.common import GptMiniError
from gptmini.generation.text import GenerateTextConfig, generate_text
from gptmini.training.run import train
from gptmini.weights import GPTMINI_KEY


def test_model_attention_is_refused_naming_the_book(tmp_path, tiny_train_overrides, compose_train):
    """The option is gone (the GPT has one attention): one line that says where chapter 3's rungs went."""
    with pytest.raises(
        GptMiniError, match=r"^model.attention=mha: the GPT has one attention now.*gptmini/book"
    ):
        train(compose_train(tiny_train_overrides + ["model.attention=mha"]), out_dir=tmp_path / "run")


def test_a_run_saved_with_an_attention_class_resumes_generates_and_fine_tunes(
    tmp_path, tiny_train_overrides, compose_train
):
    """Runs saved while model.attention existed name "heads", "mha" or "sdpa" in their model config; all
    three shared today's weight layout, so reading such a checkpoint drops the key and everything works."""
    run = tmp_path / "run"
    assert train(compose_train(tiny_train_overrides), out_dir=run)["steps"] == 12
    for path in run.rglob("*.ckpt"):  # as an old gptmini wrote them
        checkpoint = torch.load(path, weights_only=False)
        checkpoint[GPTMINI_KEY]["model_config"]["attention"] = "heads"
        checkpoint["hyper_parameters"]["model_config"]["attention"] = "heads"
        torch.save(checkpoint, path)
    resumed = train(
        compose_train(tiny_train_overrides + [f"ckpt_path={run}", "trainer.max_steps=14"]), out_dir=run
    )
    assert resumed["steps"] == 14

    plot = tmp_path / "maps.png"
    options = {"ckpt": str(run), "prompt": "alpha", "max_new_tokens": 6, "device": "cpu", "threads": 1}
    for use_cache in (True, False):
        texts = generate_text(
            GenerateTextConfig(**options, use_cache=use_cache, seed=0, attention_plot=str(plot))
        )
        assert len(texts) == 1
    assert plot.read_bytes()[:4] == b"\x89PNG"
    lora = tiny_train_overrides + [f"init_from={run}", "finetune=lora", "trainer.max_steps=6"]
    assert train(compose_train(lora), out_dir=tmp_path / "lora")["steps"] == 6


NOT_FINITE = "must be a finite number, not nan or inf; the default is"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.rope_base=inf", f"GPTConfig.rope_base=inf {NOT_FINITE} 10000.0."),
        ("model.logit_softcap=inf", f"GPTConfig.logit_softcap=inf {NOT_FINITE} null."),
        ("model.dropout=nan", f"GPTConfig.dropout=nan {NOT_FINITE} 0.0."),
        ("optim.lr=inf", f"optim.lr=inf {NOT_FINITE} 0.003."),
        ("optim.weight_decay=nan", f"optim.weight_decay=nan {NOT_FINITE} 0.1."),
        ("optim.eps=nan", f"optim.eps=nan {NOT_FINITE} 1e-08."),
        ("optim.muon_lr=inf", f"optim.muon_lr=inf {NOT_FINITE} 0.02."),
        ("sample.temperature=nan", f"sample.temperature=nan {NOT_FINITE} 0.8."),
        ("sample.repetition_penalty=inf", f"sample.repetition_penalty=inf {NOT_FINITE} 1.0."),
    ],
)
def test_non_finite_values_fail_before_any_data_is_read(tmp_path, compose_train, override, message):
    """They passed the range checks (NaN fails every comparison), then the run failed blaming optim.lr."""
    cache = tmp_path / "cache"
    cfg = compose_train(
        ["debug=smoke", "data=text", f"data.path={tmp_path}", f"data.cache_dir={cache}", override]
    )
    with pytest.raises(GptMiniError, match="^" + re.escape(message) + "$"):
        train(cfg, out_dir=tmp_path / "run")
    assert not cache.exists()


@pytest.mark.slow  # train.py's imports take seconds
def test_cli_non_finite_model_value_exits_2_with_one_line(tmp_path, run_cli):
    result = run_cli(
        "train.py", "model.rope_base=inf", f"hydra.run.dir={tmp_path}", f"data.cache_dir={tmp_path}"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: GPTConfig.rope_base=inf {NOT_FINITE} 10000.0."]
