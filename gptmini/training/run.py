"""``train(cfg) -> summary``: the whole training run, importable, so tests call exactly what train.py calls.

It reads as the one-way flow: check every setting → text → tokenizer → token cache → DataModule →
GPTTrainingModule → Lightning's fit → checkpoint → summary. data=chat takes the same path with its own cache
and DataModule (``build_datamodule``); its template goes into every checkpoint (``chat_template``), and
``data.epochs`` sets the run's length (``steps_for_epochs``). Everything the run writes goes into its run
directory: checkpoints/, metrics.csv, samples.txt, loss_curve.png, summary.json.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar, Timer
from omegaconf import DictConfig, OmegaConf

from gptmini.common import GptMiniError, atomic_write_text, say
from gptmini.data.chat_datamodule import ChatDataModule
from gptmini.data.chat_template import get_template, render, to_entry
from gptmini.data.corpus import DataConfig
from gptmini.data.datamodule import ResumableDataModule, TextDataModule
from gptmini.data.token_cache import open_cache, prepare_cache
from gptmini.data.tokenizer import tokenizer_from_spec
from gptmini.threads import AUTO, ThreadChoice, apply_threads, available_cores, training_step_probe
from gptmini.training.callbacks import (
    AlignStepLabels,
    GracefulInterrupt,
    HellaSwagEval,
    LossHistory,
    StopAtMaxSteps,
    TextSamples,
    Throughput,
    TrainingInterrupted,
)
from gptmini.training.checkpointing import AtomicCheckpointIO, check_resumable, check_run_directory
from gptmini.training.config import max_time_seconds
from gptmini.training.finetune import finetune_info, init_source_for, load_init_weights
from gptmini.training.loggers import METRICS_FILE, trim_history
from gptmini.training.module import GPTTrainingModule
from gptmini.training.optim import OptimConfig
from gptmini.training.report import build_summary, print_closing_lines, print_resume_hint
from gptmini.training.settings import check_settings, model_config_from, resolve_loss
from gptmini.training.steps import RunPlan
from gptmini.weights import GPTMINI_KEY, read_checkpoint, resolve_checkpoint


def train(cfg: DictConfig, out_dir: str | Path | None = None, extra_callbacks: list | None = None) -> dict:
    """Train a GPT as ``cfg`` says; return the run summary (also written to ``summary.json``).

    Args:
        cfg: the composed ``configs/train.yaml``.
        out_dir: the run directory; default: Hydra's output directory.
        extra_callbacks: more Lightning callbacks (tests and notebooks use this to look inside a run).
    """
    run_dir = run_directory(out_dir)
    cfg = with_run_dir(cfg, run_dir)
    settings = check_settings(cfg, run_dir)  # every value, before any data is read
    ckpt_path = resolve_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    check_run_directory(run_dir, resume_from=ckpt_path)
    finetune = settings.finetune
    init = init_source_for(cfg.init_from, ckpt_path)  # init_from, or the base of a LoRA run resumed
    if init is not None:
        model_config_from(cfg, None, source=init.model_config)  # a contradicting model.* fails before data
    # The Timer of trainer.max_time: it stops the run, and a time-based schedule reads its progress.
    max_time = settings.trainer_args["max_time"]
    clock = Timer(timedelta(seconds=max_time_seconds(max_time)), interval="step") if max_time else None
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # text → tokenizer → token cache, here rather than in a DataModule's prepare_data hook: the model's
    # vocabulary comes from the tokenizer. A fine-tune tokenizes with its checkpoint's tokenizer.
    init_tokenizer = tokenizer_from_spec(init.tokenizer_spec) if init is not None else None
    if init is not None:
        say(f"init_from: weights and tokenizer ({init_tokenizer.name}) of {init.path}; tokenizer.* is unused")
    cache = open_cache(prepare_cache(settings.data, settings.tokenizer, init_tokenizer))
    model_config = model_config_from(cfg, cache.vocab_size, source=init.model_config if init else None)
    datamodule = build_datamodule(cache, settings.data, model_config.block_size, cfg.seed)
    trainer_args = settings.trainer_args
    if settings.data.epochs is not None:
        steps = steps_for_epochs(
            settings.data, datamodule.train_conversations, trainer_args, settings.world_size
        )
        trainer_args = {**trainer_args, "max_steps": steps}
    plan, trainer_args = plan_run(trainer_args, settings.optim)
    module = GPTTrainingModule(
        model_config=asdict(model_config),
        optim=asdict(settings.optim),
        val_bytes_per_token=datamodule.val_bytes_per_token,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        loss=resolve_loss(cfg.loss, settings.trainer_args["accelerator"]),
        tokenizer_spec=cache.tokenizer_spec,
        run_info={
            "data": settings.data.name,
            "tokenizer_name": cache.tokenizer.name,
            "name": cfg.name,
            **chat_info(settings.data),
            **finetune_info(cfg.init_from, init, finetune),
        },
        finetune=asdict(finetune),
        plan=asdict(plan),
        clock=clock,
    )
    if init is not None:
        load_init_weights(module.model, init, model_config)
    resumed_step = None
    if ckpt_path is not None:
        resumed_step = check_resumable(ckpt_path, model_config, cache.tokenizer_spec, finetune)
        # Rows logged after that checkpoint belong to steps this run trains again.
        trim_history(run_dir / METRICS_FILE, after_step=resumed_step)

    ckpt_dir = run_dir / "checkpoints"
    interrupt, history = GracefulInterrupt(ckpt_dir / "last.ckpt"), LossHistory()
    throughput = Throughput(cfg.throughput_every_n_steps, cfg.peak_flops)
    callbacks = [
        AlignStepLabels(),
        *build_callbacks(cfg),
        throughput,
        history,
        TextSamples(cache.tokenizer, run_dir, settings.sample, cfg.seed, sample_prompt(settings, datamodule)),
        StopAtMaxSteps(),
        *([HellaSwagEval(settings.hellaswag, cache.tokenizer)] if settings.hellaswag.hellaswag_every else []),
        *([clock] if clock else []),
        *(extra_callbacks or []),
        interrupt,  # last: every other callback has seen the step before it saves and leaves the loop
    ]
    trainer = L.Trainer(
        **trainer_args,
        callbacks=callbacks,
        logger=build_loggers(cfg),
        plugins=[AtomicCheckpointIO()],
    )

    use_tensor_cores(trainer)
    threads = set_training_threads(cfg, trainer, module.model, resumed=ckpt_path)
    module.run_info["threads"] = threads.threads  # a resumed run uses the same count (bitwise equal steps)
    say(f"run directory: {run_dir}")
    say(
        f"model: {model_config.n_layer} layers × {model_config.n_head} heads × {model_config.n_embd}, "
        f"{module.model.num_params():,} parameters; vocabulary {model_config.vocab_size}"
    )
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Continuing in its own directory is what a resumed run is meant to do there.
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            # ... and a run resumed into a new directory keeps its own best.ckpt there, by design.
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
            # A weight average (callbacks.ema) runs configure_model early; ours compiles, it never shards.
            warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback with")
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except TrainingInterrupted as stop:
        print_resume_hint(run_dir, trainer.global_step, str(stop))
        raise SystemExit(130) from None
    wall_s = time.perf_counter() - started
    _finish(trainer, module, datamodule, history, ckpt_dir / "last.ckpt", resumed_step)

    summary = build_summary(trainer, module, throughput, history, ckpt_dir, wall_s, datamodule.val_targets)
    summary.update(datamodule.summary_fields)  # data=chat: the conversations used, cut and skipped
    summary["train_time_s"] = clock.time_elapsed() if clock else None  # the clock of trainer.max_time
    summary["threads_choice"] = threads.as_dict()
    if trainer.is_global_zero:
        history.plot(run_dir / "loss_curve.png")
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print_closing_lines(summary)
    return summary


def build_datamodule(cache, data: DataConfig, block_size: int, seed: int) -> ResumableDataModule:
    """The DataModule of the corpus: whole conversations for data=chat, random windows of text otherwise."""
    if data.name == "chat":
        return ChatDataModule(cache, data, block_size, seed=seed)
    return TextDataModule(cache, data, block_size, seed=seed)


def chat_info(data: DataConfig) -> dict:
    """data=chat: the template, for the checkpoint's gptmini entry (what generate.py and the server render
    with: a checkpoint chats in the format it learned)."""
    return {"chat_template": to_entry(get_template(data.template))} if data.name == "chat" else {}


def steps_for_epochs(data: DataConfig, conversations: int, trainer_args: dict, world_size: int) -> int:
    """``data.epochs`` passes over ``conversations`` as optimizer steps (the last may run into the next
    epoch), said once."""
    per_step = data.batch_size * world_size * trainer_args["accumulate_grad_batches"]
    steps = math.ceil(data.epochs * conversations / per_step)
    say(
        f"data.epochs={data.epochs}: {steps} steps of {per_step} conversations over {conversations} training "
        "conversations (instead of trainer.max_steps)"
    )
    return steps


def sample_prompt(settings, datamodule: ResumableDataModule) -> list[int] | None:
    """data=chat: the validation samples reply to ``sample.prompt`` as a user turn, or (when it is empty) to
    the first validation conversation; None for text (TextSamples continues ``sample.prompt``)."""
    if not isinstance(datamodule, ChatDataModule):
        return None
    if settings.sample.prompt:
        template, enc = get_template(settings.data.template), datamodule.cache.tokenizer
        return render(template, [("user", settings.sample.prompt)], enc, add_generation_prompt=True).ids
    return datamodule.sample_prompt_ids()


def set_training_threads(
    cfg: DictConfig, trainer: L.Trainer, model, resumed: Path | None = None
) -> ThreadChoice:
    """Apply ``cfg.threads``; ``auto`` times this run's own training step with 1, 2, 4 … threads.

    Only a single process on the CPU is timed: on a GPU the CPU threads barely matter, and processes that
    share the cores (DDP on a CPU) get Lightning's split of them. A resumed run with ``auto`` keeps the count
    its checkpoint was trained with instead of timing again: another count sums floating-point work in
    another order, and the resumed steps would no longer equal the straight run's bit for bit.
    """
    one_cpu_process = trainer.strategy.root_device.type == "cpu" and trainer.world_size == 1
    timed = cfg.threads == AUTO and one_cpu_process
    # The count the checkpoint was trained with, if it says and this machine has that many cores.
    recorded = read_checkpoint(resumed, mmap=True)[GPTMINI_KEY].get("threads") if timed and resumed else None
    if isinstance(recorded, int) and not isinstance(recorded, bool) and 1 <= recorded <= available_cores():
        choice = apply_threads(recorded)
        choice.how = "checkpoint"
    else:
        probe = training_step_probe(model, cfg.data.batch_size, str(trainer.precision)) if timed else None
        choice = apply_threads(cfg.threads, probe)  # auto without a probe keeps torch's default
    say(choice.describe())
    return choice


def plan_run(trainer_args: dict, optim: OptimConfig) -> tuple[RunPlan, dict]:
    """The run's facts, decided once: its length, the schedule's length, precision and clipping; and the
    Trainer's arguments that follow from them, every interval in optimizer steps. A time budget ends the run
    through ``train``'s clock, a Timer (so Lightning's ``max_time`` is not passed: it would start a second
    Timer), and it has no step limit.
    """
    args = dict(trainer_args)
    by_time = optim.schedule_by == "time"
    max_steps = None if by_time or args["max_steps"] in (None, -1) else int(args["max_steps"])
    plan = RunPlan(
        max_steps=max_steps,
        schedule_steps=None if by_time else (optim.decay_steps or max_steps),
        precision=str(args["precision"]),
        clipping=bool(args.get("gradient_clip_val")),
    )
    # Lightning counts val_check_interval in micro-batches; gptmini counts every interval in optimizer steps.
    val_every = args["val_check_interval"] * args["accumulate_grad_batches"]
    args.update(max_steps=max_steps or -1, max_time=None, val_check_interval=val_every)
    return plan, args


def use_tensor_cores(trainer: L.Trainer) -> None:
    """On a CUDA GPU, let float32 matmuls use TF32 tensor cores (as the benchmarks and nanoGPT do).

    Without it a 32-true run on an Ampere or newer GPU leaves most of the chip idle, and even bf16-mixed keeps
    some float32 matmuls. TF32 rounds the inputs to a 10-bit mantissa; the accumulation stays float32, which
    training tolerates (the loss curves match to noise).
    """
    if trainer.strategy.root_device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def _finish(trainer, module, datamodule, history, last_ckpt: Path, resumed_step: int | None) -> None:
    """Make sure the run ends with a checkpoint and a validation of its final weights.

    StopAtMaxSteps asks Lightning for both on the last step, but Lightning skips that validation in some
    resumed runs (when the resumed checkpoint was written just before a due validation), so check. A resumed
    run that trained no step writes its own checkpoint too (it may run in another directory).
    """
    if module.saved_step != trainer.global_step or resumed_step == trainer.global_step:
        trainer.save_checkpoint(last_ckpt)
    if history.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)


# ---------------------------------------------------------------------------------------------------------
# The swappable leaves: each a ``_target_`` node of the config, instantiated as it stands. Their paths
# interpolate ``${run_dir}`` (configs/callbacks, configs/logger), so nothing here special-cases a name.
# ---------------------------------------------------------------------------------------------------------


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks of ``cfg.callbacks``; a null entry is switched off, and progress bars follow
    ``trainer.enable_progress_bar``."""
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
    if not cfg.trainer.enable_progress_bar:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    """The loggers of ``cfg.logger``; a missing optional package is one line, not a traceback."""
    loggers = []
    for node in (cfg.logger or {}).values():
        if node is None:
            continue
        try:
            loggers.append(instantiate(node))
        except Exception as exc:  # an optional logger's package is missing, most often
            raise GptMiniError(f"cannot create logger {node.get('_target_')}: {exc}") from None
    return loggers


def with_run_dir(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """A copy of ``cfg`` whose ``run_dir`` is this run's directory (outside Hydra there is no default)."""
    cfg = cfg.copy()
    OmegaConf.update(cfg, "run_dir", str(run_dir), force_add=True)
    return cfg


def run_directory(out_dir: str | Path | None) -> Path:
    """The Hydra run directory, or ``out_dir`` when train() is called outside of Hydra."""
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise GptMiniError("train() outside of Hydra needs out_dir=PATH for what the run writes.")
        out_dir = HydraConfig.get().runtime.output_dir
    path = Path(out_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
