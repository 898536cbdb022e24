"""HellaSwag: read the examples, and score a model on them by the lowest completion loss.

One concern: the multiple-choice evaluation as llm.c and build-nanogpt run it, so the figures compare with
theirs (GPT-2 124M: acc 0.2859, acc_norm 0.2955 on the 10,042 validation examples). For each example the
context is followed by each of the four endings (with a leading space); the model's cross-entropy over the
ending's tokens alone decides:

- ``acc``: the ending with the lowest *total* loss is the prediction;
- ``acc_norm``: the ending with the lowest *mean* loss per token (length-normalised) is the prediction.

A context and ending longer than the model's block are cut from the left, so the ending is always scored.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm  # installed with lightning

from gptmini.common import GptMiniError

FORMAT_HINT = 'one JSON object per line with "ctx" (text), "endings" (a list of texts) and "label" (an index)'


@dataclass
class Example:
    """One multiple-choice question: a context, its candidate endings and the index of the right one."""

    ctx: str
    endings: list[str]
    label: int


def _example(row: Any, where: str) -> Example:
    """Check one record field by field: what cannot be scored is refused, naming the field, never coerced
    (endings given as a string or a mapping, a float or boolean label)."""
    if not isinstance(row, dict):
        raise _not_an_example(where, "it is not a JSON object")
    missing = [key for key in ("ctx", "endings", "label") if key not in row]
    if missing:
        raise _not_an_example(where, f'it has no "{missing[0]}"')
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str):
        raise _not_an_example(where, f'"ctx" is {_shown(ctx)}, not a text')
    if not ctx:
        # With no context an ending's first token has nothing to be predicted from: a one-token ending scores
        # nothing at all, and ending 0 wins every tie.
        raise _not_an_example(where, '"ctx" is empty: an ending can only be scored after a context')
    if not isinstance(endings, list) or len(endings) < 2:
        raise _not_an_example(where, f'"endings" is {_shown(endings)}, not a list of at least 2 texts')
    for i, ending in enumerate(endings):
        if not isinstance(ending, str):
            raise _not_an_example(where, f'"endings"[{i}] is {_shown(ending)}, not a text')
        if not ending:
            raise _not_an_example(where, f'"endings"[{i}] is empty: there is nothing to score')
    if isinstance(label, str) and label.isdecimal():
        label = int(label)  # the Hub's own labels are strings: "3"
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        bounds = f"0..{len(endings) - 1}"
        raise _not_an_example(
            where, f'"label" is {_shown(row["label"])}, not the index of an ending ({bounds})'
        )
    return Example(ctx, endings, label)


def _not_an_example(where: str, reason: str) -> GptMiniError:
    return GptMiniError(f"{where} is not a HellaSwag example: {reason}; the format is {FORMAT_HINT}.")


def _shown(value: Any) -> str:
    """A value as a message names it: "the number 1.0", "the text \"abc\"", "a list [...]", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    kind = {str: "the text", list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")
    return f"{kind} {text}"


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a local jsonl in HellaSwag's own format (``ctx``, ``endings``, ``label``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GptMiniError(
            f"path={str(path)!r} does not exist; give HellaSwag's jsonl (e.g. hellaswag_val.jsonl from "
            "github.com/rowanz/hellaswag), or leave path unset to read it from the Hugging Face Hub."
        )
    examples = []
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is named by its line
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise GptMiniError(
                    f"{where} is not UTF-8 (byte {error.start + 1} of the line); save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise GptMiniError(f"{where} is not JSON; the format is {FORMAT_HINT}.") from None
            examples.append(_example(row, where))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise GptMiniError(f"{path} holds no examples; the format is {FORMAT_HINT}.")
    return examples


def load_examples(path: str | None, hub: str, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples of a local jsonl when ``path`` is given, else of the Hub's validation
    split (cached by datasets after the first download; offline with nothing cached, one line that names
    the local alternative)."""
    if path:
        return read_jsonl(path, limit)
    from gptmini.data.corpus import HFConfig
    from gptmini.data.hf_source import load_hf_dataset

    hint = "connect to the internet once (it is then cached), or pass path=hellaswag_val.jsonl (a local copy)"
    dataset = load_hf_dataset(HFConfig(path=hub, split="validation", streaming=False), "hub", hint)
    rows = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    return [_example(row, f"{hub} row {i}") for i, row in enumerate(rows)]


def _rows(tokenizer, example: Example, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (context + ending, right-padded) and masks of the ending positions: (E, L) each."""
    ctx = tokenizer.encode_ordinary(example.ctx)
    rows, masks = [], []
    for ending in example.endings:
        end = tokenizer.encode_ordinary(" " + ending)[:block_size]
        tokens = (ctx + end)[-(block_size + 1) :]  # cut the context from the left; +1: inputs and targets
        rows.append(tokens)
        masks.append([0] * (len(tokens) - len(end)) + [1] * len(end))
    width = max(len(r) for r in rows)
    pad = lambda seq: seq + [0] * (width - len(seq))  # noqa: E731 - padded positions are masked out
    return torch.tensor([pad(r) for r in rows]), torch.tensor([pad(m) for m in masks])


@torch.no_grad()
def score_example(model, tokenizer, example: Example, device: torch.device) -> tuple[int, int]:
    """``(prediction by total loss, prediction by mean loss)`` for one example."""
    tokens, mask = _rows(tokenizer, example, model.config.block_size)
    tokens, mask = tokens.to(device), mask.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(tokens[:, :-1])[0]  # (E, L-1, V)
    losses = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (E, L-1)
    target_mask = mask[:, 1:].float()  # a loss at position t predicts token t+1
    total = (losses * target_mask).sum(dim=1)
    mean = total / target_mask.sum(dim=1).clamp(min=1)
    return int(total.argmin()), int(mean.argmin())


def score(model, tokenizer, examples: Iterable[Example], device: torch.device, progress: bool = True) -> dict:
    """Accuracy and length-normalised accuracy over ``examples``: ``{"n", "correct", "correct_norm",
    "acc", "acc_norm"}``."""
    examples = list(examples)
    correct = correct_norm = 0
    bar = tqdm(examples, desc="hellaswag", unit="ex", file=sys.stderr, disable=not progress, delay=1)
    for i, example in enumerate(bar, start=1):
        pred, pred_norm = score_example(model, tokenizer, example, device)
        correct += pred == example.label
        correct_norm += pred_norm == example.label
        bar.set_postfix(acc_norm=f"{correct_norm / i:.4f}", refresh=False)
    n = len(examples)
    acc, acc_norm = (count / n if n else float("nan") for count in (correct, correct_norm))
    return {"n": n, "correct": correct, "correct_norm": correct_norm, "acc": acc, "acc_norm": acc_norm}
