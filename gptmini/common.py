"""Helpers every stage shares: the user-facing error, config coercion, atomic writes and the device picker.

Anything a user can get wrong (a config value, a path, a checkpoint, a prompt) raises ``GptMiniError`` with a
short message that names the value and the fix. Every command prints it without a traceback and exits with
status 2 (``run_job``); every other exception is a bug and keeps its traceback.

Imports nothing from gptmini, so every module may import it.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import IO, Any

# Every temporary file an atomic write makes is named ``.<target>.<random>.tmp`` beside its target.
TEMP_SUFFIX = ".tmp"
# What a failed job of a -m sweep writes in its directory: its one-line error, for the sweep summary.
ERROR_FILE = "error.txt"


def checkout_root() -> Path | None:
    """The repository this gptmini is imported from (a checkout, or an editable install of one); None for an
    installed wheel, which has no repository around it."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "configs" / "train.yaml").is_file():
        return root
    return None


def config_dir() -> Path:
    """The folder of the Hydra configs (train.yaml, generate.yaml, eval.yaml and their groups).

    In a checkout it is the repository's ``configs/``, so an edited YAML takes effect at once (an editable
    install imports gptmini from the checkout too). A wheel has no checkout: the build copies ``configs/``
    into the package as ``gptmini/configs`` (pyproject.toml), and that copy is used.
    """
    root = checkout_root()
    return root / "configs" if root else Path(__file__).resolve().parent / "configs"


def default_cache_dir() -> Path:
    """Where token caches and downloads go unless ``data.cache_dir`` says: a checkout's ``data/`` folder; for
    an installed wheel the user's cache folder (``$XDG_CACHE_HOME/gptmini``, else ``~/.cache/gptmini``),
    never inside site-packages."""
    root = checkout_root()
    if root:
        return root / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptmini"


# Where every command and every composing helper (tests, benchmarks, notebooks) finds the configs.
CONFIG_DIR = config_dir()


def say(message: str) -> None:
    """gptmini's one channel for messages to the user: stderr, flushed (stdout is for results, e.g. generated
    text or an eval's JSON line, so it can be piped)."""
    print(message, file=sys.stderr, flush=True)


class GptMiniError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""


def as_config(value: object, cls: type, group: str):
    """The one way a config node becomes its dataclass: a ``cls`` passes; a mapping with its keys (Hydra's
    DictConfig is first resolved to plain values, so lists are lists) is constructed, and the dataclass's
    ``__post_init__`` checks the values."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, cls):
        return value
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, Mapping):
        kind = type(value).__name__
        raise GptMiniError(f"{group} config must be a {cls.__name__} or a mapping, not {kind}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise GptMiniError(f"unknown {group} keys {unknown}; valid keys: {', '.join(sorted(known))}")
    return cls(**{key: value[key] for key in value})


def typed_config(value: object, cls: type, group: str):
    """A command's whole config as its dataclass: a Hydra DictConfig is merged into ``cls``'s structured
    schema first (so OmegaConf converts and checks each value's type, as on the command line); anything else
    goes through ``as_config``."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), value))
    return as_config(value, cls, group)


def check_finite_floats(config: object, prefix: str) -> None:
    """Refuse NaN and ±inf in every float field of the dataclass ``config`` (call it first in its checks).

    Every comparison with NaN is false, so a range check such as ``x < 0`` lets it through, and inf passes
    every lower bound; either then fails mid-run as a non-finite loss or a sampling error that blames
    something else. Checked by value rather than by name, so a new float field is covered too.
    """
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            default = "null" if field.default is None else field.default
            hint = "" if field.default is MISSING else f"; the default is {default}"
            raise GptMiniError(f"{prefix}{field.name}={value} must be a finite number, not nan or inf{hint}.")


MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are unsigned 32-bit


def check_seed(seed: Any) -> None:
    """The seed rule of train.py and generate.py: an integer that every random source accepts."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise GptMiniError(f"seed={seed!r} must be an integer in 0..{MAX_SEED}; try seed=1337.")


# ---------------------------------------------------------------------------------------------------------
# Atomic writes: one guarantee everywhere. The bytes go to a temporary file beside the target, are fsynced,
# and only then renamed over it (atomic on POSIX and Windows). A crash, a full disk or Ctrl-C mid-write
# leaves the previous file intact and no partial file under the target's name.
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            # mkstemp makes the file owner-only (0600); give it the permissions a plain open() would.
            os.chmod(tmp_name, 0o666 & ~_umask())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes that were killed (``kill -9``) before their rename.

    Only files older than a minute go, so a write in progress in another process is left alone.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f".*{TEMP_SUFFIX}"):
        try:
            if path.is_file() and time.time() - path.stat().st_mtime > 60:
                path.unlink()
                removed.append(path)
        except OSError:
            pass  # another process removed it first, or it is not ours to remove
    return removed


# Full disk, quota, read-only file system, no permission: faults of the machine, not bugs of the program.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    getattr(errno, "EDQUOT", errno.ENOSPC),
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
}


def is_environment_fault(error: BaseException) -> bool:
    """Whether ``error`` is a full disk or a permission problem (answered in one line, no traceback)."""
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


def user_error_message(error: BaseException) -> str | None:
    """The one line a command prints for ``error``, or None when it is a bug (which keeps its traceback).

    The boundary rule of every command (``run_job``): a ``GptMiniError`` says what was wrong and
    the fix; a full disk or a permission problem is a fault of the machine, named as such.
    """
    if isinstance(error, GptMiniError):
        return str(error)
    if is_environment_fault(error):
        return describe_os_error(error, "a file")
    return None


def run_job(work: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run ``work()`` under the policy every gptmini command shares, and return its exit status.

    - a user's mistake or a fault of the machine (``user_error_message``) is one ``error:`` line and status
      2; in a ``-m`` sweep the job's failure is recorded instead and the sweep goes on (status 0 here; the
      sweep's summary lists the job as failed and the sweep ends with status 2);
    - Ctrl-C prints ``interrupted`` (what was left half-written: nothing) and is status 130;
    - a reader that went away (``| head``) ends the job quietly, status 0;
    - anything else is a bug and keeps its traceback.

    Every entry point comes through here: the ``gptmini`` jobs (gptmini/cli.py), train.py, generate.py and
    ``python -m gptmini.eval``, ``.hf.export``, ``.weights``.
    """
    try:
        work()
    except BrokenPipeError:
        discard_stdout()
        return 0
    except KeyboardInterrupt:
        say(f"\n{interrupted}")
        return 130
    except (GptMiniError, OSError) as error:
        message = user_error_message(error)
        if message is None:
            raise  # a bug: keep its traceback
        say(f"error: {message}")
        return _failed(message)
    return 0


def run_with_arguments(
    work: Callable[[list[str]], object], argv: list[str], interrupted: str = "interrupted"
) -> int:
    """A command that reads its own ``key=value`` arguments: ``-h``/``--help`` prints ``work``'s docstring
    (its usage), anything else runs ``work(argv)`` under ``run_job``."""
    if "-h" in argv or "--help" in argv:
        return run_job(lambda: print(inspect.getdoc(work)))  # a closed pipe (| head) is quiet here too
    return run_job(lambda: work(argv), interrupted)


def _failed(message: str) -> int:
    """Status 2, except in a job of a ``-m`` sweep: there the failure is recorded and the sweep goes on."""
    if in_multirun():
        record_failed_job(message)
        return 0
    return 2


def in_multirun() -> bool:
    """Whether this process runs a job of a ``-m`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failed_job(message: str) -> None:
    """Write the job's error next to its outputs (``ERROR_FILE``), so the sweep summary
    (gptmini.training.sweep) can list it while the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig

    job_dir = Path(HydraConfig.get().runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / ERROR_FILE).write_text(message + "\n", encoding="utf-8")


def discard_stdout() -> None:
    """The reader went away (``| head``): point stdout at /dev/null, so the flush at exit is quiet too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (captured in a test): nothing is left to flush
        pass


def describe_os_error(error: OSError, what: str) -> str:
    """One line for an OSError while writing ``what``: a full disk, no permission, or the OS's own words."""
    if error.errno == errno.ENOSPC:
        reason = "the disk is full"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "no permission to write there (read-only or owned by another user)"
    else:
        reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return f"cannot write {what}{where}: {reason}"


# ---------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto"):
    """The torch device for ``name``: ``auto`` = cuda, then mps, then cpu. An unavailable one is an error.

    Decided when called, never at import, so a CPU run never probes CUDA before it must.
    """
    import torch

    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": has_mps}
    if name == "auto":
        return torch.device("cuda" if available["cuda"] else "mps" if has_mps else "cpu")
    kind = str(name).split(":")[0]
    if kind not in available:
        raise GptMiniError(f"device={name!r} is not known; use one of: {', '.join(DEVICES)}.")
    if not available[kind]:
        raise GptMiniError(f"device={name} is not available on this machine; use device=auto or device=cpu.")
    return torch.device(name)
