"""Stage 1 of the flow: text → tokenizer → token cache → batches.

One module per concern, each importing only the ones before it:

    chat_template  the one renderer of a conversation into ids and a reply mask (data=chat, chat, serve)
    corpus       which files are the corpus, reading their text in pieces (TextSource); DataConfig
    tokenizer    tiktoken encodings and trained BPEs, saved and carried in checkpoints as specs
    hf_records   data=hf: checking that a source's local records are text, and naming a bad one
    hf_source    data=hf: a Hugging Face datasets source as a stream of documents (HFSource)
    shards       the one cache writer: any source into shards; validation split, key, lock, resume, meta
    chat_records   data=chat: conversations read from .json/.jsonl files or a datasets source, checked
    chat_cache     data=chat: the chat cache (ids, reply mask, record offsets), split by record
    token_cache  which cache a run uses (``prepare_cache``), ``open_cache`` (checked), TokenStream
    datamodule   the LightningDataModule over an opened cache: training and validation windows
    chat_datamodule  data=chat's DataModule: one padded conversation per row, the loss on the replies

A run does ``cache = open_cache(prepare_cache(data, tokenizer))`` then
``TextDataModule(cache, data, block_size, seed)`` (``ChatDataModule`` for data=chat). Must not import
``gptmini.model``, ``gptmini.training`` or ``gptmini.generation``: data knows nothing of the model that
consumes it. The short imports below load
lazily, so importing one module never imports the others.
"""

_PUBLIC = {
    "DataConfig": "gptmini.data.corpus",
    "resolve_corpus": "gptmini.data.corpus",
    "TokenizerConfig": "gptmini.data.tokenizer",
    "prepare_cache": "gptmini.data.token_cache",
    "open_cache": "gptmini.data.token_cache",
    "TokenCache": "gptmini.data.token_cache",
    "TokenStream": "gptmini.data.token_cache",
    "read_meta": "gptmini.data.token_cache",
    "load_cached_tokenizer": "gptmini.data.token_cache",
    "TextDataModule": "gptmini.data.datamodule",
    "ChatDataModule": "gptmini.data.chat_datamodule",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gptmini.data' has no attribute {name!r}")
