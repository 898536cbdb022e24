"""Stage 4: text from a checkpoint.

    sampling        SamplingOptions and sample_tokens, the one token loop (pure: no I/O)
    text            GenerateTextConfig and generate_text(cfg), what ``python generate.py`` runs
    prompt          the prompt: quoted for Hydra, read from text/@file/stdin, encoded
    streaming       token ids to printable text, stop strings held back
    attention_plot  the attention maps drawn and written to an image

May import ``model``, ``data.tokenizer``, ``checkpoint`` and ``common``; must not import ``training``.
"""
