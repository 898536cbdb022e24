"""Stage 2: the model, pure PyTorch.

- ``attention``: the chapter-3 ladder, from simplified self-attention to the efficient attention the model
  trains with; ``walkthrough`` prints the chapter's numbers (``python -m gptmini.model.walkthrough``).
- ``config``: ``GPTConfig`` and the one table of named sizes (``MODEL_SIZES``, ``GPTConfig.from_name``).
- ``loss``: the chunked LM-head cross-entropy used by training steps.
- ``gpt``: the GPT itself, top to bottom.

Must not import Lightning, Hydra, or any other gptmini sub-package except ``gptmini.common``: the model can
be used, tested and exported on its own.
"""
