"""Checkpoints during training: atomic writes, what a resume or a fine-tune may start from, and run dirs.

- ``AtomicCheckpointIO``: Lightning writes every checkpoint through ``gptmini.checkpoint.atomic_torch_save``
  and reads it with ``weights_only=True``; a full disk or a read-only folder is one line that says the
  previous checkpoint is intact.
- ``check_run_directory``: a run never writes over another run's checkpoints. A resumed run may continue in
  its own directory; there, ``last.ckpt`` is overwritten in place (ModelCheckpoint's version counter is off
  in configs/callbacks), so the newest step is always ``last.ckpt``.
- ``check_resumable`` and ``read_init_source``: the checks for ``ckpt_path`` and ``init_from``. ``init_from``
  reads anything ``gptmini.checkpoint.read_source`` reads: a gptmini checkpoint, a Hugging Face GPT-2 (a
  Hub name or a folder) or a LoRA checkpoint (merged into its base).
- ``finetune_from`` and ``load_init_weights``: full fine-tuning or LoRA (``gptmini.model.lora``). A LoRA
  run's checkpoints hold only the adapters, name their base and record its fingerprint, so a resume reads
  the base again and refuses one that now holds other weights; it also refuses other finetune settings
  than the run's (another ``finetune.alpha`` would rescale what the adapters learnt).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import tiktoken
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gptmini.checkpoint import (
    CheckpointContents,
    atomic_torch_save,
    check_base_fingerprint,
    check_state_fits,
    crop_positions,
    gptmini_info,
    load_weights,
    read_checkpoint,
    read_contents,
    read_source,
    resolve_checkpoint,
    weights_fingerprint,
)
from gptmini.common import (
    GptMiniError,
    as_config,
    describe_os_error,
    is_environment_fault,
    remove_stale_temp_files,
)
from gptmini.data.tokenizer import tokenizer_from_spec
from gptmini.model.config import GPTConfig
from gptmini.model.gpt import GPT
from gptmini.model.lora import FinetuneConfig, adapter_state, add_lora, is_adapter_key

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, writing through a temporary file and reading with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as error:
            if not is_environment_fault(error):
                raise
            kept = sorted(p.name for p in path.parent.glob("*.ckpt"))
            kept = (
                f"the checkpoints already there ({', '.join(kept)}) are intact" if kept else "none was saved"
            )
            raise GptMiniError(
                f"{describe_os_error(error, f'checkpoint {path}')}; {kept}. Free space (or fix the "
                "permissions) and resume with ckpt_path=<this run directory>."
            ) from None

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path, map_location=map_location or "cpu")


class LastSavedStep(L.Callback):
    """Remembers the step of the newest checkpoint written, so train() can tell whether one is missing."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.step = trainer.global_step


def check_run_directory(run_dir: Path, resume_from: Path | None) -> None:
    """Refuse to start a run whose directory holds another run's checkpoint; clean killed writes' leftovers.

    Continuing in the same directory is allowed only when resuming from that directory's own checkpoint.
    """
    ckpt_dir = run_dir / "checkpoints"
    remove_stale_temp_files(ckpt_dir)  # a kill -9 during a save leaves a .tmp beside the real file
    last = ckpt_dir / LAST
    if not last.is_file():
        return
    if resume_from is not None and resume_from.resolve().parent == ckpt_dir.resolve():
        return
    raise GptMiniError(
        f"the run directory {run_dir} already holds a checkpoint ({last}); a new run there would overwrite "
        f"it. Continue that run with ckpt_path={run_dir}, or start this one in another directory "
        "(hydra.run.dir=...)."
    )


def check_resumable(
    ckpt_path: Path, model_config: GPTConfig, tokenizer_spec: dict, finetune: FinetuneConfig | None = None
) -> int:
    """Fail before training starts if the checkpoint is unreadable, of another shape or another tokenizer;
    return the optimizer step it was written at. A LoRA run's checkpoint is checked against its adapters."""
    finetune = finetune or FinetuneConfig()
    contents = read_contents(ckpt_path, mmap=True)  # mapped, not read: Lightning loads it next
    check_same_finetune(contents, finetune)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = GPT(model_config)
        if contents.lora is not None:
            add_lora(model, finetune)
    own = model.state_dict()
    check_state_fits(adapter_state(own) if contents.lora else own, contents.state, ckpt_path)
    saved_spec = contents.tokenizer_spec
    if saved_spec != tokenizer_spec:
        raise GptMiniError(
            f"{ckpt_path} was trained with another tokenizer than this run's "
            f"({saved_spec.get('name')!r} vs {tokenizer_spec.get('name')!r}, or the same kind trained on "
            "other text): its token ids would mean other things. Resume with the run's data and tokenizer "
            "settings."
        )
    return contents.global_step or 0


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


@dataclass
class InitSource:
    """The weights a fine-tune starts from: their model config and tokenizer, and how to name them again."""

    path: Path
    state: dict[str, torch.Tensor]
    model_config: GPTConfig
    tokenizer: tiktoken.Encoding
    spec: str = ""  # an absolute path or a Hub name: what a LoRA checkpoint records as its base

    @cached_property
    def fingerprint(self) -> str:
        """What a LoRA checkpoint records of its base (``gptmini.checkpoint.weights_fingerprint``)."""
        return weights_fingerprint(self.state)


def read_init_source(spec: str) -> InitSource:
    """Read ``init_from``: a fine-tune keeps the source's tokenizer, or its token ids would mean other
    things to the weights."""
    source = read_source(spec)
    return InitSource(
        source.path,
        source.state,
        source.model_config,
        tokenizer_from_spec(source.tokenizer_spec),
        source.spec,
    )


def init_source_for(init_from: str | None, ckpt_path: Path | None) -> InitSource | None:
    """The weights a run starts from: ``init_from``; or, resuming a LoRA run without it, the base its
    checkpoint names (the checkpoint holds only the adapters). A LoRA run's base must still hold the
    weights its adapters were trained on (the fingerprint its checkpoint recorded)."""
    lora = read_contents(ckpt_path, mmap=True).lora if ckpt_path is not None else None
    spec = init_from or (lora.base if lora is not None else None)
    if spec is None:
        return None
    init = read_init_source(spec)
    if lora is not None:
        check_base_fingerprint(lora, init.state, ckpt_path)
    return init


def _entry(ckpt_path: Path) -> dict:
    return gptmini_info(read_checkpoint(ckpt_path, mmap=True), ckpt_path)


def check_init_with_resume(ckpt_path: str, init_from: str) -> None:
    """``ckpt_path`` with ``init_from`` is a resume of a fine-tune only when the checkpoint's run started from
    that same ``init_from`` (so the same command plus ``ckpt_path=`` resumes it); otherwise it is refused."""
    try:
        started_from = _entry(resolve_checkpoint(ckpt_path)).get("init_from")
    except GptMiniError:
        started_from = None
    if started_from is None or started_from != init_from:
        raise GptMiniError(
            "ckpt_path and init_from are both set: ckpt_path resumes a run (weights, optimizer, step, data "
            "order), init_from starts a new run from weights only. Keep the one you mean (both are accepted "
            "only to resume a fine-tune that started from that same init_from)."
        )


def finetune_from(cfg: Any) -> FinetuneConfig:
    """The checked ``finetune`` settings; LoRA needs weights to adapt (``init_from``, or a LoRA resume), and
    a resume keeps the settings its checkpoint was trained with (checked here, before any data is read)."""
    node = cfg.get("finetune") if hasattr(cfg, "get") else None
    finetune = as_config(node if node is not None else {}, FinetuneConfig, "finetune")
    if finetune.method == "lora" and not (cfg.init_from or cfg.ckpt_path):
        raise GptMiniError(
            "finetune=lora adapts pretrained weights, but no init_from is set; add init_from=gpt2 (or a "
            "checkpoint, run directory or Hugging Face folder)."
        )
    if cfg.ckpt_path:
        check_same_finetune(read_contents(resolve_checkpoint(cfg.ckpt_path), mmap=True), finetune)
    return finetune


def load_init_weights(model: torch.nn.Module, init: InitSource, model_config: GPTConfig) -> None:
    """Put the source's weights into the run's model: the position table cropped to the run's context, and
    a LoRA model's adapters left as they are (B = 0: the model starts exactly at the source)."""
    state = crop_positions(init.state, model_config.block_size)
    own_adapters = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
    load_weights(model, {**state, **own_adapters}, source=init.path)


def finetune_info(init_from: str | None, init: InitSource | None, finetune: FinetuneConfig) -> dict:
    """What a run's checkpoints record about where its weights came from: ``init_from`` as typed (so the same
    command plus ``ckpt_path=`` resumes it) and, for LoRA, the adapters' settings and their base."""
    info: dict = {"init_from": init_from} if init_from else {}
    if finetune.method == "lora" and init is not None:
        lora = {"rank": finetune.rank, "alpha": finetune.alpha, "dropout": finetune.dropout}
        base = {"base": init.spec, "base_fingerprint": init.fingerprint}
        info["lora"] = {**lora, "targets": list(finetune.targets), **base}
    return info
