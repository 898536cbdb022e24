"""``metrics.csv`` that keeps a run's history across resumes.

Lightning's CSVLogger deletes an existing ``metrics.csv`` (with a warning) when its folder is not empty,
which is every Hydra run directory (``.hydra/`` is there first). A run resumed into its own directory would
lose everything logged before the interruption. This logger appends instead: the rows already in the file
stay, and new columns rewrite the header without dropping a row. ``trim_history`` removes rows logged after
the checkpoint a run resumes from (work that is about to be redone), so no step appears twice.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from gptmini.common import atomic_file

METRICS_FILE = "metrics.csv"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing metrics file."""

    def _check_log_dir_exists(self) -> None:
        # Called by the base __init__ instead of deleting: adopt the existing header so appends line up.
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = sorted(set(header))


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` instead of replacing it."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_history(path: str | os.PathLike, after_step: int) -> int:
    """Drop the rows of ``metrics.csv`` logged after step ``after_step``; return how many went.

    Rows carry the number of optimizer steps finished before the logged one, so a row with
    ``step >= after_step`` came from a step the resumed run will train again.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < after_step]
    if len(kept) < len(rows):
        with atomic_file(path, "w", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
    return len(rows) - len(kept)
