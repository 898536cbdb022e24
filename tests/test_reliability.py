"""Reliability: exact resume, interrupts, checkpoint safety, numerical faults, concurrent runs."""

import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from gptmini.common import GptMiniError
from gptmini.training.callbacks import GracefulInterrupt
from gptmini.training.run import train
from gptmini.weights import atomic_torch_save, read_checkpoint


class RecordLosses(L.Callback):
    """The training loss of every step, keyed by the step it produced."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


class PoisonAtStep(L.Callback):
    """Turn one weight into NaN just before step ``step`` (0-based), so that step's loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.wte.weight.fill_(float("nan"))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_interrupt_reproduces_the_uninterrupted_run_exactly(
    signal_at_step, tmp_path, tiny_train_overrides, signum, compose_train
):
    # Dropout on, so the RNG streams matter; validation in the middle, so resume crosses it.
    overrides = tiny_train_overrides + [
        "model.dropout=0.1",
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
    ]
    straight = RecordLosses()
    train(compose_train(overrides), out_dir=tmp_path / "straight", extra_callbacks=[straight])

    first = RecordLosses()
    with pytest.raises(SystemExit) as stop:
        train(
            compose_train(overrides),
            out_dir=tmp_path / "first",
            extra_callbacks=[first, signal_at_step(6, signum)],
        )
    assert stop.value.code == 130
    assert read_checkpoint(tmp_path / "first" / "checkpoints" / "last.ckpt")["global_step"] == 6

    second = RecordLosses()
    resume = compose_train(overrides + [f"ckpt_path={tmp_path / 'first'}"])
    train(resume, out_dir=tmp_path / "second", extra_callbacks=[second])

    assert sorted(first.losses) == list(range(1, 7))
    assert sorted(second.losses) == list(range(7, 13))
    # Bitwise: the same data windows, learning rates, optimizer moments and dropout masks.
    assert {**first.losses, **second.losses} == straight.losses
    expected, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "second")
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name


def test_second_interrupt_exits_at_once(monkeypatch, tmp_path):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    interrupt = GracefulInterrupt(tmp_path / "last.ckpt")
    interrupt.handle(signal.SIGINT, None)
    assert interrupt.received == "SIGINT" and not exits
    interrupt.handle(signal.SIGINT, None)
    assert exits == [130]


def test_signal_during_validation_stops_after_the_next_step(tmp_path, tiny_train_overrides, compose_train):
    """A signal that lands while validation runs is not lost: the next training step saves and stops."""

    class SignalDuringValidation(L.Callback):
        sent = False

        def on_validation_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 6 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)

    overrides = tiny_train_overrides + ["trainer.max_steps=20", "trainer.val_check_interval=6"]
    with pytest.raises(SystemExit) as stop:
        train(compose_train(overrides), out_dir=tmp_path / "run", extra_callbacks=[SignalDuringValidation()])
    assert stop.value.code == 130
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 7


@pytest.mark.slow
def test_ctrl_c_on_a_real_training_process_saves_and_prints_the_resume_command(
    tmp_path, tiny_train_overrides, run_cli
):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_train_overrides if not o.startswith("trainer.max_steps")]
    process = run_cli.start("train.py", *overrides, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}")
    lines = []
    for line in process.stderr:  # wait until training has started, then let it run a moment
        lines.append(line)
        if line.startswith("model:"):
            break
    time.sleep(4)
    process.send_signal(signal.SIGINT)
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 130
    text = "".join(lines)
    assert "Traceback" not in text
    resume_line = next(line for line in lines if line.startswith("resume with: "))
    assert f"ckpt_path={run_dir}" in resume_line
    saved_step = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert saved_step > 0

    # Resume with the printed command, asking for two more steps.
    resume = resume_line.removeprefix("resume with: gptmini train ").split()
    resume = [o for o in resume if not o.startswith(("trainer.max_steps", "hydra.run.dir"))]
    result = run_cli(
        "train.py", *resume, f"trainer.max_steps={saved_step + 2}", f"hydra.run.dir={tmp_path / 'resumed'}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    resumed_step = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"]
    assert resumed_step == saved_step + 2, result.stderr[-3000:]


def test_nan_loss_stops_with_step_and_lr_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_train_overrides, compose_train
):
    overrides = tiny_train_overrides + ["trainer.max_steps=20", "trainer.val_check_interval=4"]
    expected = r"non-finite .* in step 6, after 5 good ones \(learning rate [0-9.e-]+\).* \(step 4\) was kept"
    with pytest.raises(GptMiniError, match=expected):
        train(compose_train(overrides), out_dir=tmp_path / "run", extra_callbacks=[PoisonAtStep(5)])
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_nan_loss_in_the_first_step_says_no_checkpoint_was_written(
    tmp_path, tiny_train_overrides, compose_train
):
    with pytest.raises(
        GptMiniError, match=r"in step 1, after 0 good ones .* no checkpoint had been written yet"
    ):
        train(
            compose_train(tiny_train_overrides), out_dir=tmp_path / "run", extra_callbacks=[PoisonAtStep(0)]
        )
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("option", ["ckpt_path", "init_from"])
def test_truncated_checkpoint_is_reported_with_file_and_size(
    tmp_path, tiny_train_overrides, option, compose_train
):
    train(compose_train(tiny_train_overrides), out_dir=tmp_path / "good")
    good = (tmp_path / "good" / "checkpoints" / "last.ckpt").read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(good[: len(good) // 2])
    cfg = compose_train(tiny_train_overrides + [f"{option}={broken}"])
    with pytest.raises(GptMiniError, match=rf"cannot read checkpoint {broken} \({len(good) // 2:,} bytes\)"):
        train(cfg, out_dir=tmp_path / "run")


@pytest.mark.parametrize("option", ["ckpt_path", "init_from"])
def test_missing_checkpoint_is_reported(tmp_path, tiny_train_overrides, option, compose_train):
    cfg = compose_train(tiny_train_overrides + [f"{option}={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(GptMiniError, match="checkpoint not found: .*nope.ckpt"):
        train(cfg, out_dir=tmp_path / "run")


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RecordLosses()}, path)  # an arbitrary pickled object
    with pytest.raises(GptMiniError, match="cannot read checkpoint"):
        read_checkpoint(path)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def crash(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_batch_larger_than_the_data_is_refused(tmp_path, tiny_train_overrides, compose_train):
    cfg = compose_train(tiny_train_overrides + ["data.batch_size=5000"])
    with pytest.raises(GptMiniError, match=r"data.batch_size=5000 .* larger than the whole training split"):
        train(cfg, out_dir=tmp_path / "run")


@pytest.mark.slow
def test_two_runs_started_at_once_share_one_cache(tmp_path, tiny_train_overrides, run_cli):
    overrides = [o for o in tiny_train_overrides if not o.startswith("data.cache_dir")]
    cache = tmp_path / "shared-cache"
    processes = [
        run_cli.start(
            "train.py",
            *overrides,
            f"data.cache_dir={cache}",
            "trainer.max_steps=3",
            f"hydra.run.dir={tmp_path / f'run{i}'}",
        )
        for i in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    meta_files = list(cache.glob("**/meta.json"))
    assert len(meta_files) == 1, meta_files
    assert not list(cache.glob("**/*.tmp*"))


def test_run_directory_without_a_checkpoint_is_reported(tmp_path, tiny_train_overrides, compose_train):
    (tmp_path / "empty_run").mkdir()
    cfg = compose_train(tiny_train_overrides + [f"init_from={tmp_path / 'empty_run'}"])
    with pytest.raises(
        GptMiniError, match="no checkpoint in run directory .*empty_run: expected checkpoints/last.ckpt"
    ):
        train(cfg, out_dir=tmp_path / "run")


def test_resumed_run_ends_with_a_final_checkpoint_and_validation(
    signal_at_step, tmp_path, tiny_train_overrides, compose_train
):
    """Saved right before a due validation, then resumed: Lightning skips that validation; we must not."""
    overrides = tiny_train_overrides + ["trainer.val_check_interval=6", "sample.max_new_tokens=0"]
    with pytest.raises(SystemExit):
        train(
            compose_train(overrides + ["trainer.max_steps=100"]),
            out_dir=tmp_path / "a",
            extra_callbacks=[signal_at_step(5)],
        )
    for extra in (1, 2, 3):
        cfg = compose_train(overrides + [f"trainer.max_steps={6 + extra}", f"ckpt_path={tmp_path / 'a'}"])
        history = RecordLosses()
        summary = train(cfg, out_dir=tmp_path / f"b{extra}", extra_callbacks=[history])
        last = read_checkpoint(tmp_path / f"b{extra}" / "checkpoints" / "last.ckpt")
        assert last["global_step"] == summary["steps"] == 6 + extra
        assert summary["val_loss"] is not None


def test_resume_with_another_tokenizer_is_refused(tmp_path, tiny_train_overrides, compose_train):
    """Same vocabulary size, other text: the shapes fit, but the token ids would mean other things."""
    train(compose_train(tiny_train_overrides), out_dir=tmp_path / "a")
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("".join(f"line {i}: zebra quokka {i * 7919 % 1000}\n" for i in range(4000)))
    overrides = [o for o in tiny_train_overrides if not o.startswith("data.path")]
    cfg = compose_train(overrides + [f"data.path={other_corpus}", f"ckpt_path={tmp_path / 'a'}"])
    with pytest.raises(GptMiniError, match="trained with another tokenizer"):
        train(cfg, out_dir=tmp_path / "b")


def test_damaged_token_cache_is_reported_with_the_fix(tmp_path, tiny_train_overrides, compose_train):
    train(compose_train(tiny_train_overrides), out_dir=tmp_path / "a")
    (train_bin,) = (tmp_path / "cache").glob("**/train_000000.bin")
    train_bin.write_bytes(train_bin.read_bytes()[:100])  # a truncated token file
    with pytest.raises(GptMiniError, match=r"token cache .* is damaged .* delete that folder"):
        train(compose_train(tiny_train_overrides), out_dir=tmp_path / "b")


def test_model_vocab_size_other_than_the_tokenizers_is_refused_before_training(
    tmp_path, tiny_train_overrides, compose_train
):
    """nanoGPT's habit (vocab 50304 with GPT-2's 50257 tokens) would let samples pick undecodable ids."""
    cfg = compose_train(tiny_train_overrides + ["model.vocab_size=1000"])
    with pytest.raises(GptMiniError, match=r"model.vocab_size=1000 differs from the tokenizer's 300 tokens"):
        train(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be a whole number"),
        ("trainer.val_check_interval=0.5", "trainer.val_check_interval=0.5 must be a whole number"),
        ("trainer.max_time=abc", r"trainer.max_time='abc' is not DD:HH:MM:SS; give a duration"),
        ("trainer.accelerator=tpu", r"torch_xla.*\(trainer.accelerator\)"),
        ("trainer.accelerator=gpu", "Lightning rejects the trainer settings: No supported gpu backend"),
        ("trainer.devices=0", r"devices=0.*\(trainer.devices\)"),
        ("trainer.precision=nonsense", r"Precision 'nonsense' is invalid.*\(trainer.precision\)"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be an integer >= 1"),
        ("seed=-1", r"seed=-1 must be an integer in 0..4294967295"),
    ],
)
def test_bad_trainer_options_and_seeds_fail_before_any_data_is_read(
    tmp_path, tiny_train_overrides, compose_train, override, message
):
    cfg = compose_train(tiny_train_overrides + [override])
    with pytest.raises(GptMiniError, match=message):
        train(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # nothing was tokenized: the mistake cost seconds


def test_throughput_counts_training_time_only(tmp_path, tiny_train_overrides, compose_train, monkeypatch):
    """A fake clock: every training batch takes 1 s, every validation batch 100 s."""
    import gptmini.training.callbacks as callbacks

    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])

    class Clock(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            now[0] += 1.0

        def on_validation_batch_end(self, *args) -> None:
            now[0] += 100.0

    throughput = callbacks.Throughput(every_n_steps=4)
    overrides = tiny_train_overrides + ["trainer.max_steps=12", "trainer.val_check_interval=6"]
    cfg = compose_train(overrides)
    train(cfg, out_dir=tmp_path / "run", extra_callbacks=[Clock(), throughput])
    # The Clock runs after the run's own Throughput callback but before this one; either way, validation
    # time must not count: 12 steps of 1 s each.
    assert throughput.train_seconds == pytest.approx(12.0, abs=1.0)
    assert throughput.average_tokens_per_s == pytest.approx(12 * 8 * 16 / throughput.train_seconds)


def test_full_disk_while_saving_a_checkpoint_says_the_previous_one_is_intact(
    tmp_path, tiny_train_overrides, compose_train, monkeypatch
):
    import errno

    import gptmini.weights as checkpoint_module

    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, handle):
        saves.append(1)
        if len(saves) > 2:  # step 4 wrote best.ckpt and last.ckpt; step 8's first save fails
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, handle)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_the_disk_fills)
    overrides = tiny_train_overrides + ["trainer.max_steps=12", "trainer.val_check_interval=4"]
    with pytest.raises(
        GptMiniError,
        match=r"cannot write checkpoint .*: the disk is full; the checkpoints already there "
        r"\(best.ckpt, last.ckpt\) are intact",
    ):
        train(compose_train(overrides), out_dir=tmp_path / "run")
    monkeypatch.undo()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert not list(ckpt_dir.glob(".*.tmp"))
    for name in ("best.ckpt", "last.ckpt"):
        assert read_checkpoint(ckpt_dir / name)["global_step"] == 4, name


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda c: c["gptmini"]["model_config"].update(moe_experts=8),
            r"model setting\(s\) 'moe_experts' that",
        ),
        (lambda c: c["gptmini"].update(format=99), r"checkpoint format 99, newer than this gptmini"),
        (lambda c: c.update(gptmini=["not", "a", "mapping"]), "its gptmini entry is a list, not a mapping"),
    ],
)
def test_checkpoint_with_unexpected_contents_names_the_key_and_the_version(
    tmp_path, tiny_train_overrides, compose_train, damage, message
):
    from gptmini.weights import load_checkpoint

    train(compose_train(tiny_train_overrides + ["trainer.max_steps=2"]), out_dir=tmp_path / "a")
    checkpoint = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    checkpoint["gptmini"]["version"] = "9.0.0"
    damage(checkpoint)
    odd = tmp_path / "odd.ckpt"
    torch.save(checkpoint, odd)
    with pytest.raises(GptMiniError, match=message):
        load_checkpoint(odd)
    if "list" not in message:
        with pytest.raises(GptMiniError, match="gptmini 9.0.0"):
            load_checkpoint(odd)


@pytest.mark.slow
def test_ctrl_c_while_tokenizing_exits_130_with_one_line_and_leaves_no_cache(tmp_path, run_cli, write_corpus):
    corpus = write_corpus(tmp_path / "big", n_bytes=12_000_000)  # a few seconds of BPE training
    cache = tmp_path / "cache"
    command = [
        "debug=smoke",
        "data=text",
        f"data.path={corpus}",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "tokenizer.vocab_size=4096",
    ]
    process = run_cli.start("train.py", *command)
    deadline = time.time() + 120
    while time.time() < deadline and not any(cache.glob("**/.*.building")):  # the build folder appeared
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    assert not list(cache.glob("**/meta.json")) and not list(cache.glob("**/.*.tmp"))
