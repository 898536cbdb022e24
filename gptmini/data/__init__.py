"""Stage 1 of the flow: text → tokenizer → token cache → batches.

Owns corpora (``corpus``), tokenizers (``tokenizer``), token caches (``token_cache``) and the Lightning
DataModule (``datamodule``), each importing only the ones before it. Must not import ``gptmini.model``,
``gptmini.training`` or ``gptmini.generation``: data knows nothing of the model that consumes it.
"""
