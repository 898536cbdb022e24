"""Sweeps: `python train.py -m a=1,2` runs one job per value and writes a summary table when it ends."""

import csv
import json
import subprocess
import sys

import pytest

from gptmini.training.sweep import collect, write_tables


def _fake_job(sweep_dir, number, overrides, summary):
    job = sweep_dir / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))


def test_summary_ranks_jobs_by_val_loss_and_shows_only_what_differs(tmp_path):
    _fake_job(tmp_path, 0, ["seed=1", "optim.lr=1e-3"], {"val_loss": 3.0, "val_bpb": 1.5, "wall_s": 2.0})
    _fake_job(tmp_path, 1, ["seed=1", "optim.lr=3e-3"], {"val_loss": 2.5, "val_bpb": 1.2, "wall_s": 2.1})
    _fake_job(tmp_path, 2, ["seed=1", "optim.lr=1e-1"], None)  # a job that crashed
    rows = collect(tmp_path)
    assert [r["overrides"] for r in rows] == ["optim.lr=1e-3", "optim.lr=3e-3", "optim.lr=1e-1"]
    assert rows[2]["status"] == "failed"
    csv_path, md_path = write_tables(rows, tmp_path)
    ranked = list(csv.DictReader(csv_path.open()))
    assert [r["job"] for r in ranked] == ["1", "0", "2"]
    assert "optim.lr=3e-3" in md_path.read_text().splitlines()[2]


@pytest.mark.slow
def test_multirun_writes_one_directory_per_job_and_the_summary(tmp_path, tiny_train_overrides, repo_root):
    overrides = [o for o in tiny_train_overrides if not o.startswith("model.n_layer")]
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "model.n_layer=1,2",
            "trainer.max_steps=3",
            *overrides,
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert sorted(r["overrides"] for r in rows) == ["model.n_layer=1", "model.n_layer=2"]
    assert all(float(r["val_loss"]) > 0 and int(r["n_params"]) > 0 for r in rows)
