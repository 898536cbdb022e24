"""Every value of an option works end to end: train (validation and its samples), resume, generate, plot."""

import re

import pytest

from gptmini.common import GptMiniError
from gptmini.generation.text import GenerateTextConfig, generate_text
from gptmini.training.run import train


@pytest.mark.parametrize("attention", ["heads", "mha"])
def test_every_attention_trains_samples_resumes_and_generates(
    attention, tmp_path, tiny_train_overrides, compose_train, capsys
):
    """model.attention=mha or heads died at the first validation: its sample asked for the sdpa-only cache."""
    overrides = tiny_train_overrides + [f"model.attention={attention}"]
    run = tmp_path / "run"
    assert train(compose_train(overrides), out_dir=run)["steps"] == 12
    assert (run / "samples.txt").read_text().count("sample at step") == 2  # validations at steps 6 and 12
    resumed = train(compose_train(overrides + [f"ckpt_path={run}", "trainer.max_steps=14"]), out_dir=run)
    assert resumed["steps"] == 14

    plot = tmp_path / "maps.png"
    options = {"ckpt": str(run), "prompt": "alpha", "max_new_tokens": 6, "device": "cpu", "threads": 1}
    for use_cache in (True, False):
        texts = generate_text(
            GenerateTextConfig(**options, use_cache=use_cache, seed=0, attention_plot=str(plot))
        )
        assert len(texts) == 1
    assert plot.read_bytes()[:4] == b"\x89PNG"
    if attention == "mha":  # LoRA adapts mha's qkv layer; "heads" bypasses it and is refused in one line
        lora = overrides + [f"init_from={run}", "finetune=lora", "trainer.max_steps=6"]
        assert train(compose_train(lora), out_dir=tmp_path / "lora")["steps"] == 6
    else:
        with pytest.raises(GptMiniError, match="finetune=lora cannot train model.attention='heads'"):
            train(compose_train(overrides + [f"init_from={run}", "finetune=lora"]), out_dir=tmp_path / "lora")


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
