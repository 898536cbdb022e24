"""The optimizer and its learning-rate schedule: ``OptimConfig``, ``build_optimizer``, ``build_lr_schedule``.

AdamW (nanoGPT's setup), or Muon on the blocks' matrices with AdamW on the rest (nanochat's and the
modded-nanogpt speedrun's split); one schedule multiplies every group's rate, counted in optimizer steps or
in elapsed time. The LightningModule and bench/train.py's plain loop both build theirs here, so they cannot
drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptmini.common import GptMiniError, check_finite_floats

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
SCHEDULE_BY = ("steps", "time")


@dataclass
class OptimConfig:
    """The optimizer and its schedule: linear warmup, then cosine (or WSD) decay to a floor, per step."""

    name: str = "adamw"
    """Which optimizer: adamw, or muon (Muon on the blocks' matrices at ``muon_lr``, AdamW on the rest)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW's), reached at the end of warmup."""
    min_lr: float = 3e-4
    """Floor of the decay (nanoGPT uses lr / 10); Muon's floor is muon_lr · min_lr / lr."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (optim=muon only); it follows the same schedule as ``lr``."""
    embed_lr: float | None = None
    """Peak rate of the token (and position) embeddings; None = ``lr``. A lookup table sees each row only
    when its token occurs, so it can take far larger steps than the matrices (modded-nanogpt's ~100x)."""
    head_lr: float | None = None
    """Peak rate of an untied LM head; None = ``lr``. (Tied, the head is the embedding: ``embed_lr``.)"""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov), in [0, 1)."""
    schedule: str = "cosine"
    """The decay: cosine (from the end of warmup to the end) or wsd (constant, then a linear decay)."""
    decay_fraction: float = 0.2
    """WSD: the final fraction of the run spent decaying linearly to ``min_lr``, in (0, 1]."""
    schedule_by: str = "steps"
    """What counts progress: steps (deterministic; the length is decay_steps or trainer.max_steps) or time
    (elapsed training time / trainer.max_time; the run ends when the time is up)."""
    warmup_steps: int = 50
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    decay_steps: int | None = None
    """Steps from the start to the end of the cosine decay; None = ``trainer.max_steps``."""
    weight_decay: float = 0.1
    """Decoupled weight decay, only on weights with 2 or more dimensions (not biases, not LayerNorms)."""
    embed_weight_decay: float | None = None
    """Weight decay of the embeddings' group (``embed_lr``'s: token, position and value tables); None =
    ``weight_decay``. AdamW's decay is ``lr · weight_decay`` a step, so at 10x the rate the tables are pulled
    to zero 10x as hard, and a rare token's row, which few gradients push back, shrinks the most."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay (0.95 is steadier than 0.999 for language models)."""
    eps: float = 1e-8
    """AdamW epsilon."""

    def __post_init__(self) -> None:
        check_finite_floats(self, prefix="optim.")  # NaN passes range checks such as "< 0"; inf, "> 0"
        for name, valid in (("name", OPTIMIZERS), ("schedule", SCHEDULES), ("schedule_by", SCHEDULE_BY)):
            if getattr(self, name) not in valid:
                raise GptMiniError(
                    f"optim.{name}={getattr(self, name)!r} is not known; valid: {', '.join(valid)}."
                )
        if self.name == "muon":
            check_muon_available()  # an old torch: one line now, not an AttributeError at the first step
        ranges = [  # (field, whether its value is valid, the valid range, a hint), checked in this order
            ("muon_lr", self.muon_lr > 0, "> 0", "; try optim.muon_lr=0.02"),
            ("muon_momentum", 0 <= self.muon_momentum < 1, "in [0, 1)", "; try 0.95"),
            ("decay_fraction", 0 < self.decay_fraction <= 1, "in (0, 1]", "; try 0.2"),
            ("lr", self.lr > 0, "> 0", "; try optim.lr=1e-3"),
            ("embed_lr", self.embed_lr is None or self.embed_lr > 0, "> 0 or null (= optim.lr)", ""),
            ("head_lr", self.head_lr is None or self.head_lr > 0, "> 0 or null (= optim.lr)", ""),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"in [0, optim.lr={self.lr}]", ""),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0", ""),
            ("decay_steps", self.decay_steps is None or self.decay_steps > 0, "> 0 or null", ""),
            ("weight_decay", self.weight_decay >= 0, ">= 0", ""),
            (
                "embed_weight_decay",
                self.embed_weight_decay is None or self.embed_weight_decay >= 0,
                ">= 0 or null (= optim.weight_decay)",
                "",
            ),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)", ""),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)", ""),
            ("eps", self.eps >= 0, ">= 0", "; try optim.eps=1e-8"),
        ]
        for name, valid, allowed, hint in ranges:
            if not valid:
                raise GptMiniError(f"optim.{name} must be {allowed}, got {getattr(self, name)}{hint}.")


def lr_at(step: int, optim: OptimConfig, decay_steps: int, progress: float | None = None) -> float:
    """The (AdamW) learning rate after ``step`` optimizer steps: linear warmup, decay until ``decay_steps``,
    then the floor.

    With ``progress`` (schedule_by="time": the fraction of the time budget used) the rate is the lower of the
    warmup ramp (in steps: it is about the first updates, not the clock) and the decay curve at that progress,
    so the schedule reaches its floor when the time is up even on a machine so slow that the run never leaves
    warmup.
    """
    warmup = optim.lr * (step + 1) / optim.warmup_steps if step < optim.warmup_steps else optim.lr
    if progress is not None:
        return min(warmup, _decay(progress, optim))
    if step < optim.warmup_steps:
        return warmup
    return _decay((step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps), optim)


def _decay(progress: float, optim: OptimConfig) -> float:
    """The rate after warmup at ``progress`` in [0, 1] of the decay's span: cosine or WSD, then the floor."""
    if progress >= 1:
        return optim.min_lr
    if optim.schedule == "wsd":
        # Stable at the peak, then straight down to the floor over the last decay_fraction.
        into_decay = (progress - (1 - optim.decay_fraction)) / optim.decay_fraction
        return optim.lr - max(0.0, into_decay) * (optim.lr - optim.min_lr)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


# The precisions whose Lightning plugin scales float16 losses with a GradScaler (16: the old name).
SCALED_PRECISIONS = ("16-mixed", "16")


def adamw_fused(device: torch.device | str, precision: str | None = None, clipping: bool = False) -> bool:
    """Whether AdamW runs fused (one kernel for all parameters): on CUDA and on CPUs, where its gradients can
    be clipped. On a CPU torch's default is one tensor at a time; fused took the Shakespeare model's AdamW
    step from ~5 to ~1 ms (2 threads), about 1% of its training step.

    The one place that decides: ``build_optimizer`` builds by it and ``GPTTrainingModule`` clips by it.
    Fused AdamW unscales a GradScaler's gradients inside its own step (torch marks it
    ``_step_supports_amp_scaling``), so with 16-mixed the gradients are still scaled when they would be
    clipped, and Lightning refuses to clip: the run stopped at step 1. A run that clips under 16-mixed
    therefore gets torch's default instead (foreach: multi-tensor kernels, nearly as fast). Every other
    precision has true gradients before the step and stays fused; Lightning's mixed-precision plugin still
    refuses to clip a fused optimizer even without a scaler (bf16-mixed), so the module clips those itself.
    ``precision=None`` is a plain loop outside Lightning (bench/), which clips itself: fused.
    """
    if torch.device(device).type not in ("cuda", "cpu"):
        return False
    return not (clipping and str(precision) in SCALED_PRECISIONS)


def decay_groups(params, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable ``params``: decay on matrices (≥2-D: Linear and embedding
    weights), none on biases and norm gains, which only shift or scale and should not be pulled to zero."""
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def rate_groups(model: torch.nn.Module, params, optim: OptimConfig) -> list[dict]:
    """``decay_groups`` of ``params``, with the embeddings (token, position, value) at ``optim.embed_lr`` and
    ``optim.embed_weight_decay``, and an untied LM head at ``optim.head_lr``, in groups of their own where
    those are set. Empty groups are left out.

    A group's "lr" is its peak: the schedule (``build_lr_schedule``) scales every group by the same factor.
    """
    params = [p for p in params if p.requires_grad]
    tables = [getattr(model, n) for n in ("wte", "wpe") if getattr(model, n, None) is not None]
    tables += list(getattr(model, "value_embeds", None) or [])  # value embeddings are lookup tables too
    embeddings = {id(table.weight) for table in tables}
    head = getattr(model, "lm_head", None)
    head = {id(head.weight)} - embeddings if head is not None else set()  # tied: it is the embedding
    own = [(embeddings, optim.embed_lr, optim.embed_weight_decay), (head, optim.head_lr, None)]
    groups, taken = [], set()
    for ids, lr, decay in own:
        mine = [p for p in params if id(p) in ids]
        if (lr is not None or decay is not None) and mine:
            group = {"params": mine, "weight_decay": optim.weight_decay if decay is None else decay}
            if lr is not None:  # otherwise the optimizer's own rate, optim.lr
                group["lr"] = lr
            groups.append(group)
            taken |= ids
    rest = decay_groups((p for p in params if id(p) not in taken), optim.weight_decay)
    return [g for g in rest + groups if g["params"]]


def build_optimizer(
    model: torch.nn.Module,
    optim: OptimConfig,
    device: torch.device | str,
    precision: str | None = None,
    clipping: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over ``rate_groups``, fused where ``adamw_fused`` allows (the Trainer's ``precision``, and
    whether it clips gradients); or, for optim.name="muon", ``MuonWithAdamW``."""
    fused = adamw_fused(device, precision, clipping)
    adamw = {"lr": optim.lr, "betas": (optim.beta1, optim.beta2), "eps": optim.eps, "fused": fused}
    if optim.name == "adamw":
        return torch.optim.AdamW(rate_groups(model, model.parameters(), optim), **adamw)
    hidden = muon_parameters(model)
    hidden_ids = {id(p) for p in hidden}
    rest = rate_groups(model, (p for p in model.parameters() if id(p) not in hidden_ids), optim)
    # torch's Muon runs its orthogonalisation in bfloat16, fast on GPUs but ~25x slower than float32 on CPUs.
    check_muon_available()
    muon_class = torch.optim.Muon if torch.device(device).type == "cuda" else Float32Muon
    muon = muon_class(hidden, lr=optim.muon_lr, weight_decay=optim.weight_decay, momentum=optim.muon_momentum)
    return MuonWithAdamW(muon, torch.optim.AdamW(rest, **adamw))


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weight matrices inside the transformer blocks: what Muon orthogonalises.

    The embeddings and the LM head are matrices too, but a lookup table and the output layer are not the
    hidden linear maps Muon's update rule is derived for; they stay with AdamW (as in modded-nanogpt).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise GptMiniError("optim.name=muon needs a GPT (its hidden matrices live in model.blocks).")
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """Muon's Newton-Schulz iteration in float32: ``update`` (m, n) mapped to roughly U·Vᵀ of its SVD.

    Each step applies the odd polynomial a·X + b·(X Xᵀ)X + c·(X Xᵀ)²X, which pushes every singular value
    of X (after scaling the whole matrix to norm <= 1) towards 1 while keeping the singular vectors.
    ``update`` may also be a stack (k, m, n) of matrices of one shape, each orthogonalised on its own: one
    batched matmul per product instead of k small ones (on a 2-core CPU the 16 matrices of the Shakespeare
    model went from 52 to 40 ms a step).
    """
    a, b, c = coefficients
    x = update.float()
    stacked = x.dim() == 3
    if not stacked:
        x = x.unsqueeze(0)
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·gram + c·gram², one kernel
        x = torch.baddbmm(x, poly, x, beta=a)  # a·x + poly·x
    if tall:
        x = x.mT
    return x if stacked else x.squeeze(0)


# torch.optim.Muon, which optim=muon builds on, arrived in torch 2.9; everything else here needs torch 2.6.
MUON_TORCH = "2.9"


def check_muon_available() -> None:
    """optim=muon on a torch without ``torch.optim.Muon``: one line naming the version it needs."""
    if not hasattr(torch.optim, "Muon"):
        raise GptMiniError(
            f"optim=muon needs torch.optim.Muon, added in torch {MUON_TORCH}, but this is torch "
            f"{torch.__version__}; upgrade it (pip install 'torch>={MUON_TORCH}') or use optim=adamw."
        )


if hasattr(torch.optim, "Muon"):  # defined only where its base exists: importing this module must work on 2.6

    class Float32Muon(torch.optim.Muon):
        """``torch.optim.Muon`` with its Newton-Schulz iteration in float32 (``orthogonalize``), for CPUs.

        torch casts each update to bfloat16 for the iteration: on most CPUs that matmul is ~25x slower than
        in float32, and a Muon step of the 1M-parameter Shakespeare model took 3 s instead of ~0.1 s. The
        rule is torch's: Nesterov momentum in ``momentum_buffer`` (the same state, so checkpoints move between
        the two), decoupled weight decay, and the rate scaled by sqrt(max(1, rows / cols)).
        """

        @torch.no_grad()
        def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                params, grads, buffers = [], [], []
                self._init_group(group, params, grads, buffers)  # creates missing momentum buffers
                lr, momentum = group["lr"], group["momentum"]
                updates = []
                for grad, buf in zip(grads, buffers, strict=True):
                    buf.lerp_(grad, 1 - momentum)
                    updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
                orthogonal = self._orthogonalize_by_shape(updates, group)
                for param, update in zip(params, orthogonal, strict=True):
                    param.mul_(1 - lr * group["weight_decay"])
                    scale = math.sqrt(max(1.0, param.size(0) / param.size(1)))
                    param.add_(update.to(param.dtype), alpha=-lr * scale)
            return loss

        @staticmethod
        def _orthogonalize_by_shape(updates: list[torch.Tensor], group: dict) -> list[torch.Tensor | None]:
            """``orthogonalize`` of each update, the updates of one shape stacked into one batched call
            (a block's four matrices have four shapes, shared by every block). Returned in input order."""
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, update in enumerate(updates):
                by_shape.setdefault(tuple(update.shape), []).append(i)
            out: list[torch.Tensor | None] = [None] * len(updates)  # every slot is filled below
            for indices in by_shape.values():
                stack = torch.stack([updates[i] for i in indices])  # (k, m, n)
                done = orthogonalize(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for i, matrix in zip(indices, done.unbind(0), strict=True):
                    out[i] = matrix
            return out


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped together, seen by Lightning and the LR scheduler as one optimizer.

    ``param_groups`` are the two optimizers' own groups (Muon's first), so a scheduler scales each group's
    initial learning rate and both follow one schedule; ``state_dict`` holds both states, so a resumed run
    continues exactly. ``Optimizer.__init__`` is not called: the inner optimizers own the groups and state.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        self.defaults = {}

    @property
    def param_groups(self) -> list[dict]:
        # Read live: load_state_dict replaces the inner optimizers' group dicts.
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter; ``closure`` (forward and backward) runs first, once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def build_lr_schedule(
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig,
    decay_steps: int,
    progress: Callable[[], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_at`` as a scheduler stepped once per optimizer step; ``progress`` (schedule_by="time") returns
    the fraction of the time budget used so far."""

    def factor(step: int) -> float:
        # LambdaLR multiplies each group's base lr, so express the schedule as a fraction of the peak.
        return lr_at(step, optim, decay_steps, None if progress is None else progress()) / optim.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
