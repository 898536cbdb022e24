"""Export to the Hugging Face format: ``python -m gptmini.export ckpt=<file | run dir | latest> out=DIR``.

Writes a GPT-2 folder that ``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load: config.json, generation_config.json, model.safetensors, and the
tokenizer (tokenizer.json and its configs; with GPT-2's own tokenizer also vocab.json and merges.txt).
A LoRA checkpoint is exported merged into its base. Everything is checked before anything is written, and
every file is written atomically; a model GPT-2's format cannot express exactly is refused, naming the option.

Arguments are Hydra-style ``key=value`` (like generate.py): ``ckpt`` (default ``latest``) and ``out``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from gptmini.common import GptMiniError, atomic_write_bytes, atomic_write_text, user_error_message

WEIGHTS_FILE = "model.safetensors"


@dataclass
class ExportConfig:
    """Options of ``python -m gptmini.export``."""

    ckpt: str = "latest"
    """A .ckpt file, a run directory, ``latest``, or anything generate.py's ckpt= takes."""
    out: str = ""
    """The folder to write the Hugging Face model into (created if missing; our files in it are replaced)."""

    def __post_init__(self) -> None:
        if not self.out:
            raise GptMiniError(
                "out= is required: the folder to write the Hugging Face model into (out=hf_model)."
            )


def export(ckpt: str, out: str | Path) -> Path:
    """Write the Hugging Face GPT-2 folder for ``ckpt`` into ``out``; return the folder."""
    from safetensors.torch import save as safetensors_bytes

    from gptmini.checkpoint import read_source
    from gptmini.data.tokenizer import tokenizer_from_spec
    from gptmini.hf.convert import check_exportable, hf_config_from, state_dict_to_hf
    from gptmini.hf.tokenizer_export import tokenizer_files, write_tokenizer_files

    source = read_source(ckpt)
    config = source.model_config
    check_exportable(config)
    enc = tokenizer_from_spec(source.tokenizer_spec)
    if enc.n_vocab != config.vocab_size:
        raise GptMiniError(
            f"{source.path}: the model predicts {config.vocab_size} tokens, its tokenizer has {enc.n_vocab}; "
            "an exported model and tokenizer would disagree, so it is not exported."
        )
    # Everything that can refuse runs before the first file is written.
    tokenizer = tokenizer_files(enc, model_max_length=config.block_size)
    weights = safetensors_bytes(state_dict_to_hf(source.state, config), metadata={"format": "pt"})
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise GptMiniError(f"out={folder} is a file; pass a folder to write the Hugging Face model into.")
    eot = enc.eot_token
    generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    atomic_write_bytes(folder / WEIGHTS_FILE, weights)
    atomic_write_text(folder / "config.json", json.dumps(hf_config_from(config, eot), indent=2) + "\n")
    atomic_write_text(folder / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(tokenizer, folder)
    return folder


def parse_args(argv: list[str]) -> ExportConfig:
    """``key=value`` arguments into a checked ``ExportConfig``; an unknown key is one line naming it."""
    values = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ExportConfig.__dataclass_fields__:
            raise GptMiniError(f"unknown argument {arg!r}; use ckpt=<checkpoint> out=<folder>.")
        values[key] = value
    return ExportConfig(**values)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        folder = export(cfg.ckpt, cfg.out)
    except ImportError as error:
        print(f'error: exporting needs the hf extra ({error.name}): pip install -e ".[hf]"', file=sys.stderr)
        return 2
    except (GptMiniError, OSError) as error:
        message = user_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(
        f"wrote a Hugging Face GPT-2 folder to {folder} (GPT2LMHeadModel.from_pretrained loads it)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
