"""Where weights come from: self-contained checkpoints (found, written atomically, loaded safely), Hugging
Face folders and LoRA adapters merged into their base; `read_weights(spec)` reads any of them.

A gptmini checkpoint is a Lightning checkpoint with one extra entry, ``checkpoint["gptmini"]``, holding
everything generation needs besides the weights: the model config and the tokenizer (a trained BPE's ranks
included). So ``generate.py`` needs only the file — no dataset, no Hydra run directory.

``read_weights`` also reads what is not a gptmini checkpoint but holds the same model: a Hugging Face GPT-2
(``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` or a local folder; ``gptmini.hf``), and a LoRA
checkpoint, which holds only adapters and names its base: the base is read and the adapters merged in.

Every value in the file is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint someone sent you never runs pickled code. What it
holds is then checked in one place, ``checked_contents`` (the entry, the model config, the weights' names,
shapes and values, a LoRA entry), so every reader gets the same one-line answer for a damaged file.

A LoRA checkpoint records a fingerprint of its base's weights (``weights_fingerprint``): a base replaced by
other weights, even of the same shape, is refused instead of silently getting the adapters.
``gptmini rebase ckpt=<LoRA checkpoint> base=<weights>`` points a checkpoint at another
base on purpose (and records that base's fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from gptmini.common import GptMiniError, atomic_file, run_with_arguments, say

FORMAT_VERSION = 1
GPTMINI_KEY = "gptmini"
MODEL_PREFIX = "model."  # the LightningModule keeps the GPT as `self.model`
GPT2_TOKENIZER = {"kind": "tiktoken", "name": "gpt2"}  # every imported GPT-2 speaks GPT-2's tokenizer
# Far past any model gptmini can run, and still small enough that a damaged value fails here, named,
# instead of as an allocation of terabytes (block_size sizes the position table, RoPE's tables and masks).
MODEL_LIMITS = {
    "vocab_size": 1 << 21,
    "block_size": 1 << 20,
    "n_layer": 1024,
    "n_head": 1024,
    "n_embd": 1 << 16,
}
DAMAGED = "the file is damaged or was not written by gptmini; use another checkpoint"
NOT_WRITTEN_BY_GPTMINI = (
    "it was not written by gptmini's train.py. Retrain, or save one with "
    "gptmini.weights.save_model_checkpoint."
)


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
        root = Path(search_root or Path.cwd())
        found = [p for run in ("outputs", "multirun") for p in (root / run).glob("**/checkpoints/last.ckpt")]
        if not found:
            raise GptMiniError(
                f"ckpt=latest found no run under {root / 'outputs'} or {root / 'multirun'}. "
                "Train first (gptmini train) or pass ckpt=PATH."
            )
        return max(found, key=lambda p: p.stat().st_mtime)
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
        from gptmini.hf.hub import HUB_MODELS

        raise GptMiniError(
            f"checkpoint not found: {path}. Pass a .ckpt file, a run directory, 'latest', a Hugging Face "
            f"folder or a GPT-2 name ({', '.join(HUB_MODELS)})."
        )
    return path


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
        raise GptMiniError(f"{path} has no gptmini entry: {NOT_WRITTEN_BY_GPTMINI}")
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
        raise GptMiniError(f"{path} has no gptmini model config: {NOT_WRITTEN_BY_GPTMINI}")
    known = {field.name for field in dataclasses.fields(GPTConfig)} | {"attention"}  # old: GPTConfig drops it
    unknown = sorted(set(config) - known, key=str)
    if unknown:
        raise GptMiniError(
            f"{path} has model setting(s) {', '.join(map(repr, unknown))} that gptmini {__version__} does "
            f"not know; it was written by gptmini {info.get('version', 'unknown')}: read it with that "
            "version or a newer one."
        )
    try:
        model_config = GPTConfig(**config)
    except (GptMiniError, TypeError, ValueError) as error:
        raise GptMiniError(
            f"{path}: its model config is damaged ({error}); use another checkpoint."
        ) from None
    check_model_limits(model_config, f"{path}: its model config has")
    return model_config


def check_model_limits(config: Any, where: str, names: Mapping[str, str] | None = None) -> None:
    """Refuse a model size past ``MODEL_LIMITS`` (a damaged file), before anything is allocated for it.

    ``where`` starts the message; ``names`` maps GPTConfig's field names to the ones the file uses.
    """
    for field, limit in MODEL_LIMITS.items():
        value = getattr(config, field)
        if value > limit:
            name = (names or {}).get(field, field)
            raise GptMiniError(
                f"{where} {name}={value:,}, far past any model gptmini runs (at most {limit:,}); the file "
                "is damaged: use another copy."
            )


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


@dataclass
class LoraEntry:
    """A LoRA checkpoint's ``lora`` entry, checked: the adapters' settings and the base they apply to."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    base: str  # an absolute path or a Hub name
    base_fingerprint: str | None  # None: written before fingerprints were recorded


@dataclass
class CheckpointContents:
    """Everything a gptmini checkpoint holds that a reader uses, each part checked."""

    path: Path
    info: dict  # the gptmini entry
    config: Any  # GPTConfig
    tokenizer_spec: dict
    state: dict[str, torch.Tensor]  # the GPT's weights (a LoRA checkpoint's: its adapters alone)
    lora: LoraEntry | None
    global_step: int | None


def read_contents(path: str | os.PathLike, mmap: bool = False) -> CheckpointContents:
    """Read a gptmini checkpoint file and check what it holds (``checked_contents``)."""
    return checked_contents(read_checkpoint(path, map_location="cpu", mmap=mmap), Path(path))


def checked_contents(checkpoint: dict, path: Path) -> CheckpointContents:
    """The one check of what a gptmini checkpoint holds (the parts the module docstring lists); a damaged
    part is one line naming the file. Shapes are compared on the meta device: a damaged size allocates
    nothing."""
    info = gptmini_info(checkpoint, path)
    config = model_config_of(info, path)
    spec = info.get("tokenizer")
    if not spec or not isinstance(spec, dict):
        raise GptMiniError(
            f"{path} has no tokenizer information, so its token ids cannot be turned into text. "
            "Use a checkpoint written by gptmini's train.py."
        )
    if not isinstance(checkpoint["state_dict"], Mapping):
        kind = type(checkpoint["state_dict"]).__name__
        raise GptMiniError(f"{path}: its state_dict is a {kind}, not a mapping of tensors; {DAMAGED}.")
    state = {  # the GPT's own weights: the ``model.`` prefix removed, torch.compile's ``_orig_mod.`` too
        key.removeprefix(MODEL_PREFIX).replace("_orig_mod.", ""): value
        for key, value in checkpoint["state_dict"].items()
        if isinstance(key, str) and key.startswith(MODEL_PREFIX)
    }
    lora = _lora_entry(info.get("lora"), path)
    try:
        expected = expected_state(config, lora)
    except GptMiniError as error:  # a LoRA entry its model cannot have (a rank past the layers' width)
        raise GptMiniError(f"{path}: its LoRA entry does not fit its model ({error}); {DAMAGED}.") from None
    check_weights(state, expected, path)
    step = checkpoint.get("global_step")
    return CheckpointContents(path, info, config, spec, state, lora, step if _is_int(step) else None)


def _lora_entry(lora: Any, path: Path) -> LoraEntry | None:
    """The checked LoRA entry (None for a full checkpoint)."""
    from gptmini.model.lora import TARGETS

    if not lora:
        return None
    if not isinstance(lora, dict):
        raise GptMiniError(f"{path}: its LoRA entry is a {type(lora).__name__}, not a mapping; {DAMAGED}.")
    rank, alpha, dropout = lora.get("rank"), lora.get("alpha"), lora.get("dropout", 0.0)
    targets, base = lora.get("targets", list(TARGETS)), lora.get("base")
    fingerprint = lora.get("base_fingerprint")
    problems = [
        (not _is_int(rank) or rank < 1, f"rank={rank!r} (an integer >= 1)"),
        (not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0, f"alpha={alpha!r} (a number > 0)"),
        (not _is_number(dropout) or not 0 <= dropout < 1, f"dropout={dropout!r} (in [0, 1))"),
        (
            not isinstance(targets, list) or not targets or not all(t in TARGETS for t in targets),
            f"targets={targets!r} (a list of {', '.join(TARGETS)})",
        ),
        (not isinstance(base, str) or not base, f"base={base!r} (the path or Hub name of its base)"),
        (fingerprint is not None and not isinstance(fingerprint, str), f"base_fingerprint={fingerprint!r}"),
    ]
    for bad, what in problems:
        if bad:
            raise GptMiniError(f"{path}: its LoRA entry has {what}; {DAMAGED}.")
    if Path(base).expanduser().resolve() == path.resolve():
        raise GptMiniError(
            f"{path} is a LoRA checkpoint that names itself as its base; {DAMAGED} (or point it at its "
            f"real base: gptmini rebase ckpt={path} base=<the base>)."
        )
    return LoraEntry(rank, float(alpha), float(dropout), list(targets), base, fingerprint)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expected_state(config: Any, lora: LoraEntry | None = None) -> dict[str, torch.Tensor]:
    """The names and shapes of the weights a checkpoint of ``config`` holds, as meta tensors (no memory):
    the GPT's own state dict, or for a LoRA checkpoint its adapters alone."""
    from gptmini import GPT
    from gptmini.model.lora import FinetuneConfig, adapter_state, add_lora

    with torch.device("meta"):
        model = GPT(config)
        if lora is None:
            return model.state_dict()
        add_lora(model, FinetuneConfig(method="lora", rank=lora.rank, alpha=lora.alpha, targets=lora.targets))
        return adapter_state(model.state_dict())


def check_weights(state: Mapping, expected: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Refuse weights that are not what a model needs: other names or shapes than ``expected``, a value
    that is no tensor, a tensor that is not floating point, or one holding NaN or infinity."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            what = f"a {type(value).__name__}" if isinstance(key, str) else f"the non-string key {key!r}"
            raise GptMiniError(f"{source}: its weights hold {what} under {key!r}, not a tensor; {DAMAGED}.")
    problems = _misfits(expected, state)
    if problems:
        raise GptMiniError(
            f"the weights in {source} do not fit the model its config describes: {problems}; the file is "
            "damaged or its config belongs to another model: use another copy."
        )
    for key in sorted(state):
        tensor = state[key]
        if not tensor.is_floating_point():
            raise GptMiniError(
                f"{source}: the weight {key} is {str(tensor.dtype).removeprefix('torch.')}, not floating "
                f"point; {DAMAGED}."
            )
        # A NaN or infinity anywhere makes the sum non-finite: a fast screen (10x quicker than isfinite on
        # a CPU); the exact test runs only when it fires, in case finite values overflowed the sum.
        if not torch.isfinite(tensor.sum()) and not bool(torch.isfinite(tensor).all()):
            raise GptMiniError(
                f"{source}: the weight {key} holds NaN or infinite values (a damaged file, or weights saved "
                "after training diverged); use another checkpoint."
            )


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A sha256 over every tensor's name, dtype, shape and bytes, in name order: equal for the same weights
    however they were stored (safetensors, .bin, a gptmini checkpoint), different for any other weights.

    What a LoRA checkpoint records of its base. sha256 runs at ~1 GB/s: 0.7 s for GPT-2 small (650 MB with
    the tied head counted twice), measured on a 2-core CPU.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(state[key].shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def check_base_fingerprint(lora: LoraEntry, base_state: Mapping[str, torch.Tensor], path: Path | str) -> None:
    """Refuse a base that holds other weights than the ones the adapters were trained on.

    A checkpoint written before fingerprints were recorded is read with a warning: its base cannot be
    checked, and ``rebase`` records one.
    """
    rebase = f"gptmini rebase ckpt={path} base=<its base>"
    if lora.base_fingerprint is None:
        warnings.warn(
            f"{path} records no fingerprint of its LoRA base {lora.base} (an older gptmini wrote it), so "
            f"whether that base still holds the weights the adapters were trained on is not checked; "
            f"{rebase} records it.",
            stacklevel=2,
        )
        return
    found = weights_fingerprint(base_state)
    if found != lora.base_fingerprint:
        raise GptMiniError(
            f"{path} is a LoRA checkpoint whose base {lora.base} now holds other weights than the adapters "
            f"were trained on (fingerprint {found[7:19]}, recorded {lora.base_fingerprint[7:19]}): put the "
            f"original base back there, or, to apply the adapters to other weights on purpose, run {rebase}."
        )


class BaseCycleError(GptMiniError):
    """LoRA checkpoints whose bases lead back to one of them: no plain weights to merge into."""


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
    """Plain ``GPT`` weights from anywhere ``read_weights`` reads, with their config and tokenizer."""

    spec: str  # how to name it again from any directory: an absolute path, or a Hub name
    path: Path  # the file the weights came from
    state: dict[str, torch.Tensor]
    model_config: Any  # GPTConfig
    tokenizer_spec: dict
    info: dict  # the gptmini entry (for an imported model: the config, tokenizer and where it came from)
    global_step: int | None = None
    # Every file or folder these weights were read from (a LoRA checkpoint's base included): what an
    # export must never be written over.
    depends_on: tuple[Path, ...] = ()

    @cached_property
    def fingerprint(self) -> str:
        return weights_fingerprint(self.state)


def read_weights(spec: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> SourceWeights:
    """Read weights to generate from or fine-tune: a gptmini checkpoint, run dir or ``latest``; a LoRA
    checkpoint (merged into its base); or a Hugging Face GPT-2 (a Hub name or a folder).

    ``_chain``: the LoRA checkpoints whose bases are being read (to name a cycle instead of recursing).
    """
    from gptmini.hf.hub import is_hf_spec

    if is_hf_spec(spec):
        return _read_hf(spec)
    path = resolve_checkpoint(spec)
    if path.resolve() in _chain:
        names = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise BaseCycleError(
            f"the LoRA checkpoints' bases form a cycle ({names}): each must end at plain weights; point "
            "one at its real base with gptmini rebase ckpt=<it> base=<the base>."
        )
    contents = checked_contents(read_checkpoint(path, map_location="cpu"), path)
    state, depends_on = contents.state, (path.resolve(),)
    if contents.lora is not None:
        base = _read_base(contents, (*_chain, path.resolve()))
        state = merge_into_base(contents, base)
        depends_on += base.depends_on
    config, spec = contents.config, contents.tokenizer_spec
    step = contents.global_step
    return SourceWeights(str(path.resolve()), path, state, config, spec, contents.info, step, depends_on)


def _read_base(contents: CheckpointContents, chain: tuple[Path, ...]) -> SourceWeights:
    """The base a LoRA checkpoint names, read (a missing one is one line) and checked by its fingerprint."""
    lora = contents.lora
    try:
        base = read_weights(lora.base, chain)
    except BaseCycleError:
        raise  # already names every checkpoint of the cycle
    except GptMiniError as error:
        raise GptMiniError(
            f"{contents.path} is a LoRA checkpoint that holds only adapters, and its base {lora.base!r} "
            f"cannot be read ({error}). Put the base back at that path (or in the HF cache) to load it."
        ) from None
    check_base_fingerprint(lora, base.state, contents.path)
    return base


def merge_into_base(contents: CheckpointContents, base: SourceWeights) -> dict[str, torch.Tensor]:
    """Plain weights: a LoRA checkpoint's adapters merged into its base."""
    from gptmini.model.lora import merge_adapters

    lora = contents.lora
    return merge_adapters({**_fitted_base(contents, base), **contents.state}, lora.alpha / lora.rank)


def _fitted_base(contents: CheckpointContents, base: SourceWeights) -> dict[str, torch.Tensor]:
    """The base's weights cropped to the adapters' context and checked to fit their model: a base of
    another shape is named, not a matmul error."""
    state = crop_positions(base.state, contents.config.block_size)
    check_weights(state, expected_state(contents.config), base.path)
    return state


def _read_hf(spec: str | os.PathLike) -> SourceWeights:
    """A Hugging Face GPT-2 as gptmini weights (the layout conversion is ``gptmini.hf.convert``), read with
    the folder's own tokenizer.json when it has one (gptmini's exports do), else GPT-2's."""
    from gptmini.hf.convert import HF_NAMES, config_from_hf, read_hf_weights, state_dict_from_hf
    from gptmini.hf.hub import resolve_hf
    from gptmini.hf.tokenizer_import import hf_tokenizer_spec

    files = resolve_hf(spec)
    config = config_from_hf(files.config, files.source)
    check_model_limits(config, f"{files.source}: config.json has", HF_NAMES)
    tokenizer, n_vocab = hf_tokenizer_spec(files.folder)
    if config.vocab_size < n_vocab:
        raise GptMiniError(
            f"{files.source}: config.json has vocab_size={config.vocab_size}, fewer than its tokenizer's "
            f"{n_vocab} tokens, so some token ids would have no embedding; save the model and its "
            "tokenizer together (or fix vocab_size)."
        )
    state = state_dict_from_hf(read_hf_weights(files.weights), config)
    check_weights(state, expected_state(config), files.weights)
    path = Path(spec).expanduser()
    canonical = str(path.resolve()) if path.exists() else str(spec)
    info = {"model_config": dataclasses.asdict(config), "tokenizer": dict(tokenizer), "hf": canonical}
    folder = (files.folder or files.weights.parent).resolve()
    return SourceWeights(canonical, files.weights, state, config, dict(tokenizer), info, depends_on=(folder,))


def crop_positions(state: dict[str, torch.Tensor], block_size: int) -> dict[str, torch.Tensor]:
    """Weights for a shorter context: the first ``block_size`` rows of the position embedding (as nanoGPT's
    ``crop_block_size``); the other weights do not depend on the context length."""
    wpe = state.get("wpe.weight")
    if wpe is None or wpe.size(0) <= block_size:
        return state
    return {**state, "wpe.weight": wpe[:block_size]}


def load_checkpoint(spec: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load weights (anything ``read_weights`` reads) into an eval-mode GPT on ``device``, + tokenizer."""
    from gptmini import GPT
    from gptmini.data.tokenizer import tokenizer_from_spec

    source = read_weights(spec)
    tokenizer = tokenizer_from_spec(source.tokenizer_spec)
    model = GPT(source.model_config)
    load_weights(model, source.state, source=source.path)
    model.to(device).eval()
    return LoadedCheckpoint(source.path, model, tokenizer, source.info, source.global_step)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """``load_state_dict`` with a message that lists every missing, unexpected or mis-shaped tensor."""
    check_state_fits(_uncompiled(model).state_dict(), state, source)
    _uncompiled(model).load_state_dict(state)


def check_state_fits(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: Path | str
) -> None:
    """Raise a clear error unless ``state`` has exactly the names and shapes of ``own``."""
    problems = _misfits(own, state)
    if problems:
        raise GptMiniError(
            f"the weights in {source} do not fit this model: {problems}. "
            "Use a checkpoint of the same shape (model.n_layer, n_head, n_embd, block_size, vocabulary)."
        )


def _misfits(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """The missing, unexpected and mis-shaped names of ``state`` against ``own``, in one line ("" if none)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    found = {"shape mismatch in": mismatched, "missing": missing, "unexpected": unexpected}
    return " | ".join(f"{label} {_first_few(names)}" for label, names in found.items() if names)


def _first_few(names: list[str], limit: int = 8) -> str:
    return "; ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------------
# Re-basing a LoRA checkpoint on purpose: gptmini rebase ckpt=... base=...
# ---------------------------------------------------------------------------------------------------------


def rebase_lora(ckpt: str | os.PathLike, base: str | os.PathLike) -> tuple[Path, bool]:
    """Point a LoRA checkpoint at ``base`` and record that base's fingerprint; the adapters and the rest of
    the file are kept (rewritten atomically). Returns (the file, whether ``base`` holds the very weights the
    adapters were trained on). A base of another shape or tokenizer is refused."""
    path = resolve_checkpoint(ckpt)
    checkpoint = read_checkpoint(path)
    contents = checked_contents(checkpoint, path)
    if contents.lora is None:
        raise GptMiniError(f"{path} is not a LoRA checkpoint: it holds all its weights and names no base.")
    source = read_weights(base, _chain=(path.resolve(),))
    if source.tokenizer_spec != contents.tokenizer_spec:
        raise GptMiniError(
            f"{source.spec} has another tokenizer than the one {path}'s adapters were trained with: its "
            "token ids mean other things. Rebase onto weights with the same tokenizer."
        )
    _fitted_base(contents, source)
    same = source.fingerprint == contents.lora.base_fingerprint
    lora = {**contents.info["lora"], "base": source.spec, "base_fingerprint": source.fingerprint}
    checkpoint[GPTMINI_KEY] = {**contents.info, "lora": lora}
    atomic_torch_save(checkpoint, path)
    return path, same


def main(argv: list[str] | None = None) -> int:
    """``gptmini rebase ...`` and ``python -m gptmini.weights rebase ...`` (there the word ``rebase`` comes
    first): returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    return run_with_arguments(rebase_command, args[1:] if args[:1] == ["rebase"] else args)


REBASE_USAGE = "usage: gptmini rebase ckpt=<LoRA checkpoint> base=<weights>"


def rebase_command(argv: list[str]) -> None:
    """usage: gptmini rebase ckpt=<LoRA checkpoint> base=<weights>

    Point a LoRA checkpoint at another base on purpose, and record that base's fingerprint. A LoRA
    checkpoint holds only adapters and names its base; a base replaced by other weights is refused when the
    checkpoint loads, until it is re-based here.

      ckpt=  the LoRA checkpoint (.ckpt file or run directory), rewritten in place
      base=  the weights the adapters now apply to: a checkpoint, a Hugging Face folder, or gpt2...
    """
    values = dict(arg.partition("=")[::2] for arg in argv)
    if set(values) != {"ckpt", "base"} or not all(values.values()) or len(argv) != 2:
        raise GptMiniError(REBASE_USAGE)
    path, same = rebase_lora(values["ckpt"], values["base"])
    what = "the weights it was trained on" if same else "other weights than it was trained on: re-based"
    say(f"{path} now names the base {values['base']} ({what}).")


if __name__ == "__main__":
    sys.exit(main())
