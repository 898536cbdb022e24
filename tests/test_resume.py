"""Resuming and fine-tuning: same-directory resumes, the metrics history, step labels, tokenizers."""

import csv
import json
import math
import os
import time

import lightning as L
import pytest
import torch

from gptmini.common import GptMiniError
from gptmini.training.run import train
from gptmini.weights import read_checkpoint, resolve_checkpoint


def metrics_rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def losses_by_step(run_dir, column: str = "train/loss") -> dict[int, str]:
    """Logged values by their step label; a label that appears twice fails the test."""
    found: dict[int, str] = {}
    for row in metrics_rows(run_dir):
        if row.get(column):
            step = int(row["step"])
            assert step not in found, f"step {step} logged twice in {column}"
            found[step] = row[column]
    return found


def test_resume_into_the_same_directory_continues_last_ckpt_and_keeps_the_history(
    signal_at_step, tmp_path, tiny_train_overrides, compose_train
):
    """The README's cluster recipe: a named run directory, interrupted before its first validation."""
    run = tmp_path / "r2"
    overrides = tiny_train_overrides + ["trainer.max_steps=12", "trainer.val_check_interval=6"]
    with pytest.raises(SystemExit):
        train(compose_train(overrides), out_dir=run, extra_callbacks=[signal_at_step(4)])
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    before = losses_by_step(run)
    assert before and max(before) < 4

    summary = train(compose_train(overrides + [f"ckpt_path={run}"]), out_dir=run)

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert resolve_checkpoint(run) == run / "checkpoints" / "last.ckpt"  # what generate.py ckpt=<run> opens
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 12
    assert on_disk["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    after = losses_by_step(run)
    assert {step: after[step] for step in before} == before  # the rows before the interrupt survived
    assert max(after) >= 11  # and the training after the resume is in the same file


def test_a_resumed_run_logs_the_same_steps_and_losses_as_a_straight_run(
    tmp_path, tiny_train_overrides, compose_train
):
    overrides = tiny_train_overrides + [
        "trainer.max_steps=20",
        "trainer.val_check_interval=100",
        "trainer.log_every_n_steps=1",
        "optim.decay_steps=20",  # the schedule's length must not depend on where the first part stops
    ]
    train(compose_train(overrides), out_dir=tmp_path / "straight")
    train(compose_train([*overrides, "trainer.max_steps=10"]), out_dir=tmp_path / "first")
    resumed = compose_train(overrides + [f"ckpt_path={tmp_path / 'first'}"])
    train(resumed, out_dir=tmp_path / "second")

    straight = losses_by_step(tmp_path / "straight")
    first, second = losses_by_step(tmp_path / "first"), losses_by_step(tmp_path / "second")
    assert sorted(straight) == list(range(20))
    assert sorted(second) == list(range(10, 20))  # step 10's loss is labelled 10, as in the straight run
    assert {**first, **second} == straight


def test_a_new_run_never_overwrites_another_runs_checkpoint(tmp_path, tiny_train_overrides, compose_train):
    run = tmp_path / "run"
    train(compose_train(tiny_train_overrides), out_dir=run)
    step_before = read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    with pytest.raises(
        GptMiniError, match=rf"run directory {run} already holds a checkpoint .* ckpt_path={run}"
    ):
        train(compose_train(tiny_train_overrides + ["trainer.max_steps=3"]), out_dir=run)
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == step_before


def test_orphaned_temporary_checkpoint_files_are_cleaned_at_the_next_start(
    tmp_path, tiny_train_overrides, compose_train
):
    """``kill -9`` during a save leaves ``.last.ckpt.<random>.tmp``; the next run there removes it."""
    run = tmp_path / "run"
    overrides = tiny_train_overrides + ["trainer.max_steps=3"]
    train(compose_train(overrides), out_dir=run)
    orphan = run / "checkpoints" / ".last.ckpt.k9x2.tmp"
    orphan.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    train(compose_train(["trainer.max_steps=5", *overrides[:-1], f"ckpt_path={run}"]), out_dir=run)
    assert not orphan.exists()


def test_init_from_keeps_the_checkpoints_tokenizer_on_new_text(
    tmp_path, tiny_train_overrides, compose_train, write_corpus
):
    """The README's fine-tuning example: other text, a tokenizer of the same size. The token ids must keep
    meaning what the weights learnt, so the new run tokenizes with the checkpoint's tokenizer."""
    train(compose_train(tiny_train_overrides), out_dir=tmp_path / "a")
    notes = write_corpus(tmp_path / "notes", seed=7)
    notes.write_text(notes.read_text().replace("alpha", "zebra quokka"))
    overrides = [o for o in tiny_train_overrides if not o.startswith("data.path")]
    cfg = compose_train(
        overrides + [f"data.path={notes}", f"init_from={tmp_path / 'a'}", "trainer.max_steps=2"]
    )
    train(cfg, out_dir=tmp_path / "b")
    tokenizer_a = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")["gptmini"]["tokenizer"]
    tokenizer_b = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")["gptmini"]["tokenizer"]
    assert tokenizer_b == tokenizer_a


def test_init_from_and_ckpt_path_together_are_refused(tmp_path, tiny_train_overrides, compose_train):
    cfg = compose_train(tiny_train_overrides + [f"init_from={tmp_path}", f"ckpt_path={tmp_path}"])
    with pytest.raises(GptMiniError, match="ckpt_path and init_from are both set"):
        train(cfg, out_dir=tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------
# Exact resume on the settings users run: the model summary on, threads=auto, validations inside the run,
# samples at each validation. (debug=smoke switches the first two off, which once hid three bugs.)
# ---------------------------------------------------------------------------------------------------------


class CrashBeforeStep(L.Callback):
    """Abort the run as a crash (kill -9, a power cut) would, just before step ``step`` starts: what is on
    disk is the checkpoint the last validation wrote."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


EMA = "+callbacks.ema={_target_: lightning.pytorch.callbacks.EMAWeightAveraging, decay: 0.9}"


def default_overrides(tmp_path, write_corpus, optim: str) -> list[str]:
    """The default trainer, callbacks and threads=auto; only the model and data are small. optim "muon+ema"
    is Muon with experiment=shakespeare's weight average."""
    corpus = write_corpus(tmp_path / "corpus")
    optim, _, average = optim.partition("+")
    return [
        *([EMA] if average else []),
        "data=text",
        f"data.path={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "tokenizer.vocab_size=300",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=16",
        "data.batch_size=8",
        f"optim={optim}",
        "trainer.max_steps=20",
        "trainer.val_check_interval=5",
        "trainer.log_every_n_steps=1",  # every row is compared
        "trainer.enable_progress_bar=false",
    ]


def logged_rows(run_dir) -> dict[tuple[str, int], str]:
    """Every logged value by (column, step label), timings left out; a label logged twice fails."""
    found: dict[tuple[str, int], str] = {}
    for row in metrics_rows(run_dir):
        for column, value in row.items():
            if value and column not in ("step", "epoch") and not column.startswith("perf/"):
                key = (column, int(row["step"]))
                assert key not in found, f"{key} logged twice in {run_dir}"
                found[key] = value
    return found


def final_weights(run_dir) -> dict:
    """The checkpoint's weights; with a weight average, the average's and the trained ones'."""
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    trained = checkpoint.get("current_model_state", {})
    return {**checkpoint["state_dict"], **{f"trained/{name}": value for name, value in trained.items()}}


def assert_same_run(run_dir, straight_dir) -> None:
    assert logged_rows(run_dir) == logged_rows(straight_dir)
    ours, theirs = final_weights(run_dir), final_weights(straight_dir)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours), "weights differ from the straight run"
    assert (run_dir / "samples.txt").read_text() == (straight_dir / "samples.txt").read_text()
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, straight_dir))
    assert ours["steps"] == theirs["steps"] == 20
    assert ours["best_val_loss"] == theirs["best_val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "muon", "muon+ema"])
def test_default_settings_resume_equals_a_straight_run_by_label_and_weight(
    optim, tmp_path, write_corpus, compose_train, signal_at_step
):
    overrides = default_overrides(tmp_path, write_corpus, optim)

    # A crash after the validation checkpoint of step 10, resumed into a new directory and into its own.
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_train(overrides), out_dir=crashed, extra_callbacks=[CrashBeforeStep(10)])
    assert read_checkpoint(crashed / "checkpoints" / "last.ckpt")["global_step"] == 10
    train(compose_train(overrides + [f"ckpt_path={crashed}"]), out_dir=tmp_path / "elsewhere")
    train(compose_train(overrides + [f"ckpt_path={crashed}"]), out_dir=crashed)

    # Ctrl-C at step 7 (a checkpoint written at a batch end), resumed in its own directory.
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit):
        train(compose_train(overrides), out_dir=stopped, extra_callbacks=[signal_at_step(7)])
    train(compose_train(overrides + [f"ckpt_path={stopped}"]), out_dir=stopped)

    # The resumed runs kept the thread count their checkpoint recorded; the straight run uses that count
    # too, since threads=auto could time its way to another one on a busy machine.
    threads = read_checkpoint(crashed / "checkpoints" / "last.ckpt")["gptmini"]["threads"]
    resumed_choice = json.loads((crashed / "summary.json").read_text())["threads_choice"]
    assert resumed_choice["how"] == "checkpoint" and resumed_choice["threads"] == threads

    def straight_run(threads: int):
        run = tmp_path / f"straight-{threads}"
        if not run.exists():
            train(compose_train(overrides + [f"threads={threads}"]), out_dir=run)
        return run

    straight = straight_run(threads)
    assert ("+ema" in optim) == any(name.startswith("trained/") for name in final_weights(straight))
    assert len(logged_rows(straight)) > 80  # 20 steps × (loss, grad norm, 2 rates) + 4 validations

    # The new directory holds only the resumed part; with the first part's rows it is the straight run.
    first_part = {key: value for key, value in logged_rows(straight).items() if key[1] < 10}
    assert {**first_part, **logged_rows(tmp_path / "elsewhere")} == logged_rows(straight)
    assert min(step for _, step in logged_rows(tmp_path / "elsewhere")) == 10
    elsewhere = final_weights(tmp_path / "elsewhere")
    assert all(torch.equal(weight, final_weights(straight)[name]) for name, weight in elsewhere.items())
    assert_same_run(crashed, straight)
    stopped_threads = read_checkpoint(stopped / "checkpoints" / "last.ckpt")["gptmini"]["threads"]
    assert_same_run(stopped, straight_run(stopped_threads))


def test_best_val_loss_is_the_best_checkpoints_even_when_it_predates_the_resume(tmp_path):
    """A resume in the same directory restores ModelCheckpoint's best; the summary must report that file's
    loss, not the best of the validations since the resume."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from gptmini.training.callbacks import LossHistory
    from gptmini.training.report import build_summary

    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss")
    best.best_model_path, best.best_model_score = str(tmp_path / "best.ckpt"), torch.tensor(1.5)
    history = LossHistory()
    history.val = [(1000, 2.0), (2000, 1.8)]  # the resumed part only got worse
    trainer = SimpleNamespace(
        callback_metrics={"val/loss": torch.tensor(1.8)},
        checkpoint_callback=best,
        global_step=20,
        accumulate_grad_batches=1,
        world_size=1,
        callbacks=[],
    )
    lit = SimpleNamespace(val_bytes_per_token=4.0, model=SimpleNamespace(num_params=lambda: 10), optim=None)
    lit.optim = SimpleNamespace(schedule_by="steps")
    throughput = SimpleNamespace(average_tokens_per_s=None, last_mfu=None)
    summary = build_summary(trainer, lit, throughput, history, tmp_path, 1.0, 100)
    assert summary["best_checkpoint"] == str(tmp_path / "best.ckpt")
    assert summary["best_val_loss"] == 1.5
    assert summary["best_val_bpb"] == pytest.approx(1.5 / math.log(2) / 4.0)


def test_the_loss_history_travels_in_the_checkpoint():
    from gptmini.training.callbacks import LossHistory

    history = LossHistory()
    history.train, history.val = [(100, 5.0), (200, 4.0)], [(200, 4.5)]
    restored = LossHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.train == history.train and restored.val == history.val


def test_the_one_private_lightning_attribute_gptmini_writes_still_exists():
    """steps.align_logged_step sets Lightning's row label counter; if Lightning renames it, say so here."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer.fit_loop.epoch_loop._batches_that_stepped, int)
