"""Finding a Hugging Face GPT-2 on disk: a Hub name through the standard HF cache, or a local folder.

``ckpt=gpt2`` (and gpt2-medium, gpt2-large, gpt2-xl) downloads config.json and model.safetensors once with
``huggingface_hub``; they stay in the HF cache (``HF_HOME``), and ``HF_HUB_OFFLINE=1`` uses only that cache.
Without a network (the Hub's host name does not resolve) the cache is used at once, as with
``HF_HUB_OFFLINE``, instead of after huggingface_hub's ~25 s of retries.
A local folder holds config.json plus model.safetensors or pytorch_model.bin, or the index of their shards
(``save_pretrained(max_shard_size=...)``). What is missing is one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from gptmini.common import GptMiniError

# The names a user types, and the Hub repositories OpenAI's weights live in today.
HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"  # a sharded save: model.safetensors.index.json maps each tensor to its shard
# The weights files of a folder, in the order they are looked for: whole files first, then shard indexes.
WEIGHTS_FILES = (SAFETENSORS_FILE, TORCH_FILE, SAFETENSORS_FILE + INDEX_SUFFIX, TORCH_FILE + INDEX_SUFFIX)
INSTALL_HINT = 'pip install -e ".[hf]"'


@dataclass
class HFFiles:
    """A Hugging Face model on local disk: where it came from, its config and its weights file."""

    source: str  # what the user typed: a Hub name or a folder
    config: dict
    weights: Path  # a weights file, or the index of a sharded save
    folder: Path | None = None  # a local folder (where its tokenizer.json is looked for); None for the Hub


def is_hf_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a Hugging Face GPT-2: one of ``HUB_MODELS``, or a folder with config.json.

    An existing path wins over a Hub name, so a folder called ``gpt2`` in the current directory is read.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path.is_dir() and any((path / name).is_file() for name in (CONFIG_FILE, *WEIGHTS_FILES))
    return str(spec) in HUB_MODELS


def resolve_hf(spec: str | os.PathLike) -> HFFiles:
    """The config and weights file of a Hub name or a local folder (see ``is_hf_spec``)."""
    path = Path(spec).expanduser()
    return _local_folder(path) if path.exists() else _from_hub(str(spec))


def _local_folder(folder: Path) -> HFFiles:
    if not (folder / CONFIG_FILE).is_file():
        raise GptMiniError(
            f"the Hugging Face folder {folder} has no {CONFIG_FILE}, so the model's shape is unknown; "
            "save the model there with save_pretrained(folder), which writes both files."
        )
    config = _read_config(folder / CONFIG_FILE)
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return HFFiles(str(folder), config, folder / name, folder)
    raise GptMiniError(
        f"the Hugging Face folder {folder} has no weights: expected {SAFETENSORS_FILE} or {TORCH_FILE} "
        f"(or a sharded save's {SAFETENSORS_FILE}{INDEX_SUFFIX}) beside {CONFIG_FILE}. Save the model "
        "there with save_pretrained(folder)."
    )


def shard_files(index: Path) -> list[Path]:
    """The shard files a sharded save's index names (its ``weight_map`` values), each inside its folder."""
    data = _read_config(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise GptMiniError(f"{index} has no weight_map of tensors to shards; save the model again.")
    names = sorted(set(weight_map.values()), key=str)
    for name in names:
        # A shard is a plain file name beside the index: never a path that leads out of the folder.
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise GptMiniError(
                f"{index} names the shard {name!r}, which is not a file name; save the model again."
            )
        if not (index.parent / name).is_file():
            raise GptMiniError(
                f"{index} names the shard {name}, which is missing from {index.parent}; copy the whole "
                "folder again."
            )
    return [index.parent / name for name in names]


def _read_config(path: Path) -> dict:
    """A JSON object file of a model folder (config.json, a shard index)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GptMiniError(
            f"cannot read {path}: {type(exc).__name__}; it must be a JSON object, as save_pretrained writes."
        ) from None
    if not isinstance(config, dict):
        raise GptMiniError(f"{path} is not a JSON object; save the model with save_pretrained.")
    return config


def _from_hub(name: str) -> HFFiles:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise GptMiniError(
            f"ckpt={name} downloads from the Hugging Face Hub and needs huggingface_hub: {INSTALL_HINT}"
        ) from None
    repo = HUB_MODELS[name]
    files = [_download(hf_hub_download, repo, name, filename) for filename in (CONFIG_FILE, SAFETENSORS_FILE)]
    return HFFiles(name, _read_config(files[0]), files[1])


def _download(hf_hub_download, repo: str, name: str, filename: str) -> Path:
    """One file through the HF cache (without a network, the cache alone: see the module docstring); any
    failure (offline, no network, no such file) is one line."""
    from huggingface_hub import constants  # HF_HUB_OFFLINE as huggingface_hub read it

    from gptmini.data.hf_source import _hub_reachable

    no_network = not constants.HF_HUB_OFFLINE and not _hub_reachable()
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=no_network))
    except Exception as exc:  # noqa: BLE001 - offline, network, HTTP and cache errors all mean "not available"
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set and it is not in the cache"
        elif no_network:
            why = "no network: the Hub cannot be reached, and it is not in the cache"
        else:
            why = type(exc).__name__
        cache = constants.HF_HUB_CACHE
        raise GptMiniError(
            f"{name}: cannot get {filename} of {repo} ({why}; cache {cache}). Connect once to download it, "
            "set HF_HOME to a cache that holds it, or pass a local folder (ckpt=/path/to/folder with "
            "config.json and model.safetensors)."
        ) from None
