"""LoRA: low-rank adapters on a frozen GPT, and merging them back into plain weights.

A LoRA layer keeps the pretrained weight W frozen and learns a low-rank update: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ,
with A (r, in), B (out, r), r small and s = alpha / r. B starts at zero, so training starts exactly at the
pretrained model, and only r·(in + out) numbers per layer train (well under 1% of GPT-2 small at r=8).

Why not peft: ``peft.get_peft_model`` does wrap a plain ``nn.Module``, but it puts the GPT inside a
``PeftModel`` and renames every tensor (``base_model.model.blocks.0.attn.qkv.base_layer.weight``), so
checkpoints, resume, ``load_weights``' messages, ``torch.compile`` in place and our ``GPT.loss`` (which reads
``lm_head.weight`` directly) would each need a translation layer. ``LoRALinear`` below is an ``nn.Linear``
subclass that keeps the base tensors under their own names and adds two: ``<name>.lora_a`` and
``<name>.lora_b``. A LoRA checkpoint is those tensors alone, and merging is one matmul per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptmini.common import GptMiniError

METHODS = ("full", "lora")
TARGETS = ("qkv", "proj", "mlp")  # attention's input projection(s), its output projection, the MLP's layers
ADAPTER_NAMES = ("lora_a", "lora_b")
MAX_RANK = 4096  # past the width of every layer gptmini builds; larger is a typo (and a huge allocation)


@dataclass
class FinetuneConfig:
    """How a run trains its weights (the ``finetune`` config group)."""

    method: str = "full"
    """"full": every weight trains; "lora": the base is frozen and only low-rank adapters train."""
    rank: int = 8
    """lora: the rank r of each adapter (A is r x in, B is out x r)."""
    alpha: float = 16.0
    """lora: the update is scaled by alpha / rank, so changing the rank does not change the step size."""
    dropout: float = 0.0
    """lora: dropout on the adapters' input, in [0, 1)."""
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    """lora: which layers get adapters: any of qkv, proj, mlp."""

    def __post_init__(self) -> None:
        # Checked whatever the method, at config time: a nonsense value (alpha=inf) must not wait until the
        # loss diverges, where the message could only blame the learning rate.
        if self.method not in METHODS:
            raise GptMiniError(
                f"finetune.method={self.method!r} is unknown; use one of: {', '.join(METHODS)}."
            )
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= MAX_RANK:
            raise GptMiniError(
                f"finetune.rank={self.rank!r} must be an integer in 1..{MAX_RANK}; try finetune.rank=8."
            )
        if not _is_finite_number(self.alpha) or self.alpha <= 0:
            raise GptMiniError(
                f"finetune.alpha={self.alpha!r} must be a finite number > 0; try finetune.alpha=16."
            )
        if not _is_finite_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise GptMiniError(f"finetune.dropout={self.dropout!r} must be in [0, 1); use 0.0 to disable it.")
        targets = self.targets
        if isinstance(targets, str) or not targets or any(t not in TARGETS for t in targets):
            shown = list(targets) if isinstance(targets, (list, tuple)) else targets
            raise GptMiniError(
                f"finetune.targets={shown!r} must be a non-empty list of: {', '.join(TARGETS)}."
            )


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` whose own weight and bias are frozen, plus a trainable low-rank update.

    It shares (not copies) the base layer's parameters, so it is a drop-in replacement: same input and
    output, the same ``weight``/``bias`` names in the state dict, and ``lora_a``/``lora_b`` beside them.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # 0: starts at the base
        # A as nn.Linear initialises its weights, so x·Aᵀ has the scale of a normal layer's output.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) to (..., out): the frozen layer plus the scaled low-rank update."""
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)  # via (..., r)
        return F.linear(x, self.weight, self.bias) + self.scale * update


def add_lora(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Freeze every parameter of a ``GPT`` and put adapters on the target layers; return their names."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = []
    for i, block in enumerate(model.blocks):
        for owner, name in _target_layers(block, cfg.targets):
            layer = getattr(owner, name)
            if cfg.rank > min(layer.in_features, layer.out_features):
                raise GptMiniError(
                    f"finetune.rank={cfg.rank} is larger than the layers it adapts ({layer.in_features} x "
                    f"{layer.out_features}), so the update is not low-rank; use at most "
                    f"finetune.rank={min(layer.in_features, layer.out_features)} (8 is typical)."
                )
            setattr(owner, name, LoRALinear(getattr(owner, name), cfg.rank, cfg.alpha, cfg.dropout))
            wrapped.append(f"blocks.{i}.{'attn' if owner is block.attn else 'mlp'}.{name}")
    return wrapped


def _target_layers(block: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every Linear the targets name: attention's projections in and out, the MLP's."""
    found = []
    for name, child in block.attn.named_children():
        if isinstance(child, nn.Linear):
            kind = "proj" if name == "proj" else "qkv"
            if kind in targets:
                found.append((block.attn, name))
    if "mlp" in targets:
        found += [(block.mlp, n) for n, c in block.mlp.named_children() if isinstance(c, nn.Linear)]
    return found


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is a LoRA adapter tensor (``...qkv.lora_a``; ``lora_a`` in a layer's own)."""
    return key.rpartition(".")[2] in ADAPTER_NAMES


def adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Only the adapter tensors of a state dict: what a LoRA checkpoint stores."""
    return {key: value for key, value in state.items() if is_adapter_key(key)}


def merge_adapters(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Plain ``GPT`` weights: each ``W`` with adapters becomes ``W + scale·B·A``; adapter keys are dropped."""
    merged = {key: value for key, value in state.items() if not is_adapter_key(key)}
    for key in state:
        if key.rpartition(".")[2] == "lora_a":
            prefix = key[: -len("lora_a")]  # "blocks.0.attn.qkv." (or "" for a layer's own state dict)
            a, b = state[key], state[prefix + "lora_b"]
            weight = merged[prefix + "weight"]
            merged[prefix + "weight"] = weight + scale * (b.to(weight.dtype) @ a.to(weight.dtype))
    return merged


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), a shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
