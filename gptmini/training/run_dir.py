"""A Hydra callback that makes the run (or sweep) directory before Hydra does, so a bad one is one line.

Hydra creates ``hydra.run.dir`` itself before it calls ``train``: a path that names an existing file, or one
on a read-only disk, ended in Hydra's traceback. This callback runs first (``on_run_start``,
``on_multirun_start``), makes the directory and turns the machine's refusal into the usual ``error:`` line and
exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gptmini.common import describe_os_error


class MakeOutputDirectory(Callback):
    """Create ``hydra.run.dir`` (a run) or ``hydra.sweep.dir`` (a sweep); a failure exits with one line."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_output_directory(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        make_output_directory(config.hydra.sweep.dir, "hydra.sweep.dir")


def make_output_directory(path: str, key: str) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            reason = f"{key}={path} is (or lies under) a file, not a directory"
        else:
            reason = describe_os_error(error, f"the run directory {key}={path}")
        print(f"error: {reason}; choose another {key}=DIR.", file=sys.stderr)
        raise SystemExit(2) from None
