"""Self-contained checkpoints: find them, write them atomically, load them safely.

A gptmini checkpoint is a Lightning checkpoint with one extra entry, ``checkpoint["gptmini"]``, holding
everything generation needs besides the weights: the model config and the tokenizer (a trained BPE's ranks
included). So ``generate.py`` needs only the file — no dataset, no Hydra run directory.

``read_source`` also reads what is not a gptmini checkpoint but holds the same model: a Hugging Face GPT-2
(``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` or a local folder; ``gptmini.hf``), and a LoRA
checkpoint, which holds only adapters and names its base: the base is read and the adapters merged in.

Every value in the file is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint someone sent you never runs pickled code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptmini.common import GptMiniError, atomic_file

FORMAT_VERSION = 1
GPTMINI_KEY = "gptmini"
MODEL_PREFIX = "model."  # the LightningModule keeps the GPT as `self.model`
HUB_NAMES = "gpt2, gpt2-medium, gpt2-large, gpt2-xl"  # gptmini.hf.hub.HUB_MODELS, for messages
GPT2_TOKENIZER = {"kind": "tiktoken", "name": "gpt2"}  # every imported GPT-2 speaks GPT-2's tokenizer


# ---------------------------------------------------------------------------------------------------------
# Finding a checkpoint: a .ckpt file, a run directory, or "latest".
# ---------------------------------------------------------------------------------------------------------


def resolve_checkpoint(spec: str | os.PathLike, search_root: str | os.PathLike | None = None) -> Path:
    """Turn what a user typed into a checkpoint file.

    Args:
        spec: a ``.ckpt`` file; a run directory (its ``checkpoints/last.ckpt``); or ``latest``, the newest
            ``last.ckpt`` under ``outputs/`` and ``multirun/`` of ``search_root``.
        search_root: where ``latest`` looks (default: the current directory).
    """
    if str(spec) == "latest":
        return _latest_checkpoint(Path(search_root or Path.cwd()))
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise GptMiniError(
            f"no checkpoint in run directory {path}: expected checkpoints/last.ckpt. "
            "Pass a .ckpt file or the directory of a run that saved one."
        )
    if not path.is_file():
        raise GptMiniError(
            f"checkpoint not found: {path}. Pass a .ckpt file, a run directory, 'latest', a Hugging Face "
            f"folder or a GPT-2 name ({HUB_NAMES})."
        )
    return path


def _latest_checkpoint(root: Path) -> Path:
    folders = (root / "outputs", root / "multirun")
    found = [p for folder in folders for p in folder.glob("**/checkpoints/last.ckpt")]
    if not found:
        raise GptMiniError(
            f"ckpt=latest found no run under {root / 'outputs'} or {root / 'multirun'}. "
            "Train first (python train.py) or pass ckpt=PATH."
        )
    return max(found, key=lambda p: p.stat().st_mtime)


# ---------------------------------------------------------------------------------------------------------
# Writing: always to a temporary file in the same directory, then an atomic rename.
# ---------------------------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a half-written file and never destroys the previous good one."""
    with atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


def gptmini_entry(model_config: Any, tokenizer_spec: dict, **extra: Any) -> dict:
    """The ``checkpoint["gptmini"]`` entry: plain values only (weights_only-safe).

    It records the gptmini version that wrote it, so a reader that meets a setting it does not know can say
    which version would read it.
    """
    from gptmini import __version__

    is_dataclass = dataclasses.is_dataclass(model_config)
    config = dataclasses.asdict(model_config) if is_dataclass else dict(model_config)
    entry = {"format": FORMAT_VERSION, "version": __version__, "model_config": config}
    return {**entry, "tokenizer": dict(tokenizer_spec), **extra}


def gptmini_info(checkpoint: dict, path: Path | str) -> dict:
    """The checkpoint's ``gptmini`` entry, checked: a mapping, of a format this gptmini reads."""
    from gptmini import __version__

    info = checkpoint.get(GPTMINI_KEY)
    if info is None:
        raise GptMiniError(
            f"{path} has no gptmini entry: it was not written by gptmini's train.py. "
            "Retrain, or save one with gptmini.checkpoint.save_model_checkpoint."
        )
    if not isinstance(info, dict):
        raise GptMiniError(
            f"{path}: its gptmini entry is a {type(info).__name__}, not a mapping; the file is damaged or "
            "was not written by gptmini. Use another checkpoint."
        )
    written_by = info.get("version", "0.1.0")
    if not isinstance(info.get("format"), int) or info["format"] > FORMAT_VERSION:
        raise GptMiniError(
            f"{path} has checkpoint format {info.get('format')!r}, newer than this gptmini ({__version__}) "
            f"reads (format {FORMAT_VERSION}); it was written by gptmini {written_by}: upgrade gptmini."
        )
    return info


def model_config_of(info: dict, path: Path | str):
    """The ``GPTConfig`` a checkpoint's gptmini entry describes; an unknown setting is named, not a crash."""
    from gptmini import __version__
    from gptmini.model.config import GPTConfig

    config = info.get("model_config")
    if not isinstance(config, dict):
        raise GptMiniError(
            f"{path} has no gptmini model config: it was not written by gptmini's train.py. "
            "Retrain, or save one with gptmini.checkpoint.save_model_checkpoint."
        )
    known = {field.name for field in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise GptMiniError(
            f"{path} has model setting(s) {', '.join(map(repr, unknown))} that gptmini {__version__} does "
            f"not know; it was written by gptmini {info.get('version', 'unknown')}: read it with that "
            "version or a newer one."
        )
    return GPTConfig(**config)


def save_model_checkpoint(path: str | os.PathLike, model: torch.nn.Module, tokenizer_spec: dict) -> Path:
    """Write a minimal checkpoint (weights, model config, tokenizer) outside of a training run.

    Loads exactly like a training checkpoint; useful for exports, tests and benchmarks.
    """
    state = {MODEL_PREFIX + k: v.detach().cpu() for k, v in _uncompiled(model).state_dict().items()}
    checkpoint = {"state_dict": state, GPTMINI_KEY: gptmini_entry(model.config, tokenizer_spec)}
    atomic_torch_save(checkpoint, path)
    return Path(path)


def _uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module behind ``torch.compile(model)``, whose state_dict keys carry no ``_orig_mod.``."""
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------------------
# Reading: safe unpickling, and an error that says which file and what is wrong with it.
# ---------------------------------------------------------------------------------------------------------


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """``torch.load(weights_only=True)`` with a clear error for a missing, truncated or foreign file.

    ``mmap=True`` maps the tensors instead of reading them: for a look at a large file's contents.
    """
    path = Path(path)
    if not path.is_file():
        raise GptMiniError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for damaged files; all mean "unreadable"
        # torch's own messages run long; the first sentence says what failed.
        reason = str(exc).strip().split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise GptMiniError(
            f"cannot read checkpoint {path} ({size:,} bytes): {reason[:200]}. "
            "The file is truncated, corrupt or not a gptmini checkpoint; use another one "
            "(a run's checkpoints/ folder keeps last.ckpt and the best one)."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise GptMiniError(f"{path} ({size:,} bytes) is not a gptmini checkpoint: it has no model weights.")
    return checkpoint


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The GPT's own weights from a checkpoint (the ``model.`` prefix removed, ``_orig_mod.`` tolerated)."""
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith(MODEL_PREFIX):
            key = key[len(MODEL_PREFIX) :]
            state[key.replace("_orig_mod.", "")] = value
    return state


@dataclass
class LoadedCheckpoint:
    """A model ready for generation, with the tokenizer it was trained with."""

    path: Path
    model: torch.nn.Module
    tokenizer: Any  # tiktoken.Encoding
    info: dict  # the checkpoint's "gptmini" entry (model config, tokenizer spec, run details)
    global_step: int | None


@dataclass
class SourceWeights:
    """Plain ``GPT`` weights from anywhere ``read_source`` reads, with their config and tokenizer."""

    spec: str  # how to name it again from any directory: an absolute path, or a Hub name
    path: Path  # the file the weights came from
    state: dict[str, torch.Tensor]
    model_config: Any  # GPTConfig
    tokenizer_spec: dict
    info: dict  # the gptmini entry (for an imported model: the config, tokenizer and where it came from)
    global_step: int | None = None


def read_source(spec: str | os.PathLike) -> SourceWeights:
    """Read weights to generate from or fine-tune: a gptmini checkpoint, run dir or ``latest``; a LoRA
    checkpoint (merged into its base); or a Hugging Face GPT-2 (a Hub name or a folder)."""
    from gptmini.hf.hub import is_hf_spec

    if is_hf_spec(spec):
        return _read_hf(spec)
    path = resolve_checkpoint(spec)
    checkpoint = read_checkpoint(path, map_location="cpu")
    info = gptmini_info(checkpoint, path)
    config = model_config_of(info, path)
    if not info.get("tokenizer"):
        raise GptMiniError(
            f"{path} has no tokenizer information, so its token ids cannot be turned into text. "
            "Use a checkpoint written by gptmini's train.py."
        )
    state = model_state_dict(checkpoint)
    if info.get("lora"):
        state = _merged_with_base(state, info["lora"], config, path)
    step = checkpoint.get("global_step")
    return SourceWeights(str(path.resolve()), path, state, config, info["tokenizer"], info, step)


def _read_hf(spec: str | os.PathLike) -> SourceWeights:
    """A Hugging Face GPT-2 as gptmini weights (the layout conversion is ``gptmini.hf.convert``)."""
    from gptmini.hf.convert import config_from_hf, read_hf_weights, state_dict_from_hf
    from gptmini.hf.hub import resolve_hf

    files = resolve_hf(spec)
    config = config_from_hf(files.config, files.source)
    state = state_dict_from_hf(read_hf_weights(files.weights), config)
    path = Path(spec).expanduser()
    canonical = str(path.resolve()) if path.exists() else str(spec)
    info = {"model_config": dataclasses.asdict(config), "tokenizer": dict(GPT2_TOKENIZER), "hf": canonical}
    return SourceWeights(canonical, files.weights, state, config, dict(GPT2_TOKENIZER), info)


def _merged_with_base(adapters: dict, lora: dict, config: Any, path: Path) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapters merged into the weights of the base it names."""
    from gptmini.model.lora import merge_adapters

    base_spec = lora.get("base")
    try:
        base = read_source(base_spec)
    except GptMiniError as error:
        raise GptMiniError(
            f"{path} is a LoRA checkpoint that holds only adapters, and its base {base_spec!r} cannot be "
            f"read ({error}). Put the base back at that path (or in the HF cache) to load it."
        ) from None
    state = crop_positions(base.state, config.block_size)
    return merge_adapters({**state, **adapters}, float(lora["alpha"]) / int(lora["rank"]))


def crop_positions(state: dict[str, torch.Tensor], block_size: int) -> dict[str, torch.Tensor]:
    """Weights for a shorter context: the first ``block_size`` rows of the position embedding (as nanoGPT's
    ``crop_block_size``); the other weights do not depend on the context length."""
    wpe = state.get("wpe.weight")
    if wpe is None or wpe.size(0) <= block_size:
        return state
    return {**state, "wpe.weight": wpe[:block_size]}


def load_checkpoint(spec: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load weights (anything ``read_source`` reads) into an eval-mode GPT on ``device``, + tokenizer."""
    from gptmini import GPT
    from gptmini.data.tokenizer import tokenizer_from_spec

    source = read_source(spec)
    tokenizer = tokenizer_from_spec(source.tokenizer_spec)
    model = GPT(source.model_config)
    load_weights(model, source.state, source=source.path)
    model.to(device).eval()
    return LoadedCheckpoint(source.path, model, tokenizer, source.info, source.global_step)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """``load_state_dict`` with a message that lists every missing, unexpected or mis-shaped tensor."""
    check_weights_fit(model, state, source)
    _uncompiled(model).load_state_dict(state)


def check_weights_fit(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Raise a clear error unless ``state`` has exactly the model's tensor names and shapes."""
    check_state_fits(_uncompiled(model).state_dict(), state, source)


def check_state_fits(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: Path | str
) -> None:
    """Raise a clear error unless ``state`` has exactly the names and shapes of ``own``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    found = {"shape mismatch in": mismatched, "missing": missing, "unexpected": unexpected}
    problems = [f"{label} {_first_few(names)}" for label, names in found.items() if names]
    if problems:
        raise GptMiniError(
            f"the weights in {source} do not fit this model: {' | '.join(problems)}. "
            "Use a checkpoint of the same shape (model.n_layer, n_head, n_embd, block_size, vocabulary)."
        )


def _first_few(names: list[str], limit: int = 8) -> str:
    return "; ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
