"""Export to the Hugging Face format: ``gptmini export ckpt=<file | run dir | latest> out=DIR``.

Writes a GPT-2 folder that ``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load: config.json, generation_config.json, model.safetensors, and the
tokenizer (tokenizer.json and its configs; with GPT-2's own tokenizer also vocab.json and merges.txt).
tokenizer_config.json holds the checkpoint's chat template as Jinja (``chat_template``; the ``chat``
template for a checkpoint trained without one), so ``apply_chat_template`` and the serving engines render
a conversation to the ids gptmini's own server does.

An export appears whole or not at all, and never mixes with what was there:

- everything that can refuse runs before the first byte is written;
- the files are written into a fresh hidden folder beside ``out`` (``.NAME.export-PID-XXXX.tmp``), then that
  folder takes ``out``'s place in one atomic exchange (Linux ``renameat2``; two renames elsewhere). An
  earlier export in ``out`` is replaced only once the new one is complete, and none of its files stay;
- Ctrl-C or SIGTERM removes the hidden folder (exit 130); ``kill -9`` leaves it, and the next export to the
  same ``out`` removes it;
- ``out`` must be new, empty, or hold only a Hugging Face model's files (an earlier export): anything else
  in it is someone's own and is not replaced, and neither is a folder the exported weights are read from
  (the checkpoint's own folder, a LoRA checkpoint's base).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gptmini.common import GptMiniError, _umask, describe_os_error, run_with_arguments, say
from gptmini.hf.hub import CONFIG_FILE, SAFETENSORS_FILE, WEIGHTS_FILES

if TYPE_CHECKING:
    from gptmini.weights import SourceWeights

# What a Hugging Face model folder holds (an earlier export, or a save_pretrained): replaced with the folder.
MODEL_FOLDER_FILES = {
    CONFIG_FILE,
    "generation_config.json",
    *WEIGHTS_FILES,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
}
SHARD_FILE = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def export(ckpt: str, out: str | Path) -> Path:
    """Write the Hugging Face GPT-2 folder for ``ckpt`` into ``out``; return the folder."""
    from gptmini.weights import read_weights

    folder = Path(out).expanduser().resolve()
    check_destination(folder)
    source = read_weights(ckpt)
    check_not_a_dependency(folder, source.depends_on)
    write_folder(folder, export_files(source))
    return folder


def export_files(source: SourceWeights) -> dict[str, bytes]:
    """Every file of the export, by name: all the checks that can refuse run here, before any write."""
    from safetensors.torch import save as safetensors_bytes

    from gptmini.data.chat_template import jinja, template_of
    from gptmini.data.tokenizer import tokenizer_from_spec
    from gptmini.hf.convert import check_exportable, hf_config_from, state_dict_to_hf
    from gptmini.hf.tokenizer_export import tokenizer_files

    config = source.model_config
    check_exportable(config)
    # The trained template, else the chat default (said nowhere: the export's messages stay one line).
    template, _ = template_of(source.info)  # a template this gptmini cannot read is refused here
    enc = tokenizer_from_spec(source.tokenizer_spec)
    if enc.n_vocab != config.vocab_size:
        raise GptMiniError(
            f"{source.path}: the model predicts {config.vocab_size} tokens, its tokenizer has {enc.n_vocab}; "
            "an exported model and tokenizer would disagree, so it is not exported."
        )
    eot = enc.eot_token
    generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    texts = {
        CONFIG_FILE: json.dumps(hf_config_from(config, eot), indent=2) + "\n",
        "generation_config.json": json.dumps(generation, indent=2) + "\n",
        **tokenizer_files(enc, model_max_length=config.block_size, chat_template=jinja(template)),
    }
    weights = safetensors_bytes(state_dict_to_hf(source.state, config), metadata={"format": "pt"})
    return {SAFETENSORS_FILE: weights, **{name: text.encode("utf-8") for name, text in texts.items()}}


# ---------------------------------------------------------------------------------------------------------
# Where the export may go
# ---------------------------------------------------------------------------------------------------------


def check_destination(folder: Path) -> None:
    """Refuse an ``out`` that is a file, lies under a file, or holds anything but a model folder's files."""
    if folder.exists() and not folder.is_dir():
        raise GptMiniError(f"out={folder} is a file; pass a folder to write the Hugging Face model into.")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise GptMiniError(
            f"out={folder} cannot be created: {existing} is a file, not a folder; pick another out=."
        )
    if existing != folder:
        return
    entries = sorted(folder.iterdir())
    folders = [p.name for p in entries if p.name in MODEL_FOLDER_FILES and (p.is_dir() or p.is_symlink())]
    if folders:
        raise GptMiniError(
            f"out={folder} holds a folder (or link) {folders[0]} where the export writes a file; move it "
            "away or pick another out=."
        )
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if not _is_model_file(p)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise GptMiniError(
            f"out={folder} holds files that are not a Hugging Face model's ({shown}); an export replaces the "
            "whole folder, so it is not written there: pick a new or empty folder, or one holding an earlier "
            "export."
        )


def _is_model_file(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    return path.name in MODEL_FOLDER_FILES or bool(SHARD_FILE.fullmatch(path.name))


def check_not_a_dependency(folder: Path, depends_on: tuple[Path, ...]) -> None:
    """Refuse to write over (or around) what the exported weights are read from: the checkpoint or folder
    itself, and a LoRA checkpoint's base (its adapters would then be applied to the export: twice)."""
    for i, needed in enumerate(depends_on):
        if needed == folder or folder in needed.parents:
            what = "the LoRA base of the checkpoint being exported" if i else "what is being exported"
            raise GptMiniError(f"out={folder} would replace {needed}, {what}; export to another folder.")


# ---------------------------------------------------------------------------------------------------------
# Writing: a fresh hidden folder, then one atomic exchange
# ---------------------------------------------------------------------------------------------------------


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a new hidden sibling of ``folder``, then put it in ``folder``'s place."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(folder)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{folder.name}.export-{os.getpid()}-", suffix=".tmp", dir=folder.parent)
        )
    except OSError as error:
        raise _cannot_write(folder, error) from None
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700, made what a plain mkdir gives
        for name, data in files.items():
            _write_file(staging / name, data)
        _put_in_place(staging, folder)  # from here on, staging holds the earlier export (or nothing)
    except OSError as error:
        raise _cannot_write(folder, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the folder is swapped in


def _put_in_place(staging: Path, folder: Path) -> None:
    """``staging`` becomes ``folder``; an existing ``folder`` ends up at ``staging`` (for removal)."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    if _exchange(staging, folder):
        return
    # No atomic exchange here (not Linux, or a file system without it): two renames. A crash between them
    # leaves the earlier export at ``.NAME.export-...old`` and no ``folder``.
    parked = staging.with_name(staging.name + ".old")
    os.rename(folder, parked)
    os.rename(staging, folder)
    os.rename(parked, staging)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (``renameat2(RENAME_EXCHANGE)``): at every instant ``b`` is the old or
    the new folder. False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no C library to load (Windows), or no renameat2 in it
        return False
    at_fdcwd, rename_exchange = -100, 2  # from <fcntl.h> and <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def remove_leftovers(folder: Path) -> None:
    """Remove the hidden folders of exports to ``folder`` that were killed (``kill -9``) before finishing:
    their process is gone. A running export's folder is left alone."""
    for path in folder.parent.glob(f".{glob.escape(folder.name)}.export-*.tmp*"):
        match = re.match(r"\.export-(\d+)-", path.name[len(folder.name) + 1 :])
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _cannot_write(folder: Path, error: OSError) -> GptMiniError:
    return GptMiniError(f"{describe_os_error(error, f'the export out={folder}')}; pick another out= folder.")


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[str, str]:
    """``(ckpt, out)`` from ``key=value`` arguments (see ``export_command``); an unknown key is one line."""
    values = {"ckpt": "latest", "out": ""}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in values:
            raise GptMiniError(f"unknown argument {arg!r}; use ckpt=<checkpoint> out=<folder>.")
        values[key] = value
    if not values["out"]:
        raise GptMiniError(
            "out= is required: the folder to write the Hugging Face model into (out=hf_model)."
        )
    return values["ckpt"], values["out"]


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the export cleans up the same way."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """``gptmini export ...`` and ``python -m gptmini.hf.export ...``: returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    return run_with_arguments(
        export_command, args, interrupted="interrupted: no export was left half-written."
    )


def export_command(argv: list[str]) -> None:
    """usage: gptmini export ckpt=<checkpoint> out=<folder>

    Write a gptmini checkpoint as a Hugging Face GPT-2 folder that GPT2LMHeadModel.from_pretrained(out) and
    AutoTokenizer.from_pretrained(out) load (needs the hf extra: pip install "gptmini[hf]").

      ckpt=  a .ckpt file, a run directory, latest (default), or anything generate's ckpt= takes
      out=   the folder to write: new, empty, or an earlier export (replaced whole, atomically)

    A LoRA checkpoint is exported merged into its base. A model that GPT-2's format cannot express exactly
    is refused, naming the option. Ctrl-C or SIGTERM leaves no half-written export.
    """
    try:
        with sigterm_as_interrupt():
            folder = export(*parse_args(argv))
    except ImportError as error:
        raise GptMiniError(f'exporting needs the hf extra ({error.name}): pip install -e ".[hf]"') from None
    say(f"wrote a Hugging Face GPT-2 folder to {folder} (GPT2LMHeadModel.from_pretrained loads it)")


if __name__ == "__main__":
    sys.exit(main())
