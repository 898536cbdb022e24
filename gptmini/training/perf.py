"""Model FLOPs utilisation (achieved FLOP/s over the device's dense peak) and the FLOPs it counts.

A fixed A100 peak reads over 100% on an H100, so the peak is looked up by device name, can be overridden,
and is ``None`` (reported as "n/a") where unknown: no number beats a wrong number.
"""

from __future__ import annotations

import torch

# Dense (not 2:4-sparse) tensor-core peaks in FLOP/s, from the vendors' datasheets. Lookup is by substring of
# torch.cuda.get_device_name(), most specific first.
_PEAK_BF16 = [
    ("h200", 989e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("gh200", 989e12),
    ("a100", 312e12),
    ("a10g", 70e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("rtx 4090", 165e12),
    ("rtx 3090", 71e12),
    ("v100", 125e12),  # fp16 tensor cores (no bf16)
]
_PEAK_FP32 = [("h200", 67e12), ("h100", 67e12), ("a100", 19.5e12), ("l4", 30e12), ("v100", 15.7e12)]


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The device's dense peak FLOP/s for this precision; ``override`` wins; None when unknown (CPU, MPS)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    half = "bf16" in str(precision) or "16" in str(precision)
    table = _PEAK_BF16 if half else _PEAK_FP32
    for key, flops in table:
        if key in name:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Fraction of the peak achieved; None when the peak is unknown."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / peak


def flops_per_token(model: torch.nn.Module, seq_len: int | None = None) -> int:
    """A GPT's training FLOPs per token (forward + backward): 6·N + 12·L·H·Q·T (PaLM appendix B, as nanoGPT).

    N counts the weights that multiply: every parameter but the lookup tables (the position and value
    embeddings, and the token embeddings when the LM head is untied; tied, they are the head's
    matrix). A trained
    weight costs 6 FLOPs per token (2 forward, 2 for the input's gradient, 2 for its own); a frozen one
    (LoRA's base) only 4, since it needs no gradient of its own. The second term is the attention score
    and weighted-sum matmuls: L layers, H heads, Q head size, T = seq_len (default block_size).
    """
    c = model.config
    T = c.block_size if seq_len is None else seq_len
    lookups = {id(model.wpe.weight)} if model.wpe is not None else set()
    if not c.tie_embeddings:
        lookups.add(id(model.wte.weight))
    lookups |= {id(table.weight) for table in getattr(model, "value_embeds", None) or []}
    weights = sum(
        (6 if p.requires_grad else 4) * p.numel() for p in model.parameters() if id(p) not in lookups
    )
    return weights + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T
