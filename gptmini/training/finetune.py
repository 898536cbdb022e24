"""Fine-tuning: what a run starts from (``init_from``: anything ``gptmini.weights.read_weights`` reads) and
how (full, or LoRA adapters on frozen weights). A LoRA run's checkpoints hold only the adapters, name their
base and record its fingerprint, so a resume reads the base again and refuses one that now holds other
weights, or other finetune settings than the run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptmini.common import GptMiniError
from gptmini.model.config import GPTConfig
from gptmini.model.lora import FinetuneConfig, is_adapter_key
from gptmini.weights import (
    CheckpointContents,
    SourceWeights,
    check_base_fingerprint,
    crop_positions,
    gptmini_info,
    load_weights,
    read_checkpoint,
    read_contents,
    read_weights,
    resolve_checkpoint,
)


def check_same_finetune(contents: CheckpointContents, finetune: FinetuneConfig) -> None:
    """A resume trains what the checkpoint holds with its own settings: a LoRA checkpoint with LoRA, of the
    same rank, targets and alpha (another alpha rescales what the adapters learnt); dropout may change."""
    lora, path = contents.lora, contents.path
    if (lora is not None) != (finetune.method == "lora"):
        saved = "a LoRA run's (adapters only)" if lora is not None else "a full run's"
        raise GptMiniError(
            f"{path} is {saved} checkpoint, but this run has finetune.method={finetune.method}; resume "
            "with the finetune settings the run was started with."
        )
    if lora is None:
        return
    saved = {"rank": lora.rank, "alpha": lora.alpha, "targets": sorted(lora.targets)}
    asked = {"rank": finetune.rank, "alpha": float(finetune.alpha), "targets": sorted(finetune.targets)}
    for key, value in saved.items():
        if asked[key] != value:
            shown = value if key != "targets" else "[" + ",".join(lora.targets) + "]"
            change = "rescale" if key == "alpha" else "reshape"
            raise GptMiniError(
                f"{path} was trained with finetune.{key}={shown}, this run has finetune.{key}="
                f"{asked[key]}: resuming would {change} what the adapters learnt. Resume with "
                f"finetune.{key}={shown}, or start a new fine-tune (init_from=...)."
            )


def init_source_for(init_from: str | None, ckpt_path: Path | None) -> SourceWeights | None:
    """The weights a run starts from: ``init_from``; or, resuming a LoRA run without it, the base its
    checkpoint names (the checkpoint holds only the adapters). A LoRA run's base must still hold the
    weights its adapters were trained on (the fingerprint its checkpoint recorded)."""
    lora = read_contents(ckpt_path, mmap=True).lora if ckpt_path is not None else None
    spec = init_from or (lora.base if lora is not None else None)
    if spec is None:
        return None
    init = read_weights(spec)  # a fine-tune keeps its tokenizer, or token ids would mean other things
    if lora is not None:
        check_base_fingerprint(lora, init.state, ckpt_path)
    return init


def check_finetune(cfg: Any, finetune: FinetuneConfig) -> None:
    """LoRA needs weights to adapt (``init_from``, or a LoRA resume). ``ckpt_path`` with ``init_from`` is a
    resume of a fine-tune only when the checkpoint's run started from that same ``init_from`` (so the same
    command plus ``ckpt_path=`` resumes it); otherwise it is refused. A resume keeps the finetune settings its
    checkpoint was trained with."""
    if finetune.method == "lora" and not (cfg.init_from or cfg.ckpt_path):
        raise GptMiniError(
            "finetune=lora adapts pretrained weights, but no init_from is set; add init_from=gpt2 (or a "
            "checkpoint, run directory or Hugging Face folder)."
        )
    if cfg.ckpt_path and cfg.init_from:
        try:
            path = resolve_checkpoint(cfg.ckpt_path)
            started_from = gptmini_info(read_checkpoint(path, mmap=True), path).get("init_from")
        except GptMiniError:
            started_from = None
        if started_from is None or started_from != cfg.init_from:
            raise GptMiniError(
                "ckpt_path and init_from are both set: ckpt_path resumes a run (weights, optimizer, step, "
                "data order), init_from starts a new run from weights only. Keep the one you mean (both are "
                "accepted only to resume a fine-tune that started from that same init_from)."
            )
    if cfg.ckpt_path:
        check_same_finetune(read_contents(resolve_checkpoint(cfg.ckpt_path), mmap=True), finetune)


def load_init_weights(model: torch.nn.Module, init: SourceWeights, model_config: GPTConfig) -> None:
    """Put the source's weights into the run's model: the position table cropped to the run's context, and
    a LoRA model's adapters left as they are (B = 0: the model starts exactly at the source)."""
    state = crop_positions(init.state, model_config.block_size)
    own_adapters = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
    load_weights(model, {**state, **own_adapters}, source=init.path)


def finetune_info(init_from: str | None, init: SourceWeights | None, finetune: FinetuneConfig) -> dict:
    """What a run's checkpoints record about where its weights came from: ``init_from`` as typed (so the same
    command plus ``ckpt_path=`` resumes it) and, for LoRA, the adapters' settings and their base."""
    info: dict = {"init_from": init_from} if init_from else {}
    if finetune.method == "lora" and init is not None:
        lora = {"rank": finetune.rank, "alpha": finetune.alpha, "dropout": finetune.dropout}
        base = {"base": init.spec, "base_fingerprint": init.fingerprint}
        info["lora"] = {**lora, "targets": list(finetune.targets), **base}
    return info
