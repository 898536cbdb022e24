"""data=chat's LightningDataModule: one whole conversation per batch row, its loss on the replies.

One concern: serving an opened chat cache (``gptmini.data.chat_cache``) as batches. Imports ``gptmini.data``
modules only; must not import ``gptmini.model``, ``gptmini.training`` or ``gptmini.generation``. Decisions
worth knowing (docs/data.md):

- **Rows and padding.** Each row is one conversation, padded to the batch's longest (never to block_size):
  ``x`` with the end-of-text id, ``y`` (the next tokens) with -1, which the losses ignore. With
  ``data.mask_prompt`` ``y`` is also -1 wherever the target is not reply text or a reply's end token.
- **Too long.** A conversation longer than block_size + 1 tokens is cut to that (counted once, said in one
  line and reported in summary.json as ``truncated_conversations``); one left with no target to learn (its
  prompt fills the window) is skipped, counted as ``skipped_conversations``: a batch of such rows would give
  a loss of 0/0.
- **Training order.** An endless stream: the training conversations in a permutation seeded by
  ``(seed, epoch)``, epoch after epoch. Batch ``k`` of rank ``r`` of ``world`` ranks holds stream positions
  ``(k·world + r)·B ...`` onwards, so it follows from ``(seed, rank, k)`` alone: ranks are disjoint, any
  number of loader workers gives the same batches, and a resume at batch ``k`` continues exactly
  (``ResumableDataModule``). One epoch is ``train_conversations`` positions, which is what ``data.epochs``
  counts.
- **Validation**: every validation conversation in record order, ``data.batch_size`` per batch.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gptmini.common import GptMiniError, as_config, say
from gptmini.data.chat_cache import mask_name, offsets_name
from gptmini.data.corpus import DataConfig
from gptmini.data.datamodule import BatchStream, ResumableDataModule
from gptmini.data.token_cache import TokenCache, TokenStream


class Conversations:
    """A split's usable conversations (each cut to a window) and how to make a padded batch of them.

    Holds paths and small arrays only, so loader workers open their own memmaps when unpickled.
    """

    def __init__(self, cache: TokenCache, split: str, starts, lengths, mask_prompt: bool) -> None:
        self.stream = TokenStream(cache.token_files(split), cache.meta["dtype"])
        self.mask_path = cache.folder / mask_name(split)
        self.starts, self.lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        self.mask_prompt, self.eot = mask_prompt, cache.meta["eot_id"]
        self._mask: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mask": None}

    def __len__(self) -> int:
        return len(self.starts)

    def mask(self) -> np.ndarray:
        """The split's reply mask, memory-mapped (mmap rejects an empty file)."""
        if self._mask is None:
            empty = self.mask_path.stat().st_size == 0
            self._mask = np.zeros(0, np.uint8) if empty else np.memmap(self.mask_path, np.uint8, mode="r")
        return self._mask

    def targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Conversation ``i``'s inputs and targets (-1 where the loss must not look)."""
        start, length = int(self.starts[i]), int(self.lengths[i])
        tokens = self.stream.read(start, start + length).astype(np.int64)
        y = tokens[1:].copy()
        if self.mask_prompt:
            y[self.mask()[start + 1 : start + length] == 0] = -1
        return tokens[:-1], y

    def batch(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The conversations ``rows`` as (x, y) int64 tensors padded to the longest of them."""
        width = int(max(self.lengths[i] for i in rows)) - 1
        x = np.full((len(rows), width), self.eot, dtype=np.int64)
        y = np.full((len(rows), width), -1, dtype=np.int64)
        for row, i in enumerate(rows):
            inputs, targets = self.targets(int(i))
            x[row, : len(inputs)], y[row, : len(targets)] = inputs, targets
        return torch.from_numpy(x), torch.from_numpy(y)


class ChatTrainBatches(BatchStream):
    """The endless training stream; batch k of this rank depends only on (seed, rank, world, k)."""

    def __init__(
        self, conversations: Conversations, batch_size: int, seed: int, rank: int, world: int, start: int
    ):
        super().__init__()
        self.conversations, self.batch_size = conversations, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.start = start  # the first batch index; the DataModule moves it forward as batches are consumed
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s permutation of the training conversations."""
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a batch spans at most two epochs: keep memory flat
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(len(self.conversations))
        return self._orders[epoch]

    def rows(self, k: int) -> list[int]:
        """The conversations of batch ``k``: stream positions ``(k·world + rank)·B`` onwards."""
        first = (k * self.world + self.rank) * self.batch_size
        n = len(self.conversations)
        return [int(self.order(p // n)[p % n]) for p in range(first, first + self.batch_size)]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conversations.batch(self.rows(k))


class ChatValBatches(Dataset):
    """The validation conversations in record order, ``batch_size`` per batch (the last may be smaller)."""

    def __init__(self, conversations: Conversations, batch_size: int) -> None:
        super().__init__()
        self.conversations, self.batch_size = conversations, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.conversations) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        first = i * self.batch_size
        return self.conversations.batch(range(first, min(first + self.batch_size, len(self.conversations))))


def _usable(cache: TokenCache, split: str, window: int, mask_prompt: bool) -> tuple[np.ndarray, ...]:
    """``(starts, cut lengths, targets, too long)`` of a split's conversations that have a target to learn,
    with the number that were too long and the number skipped for having no target left."""
    offsets = np.fromfile(cache.folder / offsets_name(split), dtype=np.int64)
    starts, lengths = offsets[:-1], np.diff(offsets)
    cut = np.minimum(lengths, window)
    if mask_prompt and len(starts):
        mask = np.fromfile(cache.folder / mask_name(split), dtype=np.uint8)
        before = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # reply tokens before each position
        targets = before[starts + cut] - before[starts + 1]
    else:
        targets = np.maximum(cut - 1, 0)
    usable = targets > 0
    return starts[usable], cut[usable], targets[usable], int((lengths > window).sum()), int((~usable).sum())


class ChatDataModule(ResumableDataModule):
    """An opened chat cache served as padded batches of whole conversations (see the module docstring).

    Args:
        cache: the opened chat cache (``open_cache(prepare_cache(data, tokenizer))`` with data.name=chat).
        data: the batching settings (``batch_size``, ``num_workers``, ``mask_prompt``, ``val_fraction``).
        block_size: the model's context length; a conversation is cut to block_size + 1 tokens.
        seed: seeds the training order (with the epoch).

    Raises GptMiniError at once when the training conversations do not fill one batch, or when validation
    was asked for (``data.val_fraction > 0``) but there is no validation conversation to score.
    """

    def __init__(self, cache: TokenCache, data: DataConfig, block_size: int, seed: int = 1337):
        super().__init__()
        if not isinstance(cache, TokenCache) or cache.meta.get("kind") != "chat":
            raise GptMiniError("ChatDataModule needs an opened chat cache (prepare_cache with data=chat).")
        self.cache = cache
        self.data_config = data = as_config(data, DataConfig, "data")
        if not isinstance(block_size, int) or block_size < 1:
            raise GptMiniError(f"block_size={block_size!r} must be a positive integer.")
        if not isinstance(seed, int) or seed < 0:
            raise GptMiniError(f"seed={seed!r} must be a non-negative integer.")
        self.block_size, self.seed = block_size, seed
        window = block_size + 1
        splits, self.truncated, self.skipped, targets = {}, 0, 0, {}
        for split in ("train", "val"):
            starts, lengths, targets[split], truncated, skipped = _usable(
                cache, split, window, data.mask_prompt
            )
            splits[split] = Conversations(cache, split, starts, lengths, data.mask_prompt)
            self.truncated, self.skipped = self.truncated + truncated, self.skipped + skipped
        self.train, self.val = splits["train"], splits["val"]
        self._val_targets = int(targets["val"].sum())
        if self.truncated:
            records = cache.meta["train_records"] + cache.meta["val_records"]
            skipped = f"; {self.skipped} left with no reply to learn are skipped" if self.skipped else ""
            say(
                f"{self.truncated} of {records} conversations are longer than block_size + 1 = {window} "
                f"tokens and are cut to it{skipped}"
            )
        self._check_sizes()

    def _check_sizes(self) -> None:
        size, meta = self.data_config.batch_size, self.cache.meta
        if len(self.train) < size:
            raise GptMiniError(
                f"the training split has {len(self.train)} conversations with a reply to learn "
                f"({meta['train_records']} records), fewer than one batch (data.batch_size={size}); use a "
                "smaller data.batch_size or more conversations."
            )
        if self.data_config.val_fraction > 0 and not len(self.val):
            raise GptMiniError(
                f"data.val_fraction={self.data_config.val_fraction} asked for validation, but the validation "
                f"split has no conversation to score ({meta['val_records']} records; each needs a reply "
                f"within block_size + 1 = {self.block_size + 1} tokens); use more conversations, or "
                "data.val_fraction=0 to train without validation."
            )

    def train_dataloader(self) -> DataLoader:
        """Whole batches from the endless stream, starting after the batches already consumed."""
        size, start = self.data_config.batch_size, self.batches_consumed
        batches = ChatTrainBatches(self.train, size, self.seed, self._rank(), self._world_size(), start)
        return self._loader(batches, None)

    def val_dataloader(self) -> DataLoader:
        """The validation conversations in order (the same every time)."""
        return self._loader(ChatValBatches(self.val, self.data_config.batch_size), None)

    @property
    def train_conversations(self) -> int:
        """Conversations in one epoch of the training stream (``data.epochs`` counts these)."""
        return len(self.train)

    @property
    def val_targets(self) -> int:
        """The loss targets of the validation split: reply tokens with mask_prompt, else every token."""
        return self._val_targets

    @cached_property
    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes per validation loss target, so val/bpb is over exactly what the loss scores."""
        total = 0
        eot = self.cache.meta["eot_id"]
        for i in range(len(self.val)):
            _, y = self.val.targets(i)
            total += len(self.cache.tokenizer.decode_bytes([int(t) for t in y if t not in (-1, eot)]))
        return total / self._val_targets if self._val_targets else math.nan

    def sample_prompt_ids(self) -> list[int]:
        """The first validation (else training) conversation up to its last reply: what the samples printed
        at each validation answer."""
        split = "val" if self.cache.meta["val_records"] else "train"
        offsets = np.fromfile(self.cache.folder / offsets_name(split), dtype=np.int64, count=2)
        tokens = self.cache.stream(split).read(int(offsets[0]), int(offsets[1]))
        mask = np.fromfile(self.cache.folder / mask_name(split), dtype=np.uint8, count=int(offsets[1]))
        reply = len(mask)  # where the last reply starts: the trailing run of reply tokens
        while reply > 0 and mask[reply - 1]:
            reply -= 1
        return [int(t) for t in tokens[:reply]][-self.block_size :]

    @property
    def summary_fields(self) -> dict:
        """The conversations a run used, cut and skipped, for summary.json."""
        return {
            "train_conversations": len(self.train),
            "val_conversations": len(self.val),
            "truncated_conversations": self.truncated,
            "skipped_conversations": self.skipped,
        }
