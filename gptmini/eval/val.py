"""Validation loss and bits per byte of a checkpoint on any corpus config.

The corpus is tokenized with the checkpoint's own tokenizer: for a named encoding (gpt2, ...) that is the
cache a training run on the same data made, so a 10B-token corpus is not tokenized again; a trained BPE gets
a cache keyed by its vocabulary. The validation split is tiled with the same non-overlapping windows
training validates on, so the figure equals a training run's ``val/loss`` on the same data and block size.
"""

from __future__ import annotations

import math
import sys

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm  # installed with lightning

from gptmini.common import GptMiniError
from gptmini.data.corpus import DataConfig
from gptmini.data.datamodule import ValWindows
from gptmini.data.token_cache import open_cache, prepare_cache
from gptmini.data.tokenizer import TokenizerConfig, tokenizer_to_spec


@torch.no_grad()
def evaluate_val(
    model, tokenizer, data: DataConfig, device: torch.device, batch_size: int, limit: int | None = None
) -> dict:
    """``{"val_loss", "val_bpb", "val_ppl", "tokens", "windows"}``: token-weighted mean cross-entropy."""
    if data.name == "chat":  # windows of text would score the prompts too: not the loss the run reported
        raise GptMiniError(
            "gptmini eval scores windows of text and does not score data=chat yet; a chat run's val/loss "
            "(over the replies) is in its summary.json and metrics.csv."
        )
    spec = tokenizer_to_spec(tokenizer)
    if spec["kind"] == "tiktoken":  # a named encoding: the very cache a training run on this data made
        cache = open_cache(prepare_cache(data, TokenizerConfig(name=spec["name"])))
    else:  # a trained BPE: exactly its vocabulary (a cache keyed by it, built once)
        cache = open_cache(prepare_cache(data, TokenizerConfig(), encoding=tokenizer))
    meta = cache.meta
    if meta["val_tokens"] < 2:
        raise GptMiniError(
            f"data={data.name} has no validation text (data.val_fraction={data.val_fraction}); "
            "set data.val_fraction=0.1, for example."
        )
    windows = ValWindows(cache.token_files("val"), meta["dtype"], meta["val_tokens"], model.config.block_size)
    count = len(windows) if limit is None else min(limit, len(windows))
    loader = DataLoader(torch.utils.data.Subset(windows, range(count)), batch_size=batch_size, shuffle=False)
    total_loss, total_tokens = 0.0, 0
    for x, y in tqdm(loader, desc="val", unit="batch", file=sys.stderr, delay=1):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(x, y)
        total_loss += float(loss) * y.numel()
        total_tokens += y.numel()
    val_loss = total_loss / total_tokens
    bytes_per_token = cache.bytes_per_token("val")
    return {
        "val_loss": val_loss,
        "val_bpb": val_loss / math.log(2) / bytes_per_token,
        "val_ppl": math.exp(val_loss),
        "tokens": total_tokens,
        "windows": count,
        "cache": str(cache.folder),
    }
