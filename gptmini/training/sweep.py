"""A summary table at the end of a ``python train.py -m ...`` sweep.

Hydra runs each job in ``<sweep dir>/<job number>/``; every job writes ``summary.json``. When the sweep ends,
this Hydra callback gathers them into ``<sweep dir>/sweep_summary.md`` and ``sweep_summary.csv``: one row per
job with its overrides, validation loss and bits per byte, tokens/s, parameters and wall time.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gptmini.common import ERROR_FILE

COLUMNS = ["job", "overrides", "val_loss", "val_bpb", "tokens_per_s", "n_params", "wall_s", "status", "error"]


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir`` (jobs that failed show status "failed")."""
    rows, job_overrides = [], []
    job_dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").is_file()]
    for job_dir in sorted(job_dirs, key=lambda p: (len(p.name), p.name)):
        overrides = list(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml") or [])
        summary_file = job_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        error_file = job_dir / ERROR_FILE
        row = {"job": job_dir.name, "status": "ok" if summary else "failed"}
        if error_file.is_file():
            row["error"] = error_file.read_text(encoding="utf-8").strip()
        row.update({key: summary.get(key) for key in COLUMNS if key in summary})
        rows.append(row)
        job_overrides.append(overrides)
    # Show what differs between jobs; overrides shared by every job would only repeat in each row.
    shared = set.intersection(*map(set, job_overrides)) if job_overrides else set()
    for row, overrides in zip(rows, job_overrides, strict=True):
        row["overrides"] = " ".join(o for o in overrides if o not in shared)
    return rows


def write_tables(rows: list[dict[str, Any]], sweep_dir: Path) -> tuple[Path, Path]:
    """Write ``sweep_summary.csv`` and ``sweep_summary.md``; rows sorted by validation loss."""
    ranked = sorted(rows, key=lambda r: (r.get("val_loss") is None, r.get("val_loss") or 0.0))
    csv_path, md_path = sweep_dir / "sweep_summary.csv", sweep_dir / "sweep_summary.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in COLUMNS} for row in ranked)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in COLUMNS) + " |" for row in ranked]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        if not rows:
            return
        _, md_path = write_tables(rows, sweep_dir)
        print(f"\nsweep summary ({len(rows)} jobs): {md_path}\n{md_path.read_text()}", file=sys.stderr)
        failed = [row["job"] for row in rows if row["status"] == "failed"]
        if failed:
            print(
                f"error: {len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)})", file=sys.stderr
            )
            sys.exit(2)  # after the summary: a script running the sweep sees that something failed
