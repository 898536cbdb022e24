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


def _example(row: dict, where: str) -> Example:
    try:
        ctx, endings, label = row["ctx"], list(row["endings"]), int(row["label"])
    except (KeyError, TypeError, ValueError):
        raise GptMiniError(f"{where} is not a HellaSwag example; the format is {FORMAT_HINT}.") from None
    if not isinstance(ctx, str) or len(endings) < 2 or not 0 <= label < len(endings):
        raise GptMiniError(f"{where} is not a HellaSwag example; the format is {FORMAT_HINT}.")
    return Example(ctx, [str(e) for e in endings], label)


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a local jsonl in HellaSwag's own format (``ctx``, ``endings``, ``label``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GptMiniError(
            f"path={str(path)!r} does not exist; give HellaSwag's jsonl (e.g. hellaswag_val.jsonl from "
            "github.com/rowanz/hellaswag), or leave path unset to read it from the Hugging Face Hub."
        )
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                where = f"{path} line {number}"
                raise GptMiniError(f"{where} is not JSON; the format is {FORMAT_HINT}.") from None
            examples.append(_example(row if isinstance(row, dict) else {}, f"{path} line {number}"))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise GptMiniError(f"{path} holds no examples; the format is {FORMAT_HINT}.")
    return examples


def read_hub(name: str, limit: int | None = None) -> list[Example]:
    """The validation examples of HellaSwag from the Hugging Face Hub (cached by datasets after the first
    download); offline with nothing cached, one line that names the local alternative."""
    from gptmini.data.corpus import HFConfig
    from gptmini.data.hf_source import load_hf_dataset

    hint = "connect to the internet once (it is then cached), or pass path=hellaswag_val.jsonl (a local copy)"
    dataset = load_hf_dataset(HFConfig(path=name, split="validation", streaming=False), "hub", hint)
    rows = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    return [_example(row, f"{name} row {i}") for i, row in enumerate(rows)]


def load_examples(path: str | None, hub: str, limit: int | None = None) -> list[Example]:
    """A local jsonl when ``path`` is given, else the Hub's validation split; the first ``limit``."""
    return read_jsonl(path, limit) if path else read_hub(hub, limit)


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
    return {
        "n": n,
        "correct": correct,
        "correct_norm": correct_norm,
        "acc": correct / n if n else float("nan"),
        "acc_norm": correct_norm / n if n else float("nan"),
    }
