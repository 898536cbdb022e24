"""data=chat's token cache: every conversation rendered once into token ids and a reply mask, split by record.

One concern: building the cache of a chat source (``gptmini.data.chat_records``) under the conventions of
``gptmini.data.shards`` (the key, the lock, the stored tokenizer, a ``.<key>.building`` folder renamed whole
when complete), so ``token_cache.open_cache`` opens it like any other. Imports ``gptmini.common`` and
``gptmini.data`` modules before it (corpus, tokenizer, shards, chat_template, chat_records) only. Decisions
worth knowing (docs/data.md):

- **The split is by record**, never inside a conversation: a permutation seeded by ``data.split_seed`` puts
  the first ``round(n * val_fraction)`` records (at least one when ``val_fraction > 0`` and there are two or
  more) in validation. Each split keeps the records in file order; the DataModule shuffles training.
- **Files per split**: the ids as the usual shard files (``train_000000.bin``), ``<split>_mask.bin`` (uint8,
  one per token: 1 where the token is reply text or a reply's end token) and ``<split>_offsets.bin`` (int64,
  records + 1 entries: where each conversation starts in the split's ids, then the total).
- **The tokenizer** is the given encoding (a checkpoint's), a named tiktoken encoding, or a BPE trained on the
  training conversations' rendered text (``<|endoftext|>`` stays its last id). No resume: a chat build takes
  seconds, so an interrupted one simply starts again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

from gptmini.common import GptMiniError, atomic_write_text, remove_stale_temp_files, say
from gptmini.data.chat_records import Record, chat_source
from gptmini.data.chat_template import END, ChatTemplate, get_template, render, render_text, to_entry
from gptmini.data.corpus import DataConfig
from gptmini.data.shards import (
    BPE_SAMPLE_BYTES,
    CACHE_VERSION,
    MB,
    SPLITS,
    cannot_write,
    fsync_folder,
    key_of,
    save_tokenizer,
    shard_name,
    token_dtype,
    tokenizer_identity,
)
from gptmini.data.tokenizer import TokenizerConfig, load_encoding, train_bpe

# Bump when the chat cache's files or rendering change (the key holds it, so old caches are not reused).
CHAT_FORMAT = 1


def mask_name(split: str) -> str:
    """The reply-mask file of a split: one uint8 per token."""
    return f"{split}_mask.bin"


def offsets_name(split: str) -> str:
    """The record-offsets file of a split: records + 1 int64 positions in the split's ids."""
    return f"{split}_offsets.bin"


def split_records(n: int, val_fraction: float, split_seed: int) -> tuple[list[int], list[int]]:
    """The indices of the training and the validation records, each in record order (see the docstring)."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)  # at least one each way
    order = np.random.default_rng(split_seed).permutation(n)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


# ------------------------------------------------------------------------------------------------------------
# Building


def prepare_chat_cache(data: DataConfig, tok: TokenizerConfig, encoding, root: Path) -> Path:
    """The complete chat cache of ``data`` under ``root``: found, or built."""
    source = chat_source(data)
    template = get_template(data.template)
    try:
        folder_name, tokenizer_key = tokenizer_identity(tok, encoding)
        parent = root / source.folder / folder_name
        settings = _settings(source, data, template)
        key = key_of({**settings, "tokenizer": tokenizer_key})
        if parent.is_dir():
            remove_stale_temp_files(parent)  # left by atomic writes killed mid-way
        if (parent / key / "meta.json").is_file():
            return parent / key
        parent.mkdir(parents=True, exist_ok=True)
        return _build(parent, key, settings, source, data, template, tok, encoding)
    except OSError as exc:
        raise cannot_write(exc, root) from None


def _settings(source, data: DataConfig, template: ChatTemplate) -> dict:
    """What decides a chat cache's contents besides its tokenizer (the key holds them, and meta.json)."""
    return {
        "version": CACHE_VERSION,
        "chat_format": CHAT_FORMAT,
        "fingerprint": source.fingerprint,
        "template": to_entry(template),
        "val_fraction": data.val_fraction,
        "split_seed": data.split_seed,
        "shard_tokens": data.shard_tokens,
    }


def _build(parent: Path, key: str, settings: dict, source, data, template, tok, encoding) -> Path:
    """Render, split and write the cache ``parent/key`` under its lock (it appears whole or not at all)."""
    folder, building = parent / key, parent / f".{key}.building"
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():  # another process built it while this one waited
            return folder
        started = time.perf_counter()
        records = source.records()
        if not records:
            raise GptMiniError(f"{source.description} holds no records; give at least two conversations.")
        train_ids, val_ids = split_records(len(records), data.val_fraction, data.split_seed)
        shutil.rmtree(building, ignore_errors=True)  # an interrupted build: start again
        building.mkdir(parents=True)
        try:
            splits = {"train": [records[i] for i in train_ids], "val": [records[i] for i in val_ids]}
            enc = encoding or _tokenizer(splits["train"], template, tok)
            counts: dict = {"shards": {}, "dtype": np.dtype(token_dtype(enc.n_vocab)).name}
            for split in SPLITS:
                counts.update(_write_split(building, split, splits[split], template, enc, data.shard_tokens))
                counts["shards"][split] = counts.pop(f"{split}_shards")
            meta = {
                **settings,
                "kind": "chat",
                "corpus": source.folder,
                "source": source.description,
                "tokenizer_id": parent.name,
                "tokenizer": save_tokenizer(enc, building),
                "vocab_size": enc.n_vocab,
                "eot_id": enc.eot_token,
                **counts,
                "seconds": round(time.perf_counter() - started, 3),
            }
            atomic_write_text(building / "meta.json", json.dumps(meta, indent=2) + "\n")
            fsync_folder(building)
            os.rename(building, folder)  # atomic: the folder appears complete or not at all
        except BaseException:  # a bad tokenizer, a full disk, Ctrl-C: nothing half-written stays behind
            shutil.rmtree(building, ignore_errors=True)
            raise
        tokens = counts["train_tokens"] + counts["val_tokens"]
        say(
            f"rendered {len(records)} conversations ({len(train_ids)} training, {len(val_ids)} validation) "
            f"with the {template.name!r} template: {tokens} tokens in {time.perf_counter() - started:.1f} s"
        )
    return folder


def _tokenizer(train: list[Record], template: ChatTemplate, tok: TokenizerConfig):
    """A named encoding, or a BPE trained on the training conversations' rendered text."""
    if tok.name != "bpe":
        return load_encoding(tok.name)
    size = 0

    def sample() -> Iterator[str]:
        nonlocal size
        for record in train:
            # The text between the template's end tokens: <|endoftext|> is a special token, not text to learn.
            for piece in render_text(template, record.messages).split(END):
                if size >= BPE_SAMPLE_BYTES:
                    return
                if piece:
                    size += len(piece)
                    yield piece

    say(f"training a {tok.vocab_size}-token BPE on the training conversations")
    enc = train_bpe(sample(), tok.vocab_size, tok.pattern)
    say(f"trained the BPE on {size / MB:.1f} MB")
    return enc


def _write_split(folder: Path, split: str, records: list[Record], template, enc, shard_tokens: int) -> dict:
    """Render a split's records and write its shards, mask and offsets; return its counts for meta.json."""
    ids, mask, lengths = [], [], []
    for record in records:
        rendered = render(template, record.messages, enc)
        ids += rendered.ids
        mask += rendered.mask
        lengths.append(len(rendered.ids))
    tokens = np.array(ids, dtype=token_dtype(enc.n_vocab))
    shards = []
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        piece = tokens[start : start + shard_tokens]
        piece.tofile(folder / shard_name(split, index))
        shards.append(len(piece))
    np.array(mask, dtype=np.uint8).tofile(folder / mask_name(split))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    offsets.tofile(folder / offsets_name(split))
    text = tokens[tokens != enc.eot_token]  # bytes of the text: the end tokens are markers, not text
    return {
        f"{split}_tokens": len(tokens),
        f"{split}_bytes": len(enc.decode_bytes(text.tolist())),
        f"{split}_records": len(records),
        f"{split}_documents": len(records),
        f"{split}_shards": shards,
    }


# ------------------------------------------------------------------------------------------------------------
# Checking on open


def check_chat_files(folder: Path, meta: dict) -> str | None:
    """What is wrong with a chat cache's mask and offsets files (their sizes against meta.json), or None."""
    for split in SPLITS:
        records = meta.get(f"{split}_records")
        if not isinstance(records, int) or isinstance(records, bool) or records < 0:
            return f"meta.json has no valid {split}_records"
        expected = {mask_name(split): meta[f"{split}_tokens"], offsets_name(split): 8 * (records + 1)}
        for name, size in expected.items():
            try:
                actual = (folder / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if actual != size:
                return f"{name} has {actual} bytes, meta.json says {size} bytes"
    if not isinstance(meta.get("template"), dict):
        return "meta.json has no chat template"
    return None
