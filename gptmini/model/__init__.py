"""Stage 2: the model, pure PyTorch. The chapter-3 attention ladder (``attention``), named model sizes and
``GPTConfig`` (``config``), the chunked LM-head loss (``loss``) and the GPT itself (``gpt``).

Must not import Lightning, Hydra, or any other gptmini sub-package except ``gptmini.common``: the model can
be used, tested and exported on its own.
"""
