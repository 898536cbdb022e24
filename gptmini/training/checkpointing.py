"""Checkpoints during training: atomic writes, run directories that are never overwritten, and the checks
on what a resume starts from. What a fine-tune starts from (``init_from``, LoRA) is ``training.finetune``."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gptmini.common import GptMiniError, describe_os_error, is_environment_fault, remove_stale_temp_files
from gptmini.model.config import GPTConfig
from gptmini.model.gpt import GPT
from gptmini.model.lora import FinetuneConfig, adapter_state, add_lora
from gptmini.weights import atomic_torch_save, check_state_fits, read_checkpoint, read_contents

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
    return the optimizer step it was written at. A LoRA run's checkpoint is checked against its adapters
    (``check_finetune`` has checked that the run's finetune settings are the checkpoint's)."""
    finetune = finetune or FinetuneConfig()
    contents = read_contents(ckpt_path, mmap=True)  # mapped, not read: Lightning loads it next
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
