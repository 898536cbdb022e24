"""Training: composed configs, a real (tiny) run end to end, the schedule, config errors, DDP."""

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException

from gptmini.common import GptMiniError, as_config
from gptmini.data.corpus import DataConfig
from gptmini.data.tokenizer import TokenizerConfig
from gptmini.model.config import GPTConfig, declared
from gptmini.model.lora import FinetuneConfig
from gptmini.training.config import ModelSchema, TrainerSchema, compose_config
from gptmini.training.optim import OptimConfig, lr_at
from gptmini.training.run import train
from gptmini.training.settings import model_config_from
from gptmini.weights import load_checkpoint, read_checkpoint

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "experiment").glob("*.yaml"))


def test_smoke_run_writes_checkpoint_summary_plot_and_metrics(tmp_path, tiny_train_overrides, compose_train):
    cfg = compose_train(tiny_train_overrides)
    run_dir = tmp_path / "run"
    summary = train(cfg, out_dir=run_dir)

    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("val_loss", "val_bpb", "train_tokens", "tokens_per_s", "n_params", "wall_s", "checkpoint"):
        assert on_disk[key] is not None, key
    assert on_disk == json.loads(json.dumps(summary))  # JSON round-trips floats exactly
    assert summary["steps"] == 12
    assert summary["train_tokens"] == 12 * 8 * 16
    # bits per byte is the loss in bits spread over the bytes each token stands for
    assert summary["val_bpb"] < summary["val_loss"] / math.log(2)
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert "step" in rows[0]
    assert any(row.get("val/loss") for row in rows)
    assert (run_dir / "samples.txt").read_text().count("sample at step") >= 1

    loaded = load_checkpoint(run_dir)  # self-contained: no dataset, no Hydra needed
    assert loaded.global_step == 12
    assert loaded.tokenizer.n_vocab == 300


def test_loss_falls(tmp_path, tiny_train_overrides, compose_train):
    cfg = compose_train(tiny_train_overrides + ["trainer.max_steps=60", "trainer.val_check_interval=30"])
    summary = train(cfg, out_dir=tmp_path / "run")
    assert summary["val_loss"] < math.log(300) - 1.0


def test_run_shorter_than_validation_interval_still_validates(tmp_path, tiny_train_overrides, compose_train):
    cfg = compose_train(tiny_train_overrides + ["trainer.max_steps=3", "trainer.val_check_interval=1000"])
    summary = train(cfg, out_dir=tmp_path / "run")
    assert summary["val_loss"] is not None and summary["steps"] == 3
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()


def test_init_from_loads_weights_only(tmp_path, tiny_train_overrides, compose_train):
    first = train(compose_train(tiny_train_overrides), out_dir=tmp_path / "a")
    cfg = compose_train(tiny_train_overrides + [f"init_from={tmp_path / 'a'}", "trainer.max_steps=2"])
    second = train(cfg, out_dir=tmp_path / "b")
    assert second["steps"] == 2  # a fresh schedule, not a resume
    assert second["val_loss"] < first["val_loss"] + 0.5


def test_init_from_with_a_contradicting_shape_is_one_line(tmp_path, tiny_train_overrides, compose_train):
    train(compose_train(tiny_train_overrides), out_dir=tmp_path / "a")
    cfg = compose_train(tiny_train_overrides + [f"init_from={tmp_path / 'a'}", "model.n_embd=48"])
    expected = r"model.n_embd=48 contradicts the init_from weights, which have n_embd=32; drop model.n_embd"
    with pytest.raises(GptMiniError, match=expected):
        train(cfg, out_dir=tmp_path / "b")


def test_defaults_live_in_the_dataclasses(compose_train):
    # python train.py trains with the schema's defaults; a group file only overrides what differs.
    cfg = compose_train([])
    assert TrainerSchema(**cfg.trainer) == TrainerSchema()
    assert OptimConfig(**cfg.optim) == OptimConfig(name="muon", schedule="wsd", embed_lr=0.03)  # optim=muon's
    assert OptimConfig(**compose_train(["optim=adamw"]).optim) == OptimConfig()  # GPT-2's recipe: no changes
    assert TokenizerConfig(**cfg.tokenizer) == TokenizerConfig()
    assert DataConfig(**cfg.data) == DataConfig(batch_size=36)  # data=pystdlib's one change


def test_a_config_node_becomes_its_dataclass_one_way(compose_train):
    # as_config resolves Hydra's node to plain values first: a ListConfig would fail the list check.
    finetune = as_config(compose_train(["finetune=lora"]).finetune, FinetuneConfig, "finetune")
    assert type(finetune.targets) is list and finetune.dropout == 0.05


def test_every_model_field_is_settable_from_the_command_line(compose_train):
    # The model schema is derived from GPTConfig: a new field needs no second edit to be an override.
    names = [f.name for f in dataclasses.fields(GPTConfig)]
    # ... plus "attention", kept only to answer it in one line (the option moved to gptmini/book).
    assert [f.name for f in dataclasses.fields(ModelSchema)] == ["size", *names, "attention"]
    overrides = {"n_kv_head": 2, "logit_softcap": 15.0, "pos_emb": "rope", "dropout": 0.1}
    cfg = compose_train([f"model.{k}={v}" for k, v in overrides.items()])
    config = model_config_from(cfg, tokenizer_vocab=None)
    assert {k: getattr(config, k) for k in overrides} == overrides


def test_export_and_fine_tuning_read_each_fields_declaration():
    # Every switch beyond GPT-2 declares the value GPT-2's format needs: its default.
    assert declared("gpt2") == {
        name: getattr(GPTConfig(), name)
        for name in (
            "pos_emb",
            "norm",
            "qk_norm",
            "mlp",
            "n_kv_head",
            "tie_embeddings",
            "logit_softcap",
            "unet_skips",
            "value_embeds",
        )
    }
    rules = declared("finetune")
    assert rules["dropout"] == "free" and rules["block_size"] == "shorter" and rules["n_embd"] == "same"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, compose_train):
    cfg = compose_train([f"experiment={experiment}"])
    assert model_config_from(cfg, tokenizer_vocab=None).n_layer > 0 and cfg.trainer.max_steps > 0


def test_default_config_is_the_offline_cpu_recipe(compose_train):
    cfg = compose_train()
    assert cfg.data.name == "pystdlib" and cfg.tokenizer.name == "bpe"
    assert cfg.trainer.devices == 1


@pytest.mark.parametrize(
    "override, error",
    [
        ("model.n_layr=4", ConfigCompositionException),
        ("optim.lr=fast", ConfigCompositionException),
        ("trainer.max_stepz=10", ConfigCompositionException),
        ("model.sise=tiny", ConfigCompositionException),
    ],
)
def test_config_typos_fail_at_compose_time_naming_the_key(override, error, compose_train):
    with pytest.raises(error) as info:
        compose_train([override])
    text = str(info.value) + str(info.value.__cause__)
    assert override.split("=")[0].split(".")[-1] in text or override.split("=")[1] in text


# A weight average of the kind experiment=shakespeare carries (callbacks.ema), at a decay that moves fast.
EMA = "+callbacks.ema={_target_: lightning.pytorch.callbacks.EMAWeightAveraging, decay: 0.8}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_embd=33", "n_embd"),
        ("model.block_size=0", "block_size"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("data.batch_size=0", "batch_size"),
        ("tokenizer.vocab_size=100", "vocab_size"),
        ("model.attention=flash9", "attention"),
        ("model.size=huge", "unknown model size 'huge'; valid: tiny"),
        ("sample.top_k=0", "sample.top_k must be >= 1"),
        ("sample.temperature=-1", "sample.temperature must be >= 0"),
        ("sample.max_new_tokens=-3", "sample.max_new_tokens must be a whole number >= 0"),
        ("sample.max_new_tokens=100000", "sample.max_new_tokens=100000 is too long for a sample"),
        ("threads=0", "threads=0 must be auto"),
        ("trainer.gradient_clip_val=nan", "trainer.gradient_clip_val=nan must be a finite number"),
        ("threads=1000", "threads=1000 is more than the .* CPU cores this process may use"),
        ("trainer.max_time=60", "trainer.max_time=60 has no unit; give a duration"),
        ("trainer.max_time=-5", "trainer.max_time=-5 has no unit"),
        ("trainer.max_time=00:00:00:00", "trainer.max_time='00:00:00:00' is no time at all"),
        ("trainer.max_time=00:00:-1:00", "is not DD:HH:MM:SS"),
        ("trainer.max_time=99999999999:00:00:00", "is too long for a duration"),
        ("+trainer.max_time.minutes=-1", "must map days, hours, minutes, seconds to numbers >= 0"),
        (EMA.replace("0.8", "1.5"), r"callbacks.ema.decay=1.5 must be a number in \[0, 1\); try 0.98"),
        (EMA.replace("0.8", "fast"), r"callbacks.ema.decay='fast' must be a number in \[0, 1\)"),
    ],
)
def test_nonsensical_values_raise_clear_errors(
    tmp_path, tiny_train_overrides, override, message, compose_train
):
    cfg = compose_train(tiny_train_overrides + [override])
    with pytest.raises(GptMiniError, match=message):
        train(cfg, out_dir=tmp_path / "run")


def test_zero_time_budget_with_a_time_schedule_is_refused(tmp_path, tiny_train_overrides, compose_train):
    overrides = ["optim.schedule_by=time", "trainer.max_time=00:00:00:00"]
    with pytest.raises(GptMiniError, match="no time at all"):
        train(compose_train(tiny_train_overrides + overrides), out_dir=tmp_path / "run")


@pytest.mark.parametrize("target", ["file", "under_a_file"])
def test_a_run_directory_that_is_a_file_is_one_line(tmp_path, run_cli, target):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    run_dir = blocker if target == "file" else blocker / "run"
    result = run_cli("train.py", "debug=smoke", f"hydra.run.dir={run_dir}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: hydra.run.dir={run_dir} is (or lies under) a file, not a directory; "
        "choose another hydra.run.dir=DIR."
    )
    assert blocker.read_text() == "not a directory"


def test_a_read_only_run_directory_is_one_line(tmp_path, monkeypatch, capsys):
    """A read-only disk (EROFS) cannot be made in a test run as root; the OS's answer is simulated."""
    import errno
    from pathlib import Path

    from gptmini.training.run_dir import make_output_directory

    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(SystemExit) as stop:
        make_output_directory(str(tmp_path / "ro"), "hydra.run.dir")
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: cannot write the run directory hydra.run.dir={tmp_path / 'ro'} ({tmp_path / 'ro'}): no "
        "permission to write there (read-only or owned by another user); choose another hydra.run.dir=DIR.\n"
    )


def test_precision_auto_is_full_precision_on_the_cpu():
    from gptmini.training.settings import resolve_precision

    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # an explicit choice is kept


def test_loss_curve_shows_the_real_loss_under_gradient_accumulation(
    tmp_path, tiny_train_overrides, compose_train
):
    from gptmini.training.callbacks import LossHistory

    class ProbeHistory(LossHistory):  # the run's own LossHistory is a stateful callback: another state key
        pass

    history = ProbeHistory()
    overrides = tiny_train_overrides + [
        "trainer.accumulate_grad_batches=4",
        "trainer.val_check_interval=8",
        "trainer.max_steps=4",
    ]
    summary = train(compose_train(overrides), out_dir=tmp_path / "run", extra_callbacks=[history])
    last_logged = history.train[-1][1]
    assert last_logged == pytest.approx(summary["train_loss"], rel=1e-5)
    assert last_logged > 3.0  # not divided by the accumulation factor


def test_schedule_warms_up_then_decays_to_the_floor():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, optim, 100) == pytest.approx(1e-4)
    assert lr_at(9, optim, 100) == pytest.approx(1e-3)
    assert lr_at(10, optim, 100) == pytest.approx(1e-3)
    assert lr_at(55, optim, 100) == pytest.approx(5.5e-4)
    assert lr_at(100, optim, 100) == pytest.approx(1e-4)
    assert lr_at(500, optim, 100) == pytest.approx(1e-4)
    lrs = [lr_at(s, optim, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_cli_bad_value_exits_2_with_one_line_and_no_traceback(tmp_path, run_cli):
    result = run_cli("train.py", "model.n_embd=33", f"hydra.run.dir={tmp_path}", f"data.cache_dir={tmp_path}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_on_different_windows_and_agree(tmp_path, tiny_train_overrides, run_cli):
    """Two gloo processes: each rank sees its own windows; DDP keeps the weights identical."""
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT)
    overrides = tiny_train_overrides + [
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=4",
        "trainer.val_check_interval=1000",
    ]
    result = run_cli(str(script), str(tmp_path / "run"), *overrides, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [torch.load(tmp_path / "run" / f"rank{r}.pt") for r in range(2)]
    assert not torch.equal(seen[0]["first_batch"], seen[1]["first_batch"])
    for name, tensor in seen[0]["weights"].items():
        assert torch.equal(tensor, seen[1]["weights"][name]), name


class RecordWeights(L.Callback):
    """The model's weights after every optimizer step, in order."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_a_weight_average_is_what_is_validated_and_saved_and_never_changes_training(
    tmp_path, tiny_train_overrides, compose_train
):
    plain, averaged = RecordWeights(), RecordWeights()
    train(compose_train(tiny_train_overrides), out_dir=tmp_path / "plain", extra_callbacks=[plain])
    train(compose_train([*tiny_train_overrides, EMA]), out_dir=tmp_path / "ema", extra_callbacks=[averaged])
    # The weights being trained follow the plain run step for step.
    assert len(plain.after_step) == len(averaged.after_step) == 12
    for ours, theirs in zip(averaged.after_step, plain.after_step, strict=True):
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # The checkpoint's weights are the average: w_1, then avg <- 0.8 avg + 0.2 w_k after each step k.
    expected = dict(plain.after_step[0])
    for weights in plain.after_step[1:]:
        expected = {k: 0.8 * expected[k] + 0.2 * weights[k] for k in weights}
    checkpoint = read_checkpoint(tmp_path / "ema" / "checkpoints" / "last.ckpt")
    for name, value in expected.items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(checkpoint["current_model_state"][k], v) for k, v in plain.after_step[-1].items())
    # The last validation scored the average, which the plain run's weights do not reproduce.
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("plain", "ema")]
    assert summaries[0]["val_loss"] != summaries[1]["val_loss"]
    model = load_checkpoint(tmp_path / "ema" / "checkpoints" / "last.ckpt").model  # what generate.py loads
    assert all(torch.equal(p, checkpoint["state_dict"]["model." + n]) for n, p in model.state_dict().items())


@pytest.mark.slow
def test_ddp_from_the_command_line_starts_its_second_process(tmp_path, tiny_train_overrides, repo_root):
    """Lightning starts rank 1 by running the command again: it must be the user's own, not Hydra's.
    (``python -m gptmini train`` takes the same path: Lightning runs ``-m`` with the same argv.)"""
    run_dir = tmp_path / "run"
    overrides = [*tiny_train_overrides, "trainer.devices=2", "trainer.strategy=ddp"]
    overrides += ["trainer.accelerator=cpu", "trainer.max_steps=3", "threads=1", f"hydra.run.dir={run_dir}"]
    command = [sys.executable, "train.py", *overrides]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    config = compose_config(tiny_train_overrides)
    rows = config.data.batch_size * config.model.block_size
    assert summary["train_tokens"] == 3 * rows * 2  # both ranks' batches, every step
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1's own Hydra job
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


DDP_SCRIPT = """
import sys
from pathlib import Path
from pathlib import Path

import lightning as L
import torch

from hydra import compose, initialize_config_dir

from gptmini.training.config import register_configs
from gptmini.training.run import train

register_configs()


class Record(L.Callback):
    def __init__(self, out):
        self.out, self.first = out, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = batch[0].clone()

    def on_train_end(self, trainer, pl_module):
        weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        record = {"first_batch": self.first, "weights": weights}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
    cfg = compose(config_name="train", overrides=sys.argv[2:])
train(cfg, out_dir=out, extra_callbacks=[Record(out)])
"""


@pytest.mark.slow
def test_compiled_training_saves_plain_keys_that_load_uncompiled(
    tmp_path, tiny_train_overrides, compose_train
):
    cfg = compose_train(
        tiny_train_overrides + ["compile=true", "trainer.max_steps=2", "sample.max_new_tokens=4"]
    )
    import lightning as L
    from torch._dynamo.utils import counters

    class GraphsAfterFirstStep(L.Callback):
        graphs = None

        def on_train_batch_end(self, trainer, *args) -> None:
            if self.graphs is None:  # before any validation: only the training step can have compiled
                self.graphs = counters["stats"]["unique_graphs"]

    counters.clear()
    probe = GraphsAfterFirstStep()
    train(cfg, out_dir=tmp_path / "run", extra_callbacks=[probe])
    assert probe.graphs >= 1, "the training step ran uncompiled"
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert not [key for key in state if "_orig_mod" in key]
    loaded = load_checkpoint(tmp_path / "run")  # a plain, uncompiled GPT
    logits, _ = loaded.model(torch.zeros(1, 4, dtype=torch.long))
    assert torch.isfinite(logits).all()


def test_a_fresh_run_warns_about_nothing_it_does_itself(
    tmp_path, tiny_train_overrides, compose_train, recwarn
):
    """Lightning's CSVLogger used to warn that the (fresh) run directory "exists and is not empty" and that
    earlier logs "will be deleted": the run directory always holds Hydra's .hydra/ first."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    train(compose_train(tiny_train_overrides), out_dir=run)
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "exists and is not empty" in m or "will be deleted" in m], messages


def test_model_summary_counts_real_flops(tiny_train_overrides, compose_train):
    """The model summary's FLOPs column read 0: Lightning counts them only with an example input."""
    from dataclasses import asdict

    from lightning.pytorch.utilities.model_summary import ModelSummary

    from gptmini.training.module import GPTTrainingModule

    config = model_config_from(compose_train(tiny_train_overrides), tokenizer_vocab=300)
    module = GPTTrainingModule(asdict(config))
    # At least the matmuls of every layer's weights, once per position of one context.
    assert (
        ModelSummary(module).total_flops
        >= 2 * config.block_size * module.model.num_params(non_embedding=True) // 2
    )


def test_the_loss_plot_leaves_matplotlibs_backend_alone(tmp_path):
    import matplotlib

    from gptmini.training.callbacks import LossHistory

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        history = LossHistory()
        history.train, history.val = [(0, 5.0), (100, 4.0)], [(100, 4.2)]
        path = history.plot(tmp_path / "curve.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend().lower() == "pdf"
    finally:
        matplotlib.use(before)
