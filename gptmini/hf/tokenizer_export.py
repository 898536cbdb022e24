"""A Hugging Face tokenizer from a tiktoken encoding: ``tokenizer.json`` (and GPT-2's vocab.json, merges.txt).

Every gptmini tokenizer is a byte-level BPE run by tiktoken: a split regex, then byte-pair merges by rank,
plus ``<|endoftext|>``. The ``tokenizers`` library has the same parts, described differently:

- tiktoken stores ranks of byte strings; HF stores a vocabulary of *strings* (each byte mapped to a printable
  character, GPT-2's ``bytes_to_unicode`` table) and an ordered list of merges (pairs). A token's merge is
  recovered by running BPE on its own bytes with only the lower ranks: the last two parts are its pair.
- tiktoken takes a regex piece that is itself a token as that token without merging; HF's BPE does the
  same with ``ignore_merges=True``.
- The split regex goes into a ``Split`` pre-tokenizer unchanged (Oniguruma reads the possessive quantifiers
  and ``(?i:...)`` groups of the GPT-2 and GPT-4 patterns), then ``ByteLevel`` without its own regex.

Because a regex engine or a merge order could still disagree somewhere, ``build_tokenizer`` encodes a probe
text (code, prose, Unicode, whitespace runs, ``<|endoftext|>``) both ways and refuses to export a tokenizer
that differs, naming the first difference.
"""

from __future__ import annotations

import json

import tiktoken

from gptmini.common import GptMiniError
from gptmini.data.tokenizer import EOT

PROBE_TEXT = (
    "def main(argv: list[str]) -> int:\n    return len(argv)  # 3 spaces   and\ttabs\r\n\n\n"
    "ROMEO: But soft, what light through yonder window breaks? It's 1,234,567.89 -- isn't it? I'LL go.\n"
    "Ünïcödé: naïve café, 東京タワー, Ελληνικά, emoji 🙂👍🏽, math ∑x² ≤ ∞.  \n"
    "<|endoftext|>A new document   with trailing spaces   "
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to one printable character (HF's byte-level vocabularies use it).

    Bytes that are already printable, non-space Latin-1 characters stand for themselves; the other 68 take
    the characters from U+0100 on, in byte order, so no token string holds whitespace or control codes.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    others = iter(range(256, 512))  # for each byte that is not printable, the next character from U+0100
    return {byte: chr(byte) if byte in printable else chr(next(others)) for byte in range(256)}


def hf_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken's ranks as HF writes them: token strings by id (in id order), and the merges in rank order."""
    table = bytes_to_unicode()
    as_text = lambda token: "".join(table[b] for b in token)  # noqa: E731
    vocab = {as_text(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    return vocab, [(as_text(a), as_text(b)) for a, b in recover_merges(ranks)]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that made each multi-byte token, in rank order (the order HF applies merges)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe(token, ranks, below=rank)
        if len(parts) != 2:
            raise GptMiniError(
                f"the tokenizer's token {token!r} (id {rank}) is not the merge of two lower-ranked tokens, "
                "so it has no Hugging Face BPE merge; this tokenizer cannot be exported."
            )
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's merge loop on ``token`` alone, using only ranks lower than ``below``."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def build_tokenizer(enc: tiktoken.Encoding):
    """A ``tokenizers.Tokenizer`` that encodes and decodes exactly like ``enc`` (checked on a probe text)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = enc._mergeable_ranks  # tiktoken has no public accessor; stable across its versions
    if set(enc.special_tokens_set) != {EOT} or enc.eot_token != len(ranks):
        raise GptMiniError(
            f"tokenizer {enc.name!r} has special tokens {sorted(enc.special_tokens_set)}; the export "
            f"supports byte-level BPEs whose only special token is {EOT}, right after the merges."
        )
    vocab, merges = hf_vocab_and_merges(ranks)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    if tokenizer.token_to_id(EOT) != enc.eot_token:
        raise GptMiniError(
            f"{EOT} would get another id in the exported tokenizer; cannot export {enc.name!r}."
        )
    check_same_encoding(enc, tokenizer)
    return tokenizer


def check_same_encoding(enc: tiktoken.Encoding, tokenizer, text: str = PROBE_TEXT) -> None:
    """Refuse unless the HF tokenizer's ids and decoded text are tiktoken's on ``text``."""
    expected = enc.encode(text, allowed_special="all")
    got = tokenizer.encode(text, add_special_tokens=False).ids
    if got != expected:
        differs = (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b)
        at = next(differs, min(len(got), len(expected)))
        piece = enc.decode(expected[max(0, at - 2) : at + 2])
        raise GptMiniError(
            f"the exported tokenizer would split text differently from tiktoken's {enc.name!r} (first at "
            f"token {at}, near {piece!r}): its split pattern cannot be expressed exactly, so it is not "
            "exported."
        )
    if tokenizer.decode(got, skip_special_tokens=False) != enc.decode(expected):
        raise GptMiniError(
            f"the exported tokenizer would decode differently from {enc.name!r}; not exported."
        )


def tokenizer_files(
    enc: tiktoken.Encoding, model_max_length: int, chat_template: str | None = None
) -> dict[str, str]:
    """The tokenizer files of a Hugging Face model folder, by name: tokenizer.json and its configs, and for
    GPT-2's own encoding also the classic vocab.json and merges.txt. ``chat_template`` (Jinja) goes into
    tokenizer_config.json, where ``apply_chat_template`` and the serving engines read it."""
    tokenizer = build_tokenizer(enc)
    is_gpt2 = enc.name == "gpt2"
    config = {
        "tokenizer_class": "GPT2Tokenizer" if is_gpt2 else "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decoding must give back the text exactly
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    files = {
        "tokenizer.json": tokenizer.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}) + "\n",
    }
    if is_gpt2:
        vocab, merges = hf_vocab_and_merges(enc._mergeable_ranks)
        files["vocab.json"] = json.dumps({**vocab, EOT: enc.eot_token}, ensure_ascii=False) + "\n"
        files["merges.txt"] = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    return files
