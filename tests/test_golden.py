"""A golden-value test, as LLMs-from-scratch pins its chapters: a fixed seed and a tiny config give exactly
these tokens. If it fails, something changed what a run computes (data order, init, optimizer, schedule,
sampling); when the change is intended, say so in the commit and update the numbers."""

import torch

from gptmini.generation.sampling import SamplingOptions, sample_tokens
from gptmini.training.run import train
from gptmini.weights import load_checkpoint

# 60 steps of debug=smoke (2 x 2 x 32, block 16, a 300-token BPE) on conftest's corpus, seed 1337, 1 thread.
# Updated once for cache version 4: <|endoftext|> now precedes every document, the first one included;
# and once when the default became Muon + WSD with the embeddings at 10x (2.838 before).
GOLDEN_VAL_LOSS = 2.3713
GOLDEN_TOKENS = [294, 289, 298, 294, 259, 287, 294, 259, 265, 291, 291, 289]


def test_fixed_seed_tiny_run_generates_exactly_these_tokens(tmp_path, tiny_train_overrides, compose_train):
    overrides = [*tiny_train_overrides, "threads=1", "trainer.max_steps=60", "trainer.val_check_interval=60"]
    threads = torch.get_num_threads()
    try:
        summary = train(compose_train(overrides), out_dir=tmp_path / "run")
    finally:
        torch.set_num_threads(threads)  # threads=1 is process-wide: give the other tests theirs back
    loaded = load_checkpoint(tmp_path / "run")
    prompt = torch.tensor(loaded.tokenizer.encode_ordinary("the cat"))
    options = SamplingOptions(max_new_tokens=12, temperature=1.0, top_k=20)
    generator = torch.Generator().manual_seed(0)
    tokens = [int(t) for t in sample_tokens(loaded.model, prompt, options, generator=generator)]
    assert round(summary["val_loss"], 4) == GOLDEN_VAL_LOSS
    assert tokens == GOLDEN_TOKENS
