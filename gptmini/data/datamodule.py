"""The LightningDataModule: random, resumable, rank-disjoint training windows and fixed validation windows."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from gptmini.common import GptMiniError, as_config
from gptmini.data.corpus import DataConfig
from gptmini.data.token_cache import load_cached_tokenizer, open_tokens, prepare_cache, read_meta
from gptmini.data.tokenizer import (
    TokenizerConfig,
    tokenizer_to_spec,
)

log = logging.getLogger(__name__)
# ------------------------------------------------------------------------------------------------------------
# Datasets


class TrainBatches(IterableDataset):
    """An endless stream of training batches of random windows; batch k depends only on (seed, rank, k)."""

    def __init__(
        self, path: Path, dtype: str, block_size: int, batch_size: int, seed: int, rank: int, start: int
    ):
        super().__init__()
        self.path, self.dtype = path, dtype
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank = seed, rank
        self.start = start  # the first batch index; the DataModule moves it forward as batches are consumed
        self._tokens = None

    def __getstate__(self) -> dict:
        # Workers open their own memmap; pickling one would copy the whole token file.
        return {**self.__dict__, "_tokens": None}

    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = open_tokens(self.path, self.dtype)
        return self._tokens

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``k``: (x, y) int64 tensors of shape (B, block_size), y shifted by one."""
        tokens = self.tokens()
        rng = np.random.default_rng([self.seed, self.rank, k])
        starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
        windows = tokens[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64)  # (B, T+1)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # Worker w makes batches k = start + w (mod workers); the DataLoader interleaves them back in order.
        k = self.start + worker_id
        while True:
            yield self.batch(k)
            k += workers


class ValWindows(Dataset):
    """Non-overlapping windows tiling the validation split: every target is predicted once."""

    def __init__(self, path: Path, dtype: str, n_tokens: int, block_size: int):
        super().__init__()
        self.path, self.dtype = path, dtype
        # A split shorter than one window gives one shorter window.
        self.window = min(block_size, n_tokens - 1) if n_tokens >= 2 else 0
        self.count = (n_tokens - 1) // self.window if self.window else 0
        self._tokens = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self._tokens is None:
            self._tokens = open_tokens(self.path, self.dtype)
        start = i * self.window
        window = torch.from_numpy(self._tokens[start : start + self.window + 1].astype(np.int64))
        return window[:-1].clone(), window[1:].clone()


# ------------------------------------------------------------------------------------------------------------
# The DataModule


class TextDataModule(L.LightningDataModule):
    """Token caches served as resumable, rank-disjoint random training windows and fixed validation windows.

    Args:
        data: the corpus and batching settings.
        tokenizer: the tokenizer settings.
        block_size: the model's context length; windows hold block_size + 1 tokens.
        seed: seeds the training windows (with the rank and the batch index).
    """

    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, block_size: int, seed: int = 1337):
        super().__init__()
        self.data_config = as_config(data, DataConfig, "data")
        self.tokenizer_config = as_config(tokenizer, TokenizerConfig, "tokenizer")
        if not isinstance(block_size, int) or block_size < 1:
            raise GptMiniError(f"block_size={block_size!r} must be a positive integer.")
        if not isinstance(seed, int) or seed < 0:
            raise GptMiniError(f"seed={seed!r} must be a non-negative integer.")
        self.block_size = block_size
        self.seed = seed
        self.batches_consumed = 0
        self.cache_dir: Path | None = None
        self.meta: dict | None = None
        self.tokenizer: tiktoken.Encoding | None = None
        self.tokenizer_spec: dict | None = None
        self._train_batches: TrainBatches | None = None

    def prepare_data(self) -> None:
        """Tokenize once (Lightning calls this on one process per node)."""
        # Checking an existing cache hashes the whole corpus: once per process is enough.
        if self.cache_dir is None:
            self.cache_dir = prepare_cache(self.data_config, self.tokenizer_config)

    def setup(self, stage: str | None = None) -> None:
        """Load the cache (preparing it if this process has not): cheap when it exists."""
        if self.meta is not None:
            return
        self.prepare_data()
        self.meta = read_meta(self.cache_dir)
        self.tokenizer = load_cached_tokenizer(self.cache_dir, self.meta)
        self.tokenizer_spec = tokenizer_to_spec(self.tokenizer)
        need = self.block_size + 1
        if self.meta["train_tokens"] < need:
            raise GptMiniError(
                f"the training split has {self.meta['train_tokens']} tokens, fewer than one window of "
                f"block_size + 1 = {need} tokens; use a smaller model.block_size or more text."
            )
        per_batch = self.data_config.batch_size * self.block_size
        if per_batch > self.meta["train_tokens"]:
            raise GptMiniError(
                f"one batch (data.batch_size={self.data_config.batch_size} × block_size={self.block_size} = "
                f"{per_batch} tokens) is larger than the whole training split ({self.meta['train_tokens']} "
                "tokens); use a smaller data.batch_size or model.block_size, or more text."
            )

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (n_vocab)."""
        self.setup()
        return self.tokenizer.n_vocab

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes per token of a split: bits per byte = loss_nats / ln 2 / bytes_per_token."""
        self.setup()
        if split not in ("train", "val"):
            raise GptMiniError(f"split={split!r} must be 'train' or 'val'")
        tokens = self.meta[f"{split}_tokens"]
        return self.meta[f"{split}_bytes"] / tokens if tokens else math.nan

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader_kwargs(self) -> dict:
        workers = self.data_config.num_workers
        return {"num_workers": workers, "pin_memory": torch.cuda.is_available()}

    def train_dataloader(self) -> DataLoader:
        """Whole batches from an endless stream that starts after the batches already consumed."""
        self.setup()
        self._train_batches = TrainBatches(
            self.cache_dir / "train.bin",
            self.meta["dtype"],
            self.block_size,
            self.data_config.batch_size,
            self.seed,
            self._rank(),
            self.batches_consumed,
        )
        return DataLoader(self._train_batches, batch_size=None, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """The validation windows in order (the same every time)."""
        self.setup()
        windows = ValWindows(
            self.cache_dir / "val.bin", self.meta["dtype"], self.meta["val_tokens"], self.block_size
        )
        return DataLoader(
            windows, batch_size=self.data_config.batch_size, shuffle=False, **self._loader_kwargs()
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Lightning calls this in the main process for each batch it actually uses (not for prefetched ones),
        # so the count is exact; validation batches don't advance the training stream.
        if self.trainer is not None and self.trainer.training:
            self.batches_consumed += 1
            if self._train_batches is not None:
                # A re-iterated loader (a new epoch) continues the stream instead of repeating it.
                self._train_batches.start = self.batches_consumed
        return batch

    def state_dict(self) -> dict:
        """How far the training stream got: enough to resume it exactly."""
        return {"batches_consumed": self.batches_consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume: the next train_dataloader starts at the first batch not yet consumed."""
        self.batches_consumed = int(state_dict["batches_consumed"])
        if self._train_batches is not None:
            self._train_batches.start = self.batches_consumed
