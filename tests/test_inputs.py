"""Every value of an option works end to end: train (validation and its samples), resume, generate, plot."""

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
