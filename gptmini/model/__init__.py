"""Stage 2: the model, pure PyTorch.

- ``config``: ``GPTConfig`` and the one table of named sizes (``MODEL_SIZES``, ``GPTConfig.from_name``).
- ``attention``: the model's causal self-attention (chapter 3's ladder lives in ``gptmini.book``).
- ``kv_cache``: the key/value cache generation decodes with, and the per-pass views its layers read.
- ``loss``: the chunked LM-head cross-entropy used by training steps.
- ``gpt``: the GPT itself, top to bottom.

Must not import Lightning, Hydra, or any other gptmini sub-package except ``gptmini.common``: the model can
be used, tested and exported on its own.
"""
