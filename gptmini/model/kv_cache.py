"""The key/value cache that makes generation cost one position per new token instead of the whole context.

``KVCache`` holds every layer's keys and values in preallocated (B, nkv, max_length, hs) tensors and counts
the filled positions. For a forward pass it hands each layer a ``CacheView``: the first ``span`` slots of
its buffers, the new tokens' positions (a tensor, one row per sequence) and the mask of the slots each new
token may see. Prefill and eager decoding read the filled prefix (span = length + T); the compiled decoding
step reads the whole buffer (span = max_length), so every step has the same shapes and ``torch.compile``
captures it once. Both walk the same attention code. Pure torch; imports nothing of gptmini.

Eager decoding pays for every small op of every token, so its views (``prefix_views``) skip what a token
after the filled prefix does not need: its keys and values go to the same slot in every row (a slice copy,
no scatter index), and a single query over the filled prefix sees every slot (no mask to build or apply).
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CacheView:
    """One layer's view of a ``KVCache`` for one forward pass."""

    keys: Tensor  # (B, nkv, span, hs): the first span slots of the layer's preallocated buffer
    values: Tensor  # (B, nkv, span, hs)
    positions: Tensor  # (B, T): each new token's position, i.e. the slot its key and value go to
    # (B, 1, T, span): True where a new token may see a slot (its own position and earlier). None: plain
    # causal attention with the new tokens as the span's last T (one token sees all; T tokens from slot 0).
    mask: Tensor | None
    start: int | None = None  # the first new position when every row's are start..start+T-1

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nkv, T, hs) at each row's positions; return the view's keys and values, all span
        slots (the mask says which count)."""
        if self.start is not None:  # the same slots in every row: a slice copy (casts too), no index tensor
            self.keys[:, :, self.start : self.start + k.size(2)].copy_(k)
            self.values[:, :, self.start : self.start + v.size(2)].copy_(v)
        else:
            index = self.positions[:, None, :, None].expand_as(k)  # (B, nkv, T, hs)
            self.keys.scatter_(2, index, k.to(self.keys.dtype))
            self.values.scatter_(2, index, v.to(self.values.dtype))
        # .to() is a no-op unless the cache was made in another dtype (e.g. fp32 cache under bf16 autocast).
        return self.keys.to(k.dtype), self.values.to(v.dtype)


class KVCache:
    """Keys and values of every layer for the tokens processed so far, so generation does not recompute them.

    Preallocated (B, nkv, max_length, hs) tensors per layer; ``length`` counts the filled positions. The
    model asks for ``views`` and advances ``length`` after a forward pass. Use under ``torch.no_grad()``.
    With grouped-query attention it holds only the ``n_kv_head`` key/value heads (``n_kv_head=None``: all
    ``n_head``), so its memory shrinks by n_head / n_kv_head.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_length: int,
        head_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        n_kv_head: int | None = None,
    ):
        shape = (batch_size, n_head if n_kv_head is None else n_kv_head, max_length, head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        self.positions = torch.arange(max_length, device=device)  # every slot's position

    def views(self, positions: Tensor, span: int) -> list[CacheView]:
        """Every layer's view for new tokens at ``positions`` (B, T), over the first ``span`` slots."""
        positions = positions.expand(self.batch_size, -1)  # (B, T)
        return self._views(positions, span, self._mask(positions, span))

    def prefix_views(self, positions: Tensor) -> list[CacheView]:
        """Every layer's view for new tokens at ``positions`` (1, T), which must be length .. length+T-1,
        over the filled slots and theirs (span = length + T): eager prefill and decoding.

        Every row writes the same slots, so ``write`` copies a slice. One new token sees every slot of the
        span, and a prefill from slot 0 is plain causal attention: neither needs a mask tensor (mask None).
        """
        start, T = self.length, positions.size(-1)
        positions = positions.expand(self.batch_size, -1)  # (B, T)
        mask = None if start == 0 or T == 1 else self._mask(positions, start + T)
        return self._views(positions, start + T, mask, start)

    def _mask(self, positions: Tensor, span: int) -> Tensor:
        """(B, 1, T, span): True where the token at ``positions`` (B, T) sees a slot (its own or earlier)."""
        return (self.positions[:span] <= positions[..., None]).unsqueeze(1)

    def _views(
        self, positions: Tensor, span: int, mask: Tensor | None, start: int | None = None
    ) -> list[CacheView]:
        return [
            CacheView(keys[:, :, :span], values[:, :, :span], positions, mask, start)
            for keys, values in zip(self.keys, self.values, strict=True)
        ]

    def row(self, index: int) -> "KVCache":
        """A one-sequence cache over row ``index`` of this one: the same storage, its own (empty) ``length``.

        For a server's ``batch_size``-slot cache: a new request is prefilled alone through its row (the
        shapes of a one-row cache, so it computes what a fresh one-row cache would), and its keys and values
        land in its slot with no copy. Batched decoding then reads the slot with per-row positions.
        """
        if not 0 <= index < self.batch_size:
            raise IndexError(f"row {index} is outside the cache's {self.batch_size} rows")
        view = KVCache.__new__(KVCache)  # shares the tensors: no allocation
        view.keys = [keys[index : index + 1] for keys in self.keys]
        view.values = [values[index : index + 1] for values in self.values]
        view.batch_size = 1
        view.max_length = self.max_length
        view.length = 0
        view.positions = self.positions
        return view

    def reset(self) -> None:
        """Forget all cached tokens (the tensors are reused, not reallocated)."""
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Memory the cache holds, keys and values of every layer."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
