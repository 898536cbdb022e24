"""The tiktoken encoding of a Hugging Face folder's ``tokenizer.json``: the inverse of ``tokenizer_export``.

A folder that gptmini exported from a model with its own BPE holds that BPE in ``tokenizer.json``; reading
it back with GPT-2's tokenizer would give other ids (and ids past the model's vocabulary). So a folder's
``tokenizer.json`` is turned back into the tiktoken ``Encoding`` it describes:

- the vocabulary's strings become bytes again (GPT-2's ``bytes_to_unicode`` table, inverted); a token's id
  is its rank, and ``<|endoftext|>`` must be the one special token, right after the merges;
- the split regex comes from the ``Split`` pre-tokenizer (gptmini's exports), or is GPT-2's own when the
  ``ByteLevel`` pre-tokenizer splits with its built-in regex (transformers' GPT-2 tokenizers);
- every merge must make a token ranked above the ones before it (BPE by merge order = BPE by rank).

Then, as for an export, the probe text is encoded both ways and any difference is refused. GPT-2's own
vocabulary (recognised by a hash of its ranks) is named ``gpt2``, so a GPT-2 folder keeps GPT-2's tokenizer
spec; any other becomes a ``bpe`` spec carrying its ranks, which needs no download to load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tiktoken

from gptmini.common import GptMiniError
from gptmini.data.tokenizer import EOT, PATTERNS, _ranks_to_text, tokenizer_to_spec
from gptmini.hf.tokenizer_export import bytes_to_unicode, check_same_encoding

TOKENIZER_FILE = "tokenizer.json"
GPT2_SPEC = {"kind": "tiktoken", "name": "gpt2"}
# sha256 of tiktoken's GPT-2 ranks in tiktoken's text format (tests/test_hf.py checks it against tiktoken).
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB = 50257
TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}  # the byte table, inverted


def hf_tokenizer_spec(folder: Path | None) -> tuple[dict, int]:
    """(tokenizer spec, vocabulary size) for a Hugging Face model: its ``tokenizer.json`` when the folder
    has one, else GPT-2's tokenizer (a Hub GPT-2, or a folder saved with the model alone)."""
    path = None if folder is None else folder / TOKENIZER_FILE
    if path is None or not path.is_file():
        return dict(GPT2_SPEC), GPT2_VOCAB
    enc = encoding_from_tokenizer_json(path)
    return spec_of(enc), enc.n_vocab


def spec_of(enc: tiktoken.Encoding) -> dict:
    """GPT-2's spec for GPT-2's vocabulary and split, else the self-contained ``bpe`` spec."""
    from tiktoken_ext.openai_public import r50k_pat_str  # tiktoken's GPT-2 split (possessive form)

    ranks_hash = hashlib.sha256(_ranks_to_text(enc._mergeable_ranks).encode()).hexdigest()
    if ranks_hash == GPT2_RANKS_SHA256 and enc._pat_str in (r50k_pat_str, PATTERNS["gpt2"]):
        return dict(GPT2_SPEC)
    return tokenizer_to_spec(enc)


def encoding_from_tokenizer_json(path: Path) -> tiktoken.Encoding:
    """The tiktoken encoding that ``path`` describes, checked to encode and decode exactly like it."""
    text, data = _read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise _unreadable(path, "its model is not a BPE with a vocabulary")
    ranks = _ranks_from_vocab(model["vocab"], path)
    _check_added_tokens(data.get("added_tokens"), len(ranks), path)
    _check_merge_order(model.get("merges"), ranks, path)
    if data.get("normalizer") is not None:
        raise _unreadable(path, "it normalizes text before splitting")
    pattern = _split_pattern(data.get("pre_tokenizer"), path)
    pattern_name = next((name for name, known in PATTERNS.items() if known == pattern), "hf")
    name = f"bpe-{len(ranks) + 1}-{pattern_name}"
    try:
        enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
        )
    except ValueError as exc:  # e.g. a split regex tiktoken's engine cannot compile
        raise _unreadable(path, f"tiktoken cannot build it ({exc})") from None
    _check_same_as_file(enc, text, path)
    return enc


def _read_json(path: Path) -> tuple[str, dict]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _unreadable(path, f"{type(exc).__name__}: it is not a JSON file") from None
    if not isinstance(data, dict):
        raise _unreadable(path, "it is not a JSON object")
    return text, data


def _ranks_from_vocab(vocab: dict, path: Path) -> dict[bytes, int]:
    """Token bytes by id; every string must be made of the byte table's characters, ids 0..n-1."""
    ranks = {}
    for token, rank in vocab.items():
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise _unreadable(path, f"the token {token!r} has the id {rank!r}, not an integer")
        if not token or any(char not in TO_BYTE for char in token):
            raise _unreadable(path, f"the token {token!r} is not byte-level (GPT-2's byte table)")
        ranks[bytes(TO_BYTE[char] for char in token)] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise _unreadable(path, "its token ids are not 0..n-1, one per token")
    missing = sum(bytes([byte]) not in ranks for byte in range(256))
    if missing:
        raise _unreadable(
            path, f"it lacks {missing} of the 256 byte tokens, so some text would have no tokens"
        )
    return ranks


def _check_added_tokens(added, n_ranks: int, path: Path) -> None:
    contents = [token.get("content") if isinstance(token, dict) else token for token in added or []]
    ids = [token.get("id") if isinstance(token, dict) else None for token in added or []]
    if contents != [EOT] or ids != [n_ranks]:
        raise _unreadable(path, f"its special tokens are {contents}; gptmini needs {EOT} alone, id {n_ranks}")


def _check_merge_order(merges, ranks: dict[bytes, int], path: Path) -> None:
    """Each merge (a, b) must make a token a+b ranked above every earlier merge's (module docstring)."""
    if not isinstance(merges, list):
        raise _unreadable(path, "its merges are not a list")
    last = -1
    for merge in merges:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        try:
            a, b = (bytes(TO_BYTE[char] for char in part) for part in pair)
            rank = ranks[a + b]
        except (KeyError, TypeError, ValueError):
            raise _unreadable(path, f"the merge {merge!r} does not make a token of its vocabulary") from None
        if rank <= last:
            raise _unreadable(
                path, f"the merge {merge!r} is out of rank order, so tiktoken would merge otherwise"
            )
        last = rank


def _split_pattern(pre_tokenizer, path: Path) -> str:
    """The pre-tokenizer's split regex: a Split's, or GPT-2's for a plain ByteLevel (module docstring)."""
    steps = pre_tokenizer.get("pretokenizers") if isinstance(pre_tokenizer, dict) else None
    if isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "ByteLevel":
        steps = [pre_tokenizer]
    steps = steps if isinstance(steps, list) else []
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return PATTERNS["gpt2"]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if isinstance(regex, str) and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return regex
    raise _unreadable(
        path, f"its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not a byte-level split"
    )


def _check_same_as_file(enc: tiktoken.Encoding, text: str, path: Path) -> None:
    """The tokenizers library, reading the file itself, must agree with ``enc`` on the probe text."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise GptMiniError(f'reading {path} needs the tokenizers package: pip install -e ".[hf]"') from None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the library's parse errors all mean "not a tokenizer file"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise _unreadable(path, f"the tokenizers library cannot read it ({first_line})") from None
    try:
        check_same_encoding(enc, tokenizer)
    except GptMiniError:
        raise _unreadable(path, "tiktoken would encode or decode text differently from it") from None


def _unreadable(path: Path, why: str) -> GptMiniError:
    return GptMiniError(
        f"cannot read the tokenizer {path}: {why}. gptmini reads byte-level BPEs whose only special token "
        f"is {EOT} (GPT-2's, and those gptmini exports); save the model's own tokenizer there again."
    )
