"""The recipes beyond GPT-2 through the real training run: every model switch with Muon and WSD through
train → checkpoint → exact resume → generate, and time-budgeted runs (optim.schedule_by=time)."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from gptmini.common import GptMiniError
from gptmini.generation.sampling import SamplingOptions, sample_tokens
from gptmini.training.run import train
from gptmini.weights import load_checkpoint, read_checkpoint

EVERY_SWITCH = [
    "model.pos_emb=rope",
    "model.norm=rmsnorm",
    "model.qk_norm=true",
    "model.mlp=swiglu",
    "model.n_kv_head=1",
    "model.tie_embeddings=false",
    "model.logit_softcap=15",
    "model.unet_skips=true",
    "model.value_embeds=true",
    "model.zero_init_proj=true",
    "optim=muon",
    "optim.embed_lr=0.01",
    "optim.schedule=wsd",
]


def losses_by_step(run_dir) -> dict[int, str]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(handle) if r.get("train/loss")}


def test_every_switch_with_muon_and_wsd_trains_resumes_exactly_and_generates(
    tmp_path, tiny_train_overrides, compose_train
):
    overrides = (
        tiny_train_overrides
        + EVERY_SWITCH
        + [
            "trainer.max_steps=16",
            "trainer.val_check_interval=100",
            "trainer.log_every_n_steps=1",
            "optim.decay_steps=16",  # the schedule's length must not depend on where the first part stops
        ]
    )
    summary = train(compose_train(overrides), out_dir=tmp_path / "straight")
    train(compose_train([*overrides, "trainer.max_steps=8"]), out_dir=tmp_path / "first")
    train(compose_train([*overrides, f"ckpt_path={tmp_path / 'first'}"]), out_dir=tmp_path / "second")

    straight = losses_by_step(tmp_path / "straight")
    first, second = losses_by_step(tmp_path / "first"), losses_by_step(tmp_path / "second")
    assert sorted(straight) == list(range(16)) and sorted(second) == list(range(8, 16))
    assert {**first, **second} == straight  # bitwise: the same printed losses at every step
    assert float(straight[15]) < float(straight[0]) - 0.5
    assert summary["schedule_by"] == "steps"

    loaded = load_checkpoint(tmp_path / "straight")
    config = loaded.model.config
    assert (config.pos_emb, config.mlp, config.n_kv_head, config.logit_softcap) == ("rope", "swiglu", 1, 15.0)
    assert config.unet_skips and loaded.model.skip_weights.shape == (config.n_layer // 2,)
    assert config.value_embeds and len(loaded.model.value_embeds) == config.n_layer
    prompt = torch.tensor(loaded.tokenizer.encode_ordinary("the cat"))
    greedy = SamplingOptions(max_new_tokens=6, temperature=0.0)
    with torch.no_grad():
        cached = [int(t) for t in sample_tokens(loaded.model, prompt, greedy, use_cache=True)]
        uncached = [int(t) for t in sample_tokens(loaded.model, prompt, greedy, use_cache=False)]
    assert cached == uncached and len(cached) == 6


def _lr_floor_share(ckpt_path, peak: float, floor: float) -> float:
    """Where the AdamW rate stored in a checkpoint sits between the floor (0) and the peak (1)."""
    lr = read_checkpoint(ckpt_path)["optimizer_states"][0]["param_groups"][-1]["lr"]
    return (lr - floor) / (peak - floor)


def test_a_time_budgeted_run_ends_on_budget_with_a_finished_schedule(
    tmp_path, tiny_train_overrides, compose_train
):
    overrides = tiny_train_overrides + [
        "optim=adamw",  # _lr_floor_share reads AdamW's state
        "optim.schedule_by=time",
        "trainer.max_time=00:00:00:05",
        "optim.schedule=wsd",
        "optim.decay_fraction=0.5",
        "optim.lr=1e-3",
        "optim.min_lr=1e-4",
        "trainer.val_check_interval=100000",
    ]
    summary = train(compose_train(overrides), out_dir=tmp_path / "run")
    assert summary["schedule_by"] == "time"
    assert summary["train_time_s"] >= 5
    assert summary["steps"] > 12  # trainer.max_steps (12 in debug=smoke) gave way to the time budget
    assert summary["val_loss"] is not None  # the final validation ran
    assert _lr_floor_share(tmp_path / "run" / "checkpoints" / "last.ckpt", 1e-3, 1e-4) < 0.5  # decayed


class TimerAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
        self.elapsed = timer.time_elapsed()


def test_an_interrupted_time_budgeted_run_resumes_with_the_time_it_had_left(
    signal_at_step, tmp_path, tiny_train_overrides, compose_train
):
    run = tmp_path / "run"
    overrides = tiny_train_overrides + [
        "optim.schedule_by=time",
        "trainer.max_time=00:00:00:06",
        "trainer.val_check_interval=100000",
    ]
    with pytest.raises(SystemExit):
        train(compose_train(overrides), out_dir=run, extra_callbacks=[signal_at_step(4)])
    spent = read_checkpoint(run / "checkpoints" / "last.ckpt")["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert 0 < spent < 6

    probe = TimerAtStart()
    summary = train(compose_train([*overrides, f"ckpt_path={run}"]), out_dir=run, extra_callbacks=[probe])
    assert probe.elapsed == pytest.approx(spent, abs=0.5)  # the clock continued, not restarted
    assert summary["train_time_s"] >= 6 and summary["steps"] > 4


def test_a_time_schedule_without_a_time_budget_is_refused(tmp_path, tiny_train_overrides, compose_train):
    with pytest.raises(
        GptMiniError, match="optim.schedule_by=time needs the time budget .* trainer.max_time"
    ):
        train(compose_train(tiny_train_overrides + ["optim.schedule_by=time"]), out_dir=tmp_path / "run")


def test_a_step_schedule_without_a_length_is_refused_before_any_data_is_read(
    tmp_path, tiny_train_overrides, compose_train
):
    # trainer.max_steps=-1 with no optim.decay_steps: the cosine decay has no end. Refused with the settings.
    overrides = [*tiny_train_overrides, "trainer.max_steps=-1"]
    with pytest.raises(GptMiniError, match=r"^the cosine schedule needs a length: set trainer.max_steps"):
        train(compose_train(overrides), out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_kv_head=3", "n_head=2 is not divisible by n_kv_head=3"),
        ("optim.name=lion", "optim.name='lion' is not known"),
        ("model.mlp=geglu", "mlp='geglu' is not known"),
    ],
)
def test_bad_recipe_values_fail_before_any_data(
    tmp_path, tiny_train_overrides, compose_train, override, message
):
    with pytest.raises(GptMiniError, match=message):
        train(compose_train([*tiny_train_overrides, override]), out_dir=tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_the_shakespeare_experiment_is_the_ablations_best_recipe(tmp_path, compose_train):
    """docs/ablations.md's best row, with its 2-minute budget (bench/ablate.py ROWS["best"])."""
    from gptmini.training.run import plan_run
    from gptmini.training.settings import check_settings, model_config_from

    cfg = compose_train(["experiment=shakespeare"])
    config = model_config_from(cfg, tokenizer_vocab=2048)
    assert (config.pos_emb, config.tie_embeddings, config.n_kv_head, config.mlp) == (
        "rope",
        False,
        2,
        "relu2",
    )
    # The race's round 5 (docs/ablations.md): value embeddings, and the weights averaged for what is
    # validated, sampled and saved.
    assert config.value_embeds
    ema = cfg.callbacks.ema
    assert (ema._target_, ema.decay) == ("lightning.pytorch.callbacks.EMAWeightAveraging", 0.98)
    settings = check_settings(cfg, tmp_path)
    assert (settings.optim.name, settings.optim.muon_lr, settings.optim.schedule) == ("muon", 0.02, "wsd")
    # The race's round 3 (docs/ablations.md): the embeddings' own rate, a half-length decay, more decay.
    optim = settings.optim
    rates = (optim.embed_lr, optim.warmup_steps, optim.decay_fraction, optim.weight_decay)
    assert rates == (0.03, 50, 0.5, 0.3)
    assert settings.optim.schedule_by == "time"
    assert settings.trainer_args["max_time"] == "00:00:02:00"
    plan, trainer_args = plan_run(
        settings.trainer_args, settings.optim
    )  # the time budget is the run's length: no step limit
    assert plan.max_steps is None and plan.schedule_steps is None and trainer_args["max_steps"] == -1
