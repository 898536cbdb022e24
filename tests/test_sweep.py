"""Sweeps: `python train.py -m a=1,2` runs one job per value and writes a summary table when it ends."""

import csv
import json

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
def test_multirun_writes_one_directory_per_job_and_the_summary(tmp_path, tiny_train_overrides, run_cli):
    overrides = [o for o in tiny_train_overrides if not o.startswith("model.n_layer")]
    sweep_dir = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    result = run_cli(
        "train.py", "-m", "model.n_layer=1,2", "trainer.max_steps=3", *overrides, sweep_dir, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert sorted(r["overrides"] for r in rows) == ["model.n_layer=1", "model.n_layer=2"]
    assert all(float(r["val_loss"]) > 0 and int(r["n_params"]) > 0 for r in rows)


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_train_overrides, run_cli):
    """n_head=3 does not divide n_embd=32: job 1 fails, jobs 0 and 2 still run, and the summary says so."""
    overrides = [o for o in tiny_train_overrides if not o.startswith("model.n_head")]
    sweep_dir = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    result = run_cli(
        "train.py", "-m", "model.n_head=2,3,4", "trainer.max_steps=2", *overrides, sweep_dir, timeout=600
    )
    assert result.returncode == 2  # after the summary, so a script sees that something failed
    assert "Traceback" not in result.stderr
    assert "1 of 3 jobs failed (jobs 1)" in result.stderr
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "sweep" / "sweep_summary.csv").open())}
    assert rows["0"]["status"] == rows["2"]["status"] == "ok"
    assert rows["1"]["status"] == "failed"
    assert "n_embd=32 is not divisible by n_head=3" in rows["1"]["error"]
    assert "n_embd=32 is not divisible by n_head=3" in (tmp_path / "sweep" / "1" / "error.txt").read_text()
