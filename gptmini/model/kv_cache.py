"""The key/value cache that makes generation cost one position per new token instead of the whole context.

``KVCache`` holds every layer's keys and values in preallocated (B, nkv, max_length, hs) tensors and counts
the filled positions; each forward pass hands a layer its ``LayerKVCache`` view. Two ways to use a view:
with an int ``start`` (a variable-shape call: the new tokens' keys/values are written at start..start+T and
attention reads the filled prefix), or with a tensor ``start`` and a ``visible`` mask (``GPT.decode_step``:
one token, fixed shapes, the whole buffer read under the mask, so ``torch.compile`` captures the step once).
Pure torch; imports nothing of gptmini.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerKVCache:
    """One layer's view of a ``KVCache``: where new keys/values go and what the queries may attend to."""

    keys: Tensor  # (B, nkv, max_length, hs), preallocated
    values: Tensor  # (B, nkv, max_length, hs), preallocated
    start: int | Tensor  # positions already filled before this forward call
    visible: Tensor | None = None
    """For a one-token decoding step whose position ``start`` is a 0-dim tensor: (1, 1, 1, max_length), True
    up to that position. Attention then reads the whole buffer under this mask: every step has the same
    shapes, which is what lets ``torch.compile`` (and CUDA graphs) capture the step once."""

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nkv, T, hs) at positions start..start+T; return all keys/values so far (the whole
        buffer when ``start`` is a tensor: ``visible`` says which positions count)."""
        if isinstance(self.start, Tensor):
            self.keys.index_copy_(2, self.start.view(1), k.to(self.keys.dtype))
            self.values.index_copy_(2, self.start.view(1), v.to(self.values.dtype))
            return self.keys.to(k.dtype), self.values.to(v.dtype)  # (B, nkv, max_length, hs)
        end = self.start + k.size(2)
        self.keys[:, :, self.start : end] = k
        self.values[:, :, self.start : end] = v
        # .to() is a no-op unless the cache was made in another dtype (e.g. fp32 cache under bf16 autocast).
        return self.keys[:, :, :end].to(k.dtype), self.values[:, :, :end].to(v.dtype)  # (B, nkv, end, hs)


class KVCache:
    """Keys and values of every layer for the tokens processed so far, so generation does not recompute them.

    Preallocated (B, nkv, max_length, hs) tensors per layer; ``length`` counts the filled positions. The
    model hands each layer ``layer(i)`` and advances ``length`` after a forward pass. Use under
    ``torch.no_grad()``. With grouped-query attention it holds only the ``n_kv_head`` key/value heads
    (``n_kv_head=None``: all ``n_head``), so its memory shrinks by n_head / n_kv_head.
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
        self.positions = torch.arange(max_length, device=device)  # for decoding steps' visibility masks

    def layer(self, i: int) -> LayerKVCache:
        """The view that layer i reads and writes during the current forward pass."""
        return LayerKVCache(self.keys[i], self.values[i], self.length)

    def visible_through(self, position: Tensor) -> Tensor:
        """(1, 1, 1, max_length) bool mask of the positions up to ``position`` (a 0-dim tensor)."""
        return (self.positions <= position).view(1, 1, 1, -1)

    def reset(self) -> None:
        """Forget all cached tokens (the tensors are reused, not reallocated)."""
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Memory the cache holds, keys and values of every layer."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
