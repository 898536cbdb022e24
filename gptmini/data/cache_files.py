"""What every token cache folder shares, single-file (``token_cache``) or sharded (``shards``) alike.

The format version, the tokenizer a cache stores and the part of a cache's key and path that names it, and
the one-line answer when a cache cannot be written. Both cache modules import this one, so neither imports
the other's internals. Imports ``gptmini.common``, ``.encode`` and ``.tokenizer`` only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from pathlib import Path

import tiktoken

from gptmini.common import GptMiniError, describe_os_error
from gptmini.data.encode import BPE_SAMPLE_BYTES
from gptmini.data.tokenizer import TokenizerConfig, save_bpe, tokenizer_id, tokenizer_to_spec

# Bump when the cache layout or contents change, so old caches are not reused.
CACHE_VERSION = 3


def _settings_for(
    tok: TokenizerConfig, encoding: tiktoken.Encoding | None
) -> tuple[TokenizerConfig, tiktoken.Encoding | None]:
    """The tokenizer as settings where settings say exactly what it does.

    A cache is keyed by what its tokenizer does, not by how the tokenizer was obtained: tiktoken's own "gpt2"
    (the tokenizer of every imported GPT-2, init_from=gpt2) is the tokenizer ``tokenizer=gpt2`` loads, so both
    share one cache and FineWeb is tokenized once. ``tiktoken_name`` checks the contents, not just the name.
    """
    if encoding is not None and tokenizer_to_spec(encoding)["kind"] == "tiktoken":
        return TokenizerConfig(name=encoding.name), None
    return tok, encoding


def tokenizer_folder(tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> str:
    """The path component naming a cache's tokenizer: its settings' id, or a given BPE's name."""
    tok, encoding = _settings_for(tok, encoding)
    if encoding is None:
        return tokenizer_id(tok)
    return re.sub(r"[^A-Za-z0-9._-]", "_", encoding.name) or "tokenizer"


def tokenizer_key(tok: TokenizerConfig, encoding: tiktoken.Encoding | None) -> dict:
    """The tokenizer's part of a cache key: what the tokenizer does (see ``_settings_for``). A named tiktoken
    encoding is its name; a BPE trained from settings is those settings (its vocabulary follows from them
    and the corpus, also in the key); any other given encoding is its full spec, ranks included."""
    tok, encoding = _settings_for(tok, encoding)
    if encoding is None:
        return {"id": tokenizer_id(tok), "bpe_sample_bytes": BPE_SAMPLE_BYTES if tok.name == "bpe" else None}
    spec = json.dumps(tokenizer_to_spec(encoding), sort_keys=True).encode()
    return {"spec_sha256": hashlib.sha256(spec).hexdigest()}


def save_tokenizer(enc: tiktoken.Encoding, folder: Path) -> dict:
    """Store ``enc`` in the cache folder; return what meta.json records to load it again."""
    if tokenizer_to_spec(enc)["kind"] == "tiktoken":
        return {"kind": "tiktoken", "name": enc.name}
    save_bpe(enc, folder / "tokenizer.tiktoken")
    return {"kind": "bpe", "name": enc.name, "file": "tokenizer.tiktoken"}


def cannot_write(error: OSError, root: Path) -> GptMiniError:
    """A cache that cannot be written: what happened, where, and the fix."""
    if error.errno == errno.ENOSPC:
        fix = "free some space there, or set data.cache_dir=/a/folder/on/a/disk/with/room"
    else:
        fix = "set data.cache_dir=/a/folder/you/can/write"
    return GptMiniError(f"{describe_os_error(error, f'the token cache under {root}')}; {fix}.")
