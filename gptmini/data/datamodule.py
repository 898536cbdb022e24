"""The LightningDataModule: random, resumable, rank-disjoint training windows and fixed validation windows.

One concern: serving an opened token cache (``gptmini.data.token_cache.TokenCache``) as batches. It never
tokenizes or reads a corpus: ``prepare_data`` and ``setup`` are Lightning's no-ops, so building one and
asking it anything is cheap. Imports ``gptmini.data`` modules only; must not import ``gptmini.model``,
``gptmini.training`` or ``gptmini.generation``.

Decisions worth knowing:

- **Training windows.** Batch ``k`` of rank ``r`` holds random windows drawn from ``(seed, r, k)`` alone, so
  ranks draw disjoint streams, any number of loader workers gives the same batches in the same order, and
  resuming at batch ``k`` (``state_dict``) continues the stream exactly.
- **Shards.** A split's shard files (one for a small corpus) are read as one token sequence
  (``TokenStream``): a window start is drawn uniformly over the whole sequence and may run on into the next
  shard, so every window is equally likely and a one-file cache draws exactly what it always drew.
- **Validation windows.** Non-overlapping windows of ``block_size`` targets tile the split from its start;
  only the final remainder of fewer than ``block_size`` targets is dropped. A split shorter than one window
  gives a single shorter window.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from gptmini.common import GptMiniError, as_config
from gptmini.data.corpus import DataConfig
from gptmini.data.token_cache import TokenCache, TokenStream

# ------------------------------------------------------------------------------------------------------------
# Datasets


class BatchStream(IterableDataset):
    """An endless stream of numbered batches, ``batch(k)`` from ``start`` on; what each batch holds is the
    subclass's. Batch k must follow from k (and fixed settings) alone: then any number of loader workers gives
    the same batches in the same order, and a resumed stream continues exactly."""

    start = 0  # the first batch index; the DataModule moves it forward as batches are consumed

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # Worker w makes batches k = start + w (mod workers); the DataLoader interleaves them back in order.
        k = self.start + worker_id
        while True:
            yield self.batch(k)
            k += workers


class TrainBatches(BatchStream):
    """An endless stream of training batches of random windows; batch k depends only on (seed, rank, k)."""

    def __init__(self, path, dtype: str, block_size: int, batch_size: int, seed: int, rank: int, start: int):
        super().__init__()
        self.stream = TokenStream(path, dtype)  # pickled as paths: each worker opens its own memmaps
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank = seed, rank
        self.start = start  # the first batch index; the DataModule moves it forward as batches are consumed

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``k``: (x, y) int64 tensors of shape (B, block_size), y shifted by one."""
        rng = np.random.default_rng([self.seed, self.rank, k])
        starts = rng.integers(0, len(self.stream) - self.block_size, size=self.batch_size)
        windows = self.stream.gather(starts, self.block_size + 1).astype(np.int64)  # (B, T+1)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        return x, y


class ValWindows(Dataset):
    """Non-overlapping windows tiling the validation split: every target is predicted once."""

    def __init__(self, path: Path | list[Path], dtype: str, n_tokens: int, block_size: int):
        super().__init__()
        self.tokens = TokenStream(path, dtype)
        # A split shorter than one window gives one shorter window.
        self.window = min(block_size, n_tokens - 1) if n_tokens >= 2 else 0
        self.count = (n_tokens - 1) // self.window if self.window else 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        start = i * self.window
        window = torch.from_numpy(self.tokens.read(start, start + self.window + 1).astype(np.int64))
        return window[:-1].clone(), window[1:].clone()


# ------------------------------------------------------------------------------------------------------------
# The DataModule


def _check_validation_split(meta: dict) -> None:
    """Refuse a cache whose validation split asked for text but got too little for one window: the run would
    train with "validation: loss n/a" and nothing would say why."""
    fraction, tokens = meta.get("val_fraction") or 0, meta["val_tokens"]
    if fraction <= 0 or tokens >= 2:  # a window needs an input token and its target
        return
    more = "more text" + (" (a larger data.max_tokens)" if meta.get("max_tokens") else "")
    raise GptMiniError(
        f"the validation split of {meta.get('source', 'the corpus')} has {tokens} token(s), too few for one "
        f"validation window (data.val_fraction={fraction} of its {meta['train_bytes'] + meta['val_bytes']} "
        f"bytes), so the run would train without a validation loss; use {more}, a larger "
        "data.val_fraction, or data.val_fraction=0 to train without validation."
    )


class ResumableDataModule(L.LightningDataModule):
    """What every gptmini DataModule shares: an endless training stream resumed at the first batch not yet
    consumed (``state_dict``), the rank, and the loaders. Subclasses say what the batches are."""

    def __init__(self) -> None:
        super().__init__()
        self._loaded_batches = 0  # load_state_dict's value, for a DataModule used without a trainer

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, dataset, batch_size: int | None) -> DataLoader:
        workers, pin = self.data_config.num_workers, torch.cuda.is_available()
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)

    @property
    def batches_consumed(self) -> int:
        """Training batches this rank has taken from the stream: where a resumed stream continues.

        Derived from the trainer's optimizer steps rather than counted in a batch hook: Lightning also runs
        the batch-transfer hooks on the model summary's example input, which is no training batch, and a
        count kept there was one too high. Checkpoints are written only between optimizer steps, so every
        batch taken belongs to a finished step. Without a trainer it is the value last loaded.
        """
        if isinstance(self.trainer, L.Trainer):
            return self.trainer.global_step * self.trainer.accumulate_grad_batches
        return self._loaded_batches

    def state_dict(self) -> dict:
        """How far the training stream got: enough to resume it exactly."""
        return {"batches_consumed": self.batches_consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume: the next train_dataloader starts at the first batch not yet consumed."""
        self._loaded_batches = int(state_dict["batches_consumed"])

    @property
    def summary_fields(self) -> dict:
        """Figures of the data for the run's summary.json (none by default)."""
        return {}


class TextDataModule(ResumableDataModule):
    """An opened token cache served as resumable, rank-disjoint random training windows and fixed validation
    windows.

    Args:
        cache: the opened cache (``open_cache(prepare_cache(data, tokenizer))``).
        data: the batching settings (``batch_size``, ``num_workers``).
        block_size: the model's context length; windows hold block_size + 1 tokens.
        seed: seeds the training windows (with the rank and the batch index).

    Raises GptMiniError at once when one window or one batch does not fit the training split, or when
    ``data.val_fraction`` asked for validation text but the split holds too little for one window.
    """

    def __init__(self, cache: TokenCache, data: DataConfig, block_size: int, seed: int = 1337):
        super().__init__()
        if not isinstance(cache, TokenCache):
            raise GptMiniError(
                f"TextDataModule needs an opened TokenCache (open_cache(folder)), not {type(cache).__name__}"
            )
        self.cache = cache
        self.data_config = as_config(data, DataConfig, "data")
        if not isinstance(block_size, int) or block_size < 1:
            raise GptMiniError(f"block_size={block_size!r} must be a positive integer.")
        if not isinstance(seed, int) or seed < 0:
            raise GptMiniError(f"seed={seed!r} must be a non-negative integer.")
        self.block_size = block_size
        self.seed = seed
        train_tokens, need = cache.meta["train_tokens"], block_size + 1
        if train_tokens < need:
            raise GptMiniError(
                f"the training split has {train_tokens} tokens, fewer than one window of "
                f"block_size + 1 = {need} tokens; use a smaller model.block_size or more text."
            )
        _check_validation_split(cache.meta)
        per_batch = self.data_config.batch_size * block_size
        if per_batch > train_tokens:
            raise GptMiniError(
                f"one batch (data.batch_size={self.data_config.batch_size} × block_size={block_size} = "
                f"{per_batch} tokens) is larger than the whole training split ({train_tokens} "
                "tokens); use a smaller data.batch_size or model.block_size, or more text."
            )

    def train_dataloader(self) -> DataLoader:
        """Whole batches from an endless stream that starts after the batches already consumed."""
        files, dtype = self.cache.token_files("train"), self.cache.meta["dtype"]
        size, start = self.data_config.batch_size, self.batches_consumed
        batches = TrainBatches(files, dtype, self.block_size, size, self.seed, self._rank(), start)
        return self._loader(batches, None)

    def val_dataloader(self) -> DataLoader:
        """The validation windows in order (the same every time)."""
        meta = self.cache.meta
        windows = ValWindows(
            self.cache.token_files("val"), meta["dtype"], meta["val_tokens"], self.block_size
        )
        return self._loader(windows, self.data_config.batch_size)

    @property
    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes per validation target, for bits/byte (every validation token is a target)."""
        return self.cache.bytes_per_token("val")

    @property
    def val_targets(self) -> int:
        """The validation split's tokens (what the summary reports as ``val_tokens``)."""
        return self.cache.meta["val_tokens"]
