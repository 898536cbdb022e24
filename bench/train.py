"""Training-step throughput: gptmini's Lightning path against a plain PyTorch loop on the same model.

The Lightning side is built as ``gptmini.training.train`` builds it: the composed Hydra config, ``GPTTrainingModule``,
``resolve_precision``, the config's callbacks (minus checkpointing) plus ``Throughput``, ``LossHistory`` and
``StopAtMaxSteps``, the CSV logger and the trainer arguments of ``configs/trainer``. Validation is off and the
batches are random tokens of the same (B, T) served by a DataLoader like ``TextDataModule``'s (pinned on
CUDA). The plain loop runs the same model, AdamW groups (fused on CUDA), LR schedule, gradient clipping,
autocast and batches, and reads the loss every ``log_every_n_steps`` as any loop that logs would.

Each run is its own process, so peak memory (CUDA max allocated, or the process's peak RSS on a CPU) and the
compile time are its own; runs alternate (plain, Lightning, plain, ...) over ``--rounds`` so a shared CPU's
changing load hits both alike. Per step: CUDA events (no extra sync) on a GPU, wall clock on a CPU.

    python bench/train.py --cpu-default            # the default tiny model (configs/model/tiny.yaml)
    python bench/train.py --nanogpt-cpu            # nanoGPT's CPU recipe shape: 4L/4H/128, block 64, B 12
    python bench/train.py --gpt2                   # GPT-2 small, bf16-mixed, compile on/off, B 8/16/32 (GPU)
    python bench/train.py --gpt2 --small           # the same settings on a tiny GPT-2-vocabulary model (CPU)
    python bench/train.py --smoke                  # seconds: a 2-layer model, for tests

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from a clone, no install needed

GPT2_VOCAB = 50257


# ---------------------------------------------------------------------------------------------------------
# Settings: each is a list of Hydra overrides on configs/train.yaml plus how to run it.
# ---------------------------------------------------------------------------------------------------------


def setting(name: str, overrides: list[str], **extra) -> dict:
    return {"name": name, "overrides": overrides, **extra}


def cpu_default_settings() -> list[dict]:
    # configs/model/tiny.yaml and configs/data/pystdlib.yaml as they are; the BPE's 4096 tokens.
    return [setting("default tiny, B=40 T=128 (train.yaml)", ["model.vocab_size=4096"])]


def nanogpt_cpu_settings() -> list[dict]:
    # nanoGPT's README CPU recipe (its own model: ~12.7k tokens/s on our 2-core machine). Its model has no
    # biases and an unpadded vocabulary; ours keeps gptmini's defaults (biases, vocabulary padded to 128).
    shape = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64"]
    return [
        setting(
            "nanoGPT CPU shape, B=12 T=64",
            [*shape, "model.dropout=0.0", "data.batch_size=12", "model.vocab_size=65"],
        )
    ]


def gpt2_settings(batches: list[int], compile_modes: list[bool], small: bool) -> list[dict]:
    # GPT-2 small as experiment=gpt2_small trains it, but one optimizer step per batch (no accumulation), so
    # each timed step is a whole forward, backward and AdamW step, as in the nanoGPT reference figures.
    base = ["experiment=gpt2_small", f"model.vocab_size={GPT2_VOCAB}", "trainer.accumulate_grad_batches=1"]
    if small:  # the same code path, sized for a CPU: a 2-layer, 64-wide model keeping the 50k vocabulary
        base += ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"]
    runs = []
    for batch in batches:  # compiled and eager side by side, in the order the batch sizes were given
        for compiled in compile_modes:
            label = f"GPT-2{' (small)' if small else ''} B={batch} {'compiled' if compiled else 'eager'}"
            runs.append(setting(label, [*base, f"data.batch_size={batch}", f"compile={compiled}"]))
    return runs


def smoke_settings() -> list[dict]:
    shape = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16"]
    return [setting("smoke 2L/32, B=4 T=16", [*shape, "data.batch_size=4", "model.vocab_size=256"])]


# ---------------------------------------------------------------------------------------------------------
# One run (in its own process): build the pieces, run warmup + timed steps, report.
# ---------------------------------------------------------------------------------------------------------


def compose(overrides: list[str]):
    """configs/train.yaml composed exactly as train.py composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from gptmini.training.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


class RandomBatches(torch.utils.data.IterableDataset):
    """An endless cycle over a few fixed random (x, y) batches: no tokenizer, no disk, same shapes."""

    def __init__(self, vocab_size: int, batch_size: int, block_size: int, distinct: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab_size, (distinct, batch_size, block_size + 1), generator=gen)
        self.batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]

    def __iter__(self):
        i = 0
        while True:
            yield self.batches[i % len(self.batches)]
            i += 1


def make_loader(vocab_size: int, batch_size: int, block_size: int) -> torch.utils.data.DataLoader:
    # As TextDataModule.train_dataloader: whole batches, the main process, pinned memory on CUDA.
    return torch.utils.data.DataLoader(
        RandomBatches(vocab_size, batch_size, block_size),
        batch_size=None,
        pin_memory=torch.cuda.is_available(),
    )


class StepClock:
    """Timestamps at the end of every step: CUDA events on a GPU (no sync), the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []
        self.first_step_s: float | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stamp(self) -> None:
        if not self.marks:  # the first step: compile, allocator and kernel selection; synced once
            self._sync()
            self.first_step_s = time.perf_counter() - self._t0
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self, warmup: int) -> list[float]:
        """Milliseconds of each step after the first ``warmup`` steps."""
        self._sync()
        marks = self.marks[max(0, warmup - 1) :]
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)]
        return [(b - a) * 1000 for a, b in zip(marks, marks[1:], strict=False)]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def sdpa_context(backend: str):
    """Force one scaled_dot_product_attention backend (flash, efficient, cudnn, math), or torch's pick."""
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "math": "MATH",
    }
    return sdpa_kernel(getattr(SDPBackend, names[backend]))


def run_plain(cfg, model_config, optim_cfg, precision: str, device: torch.device, args) -> tuple:
    """The floor: the same model, optimizer, schedule, clipping, autocast and batches, no framework."""
    from gptmini.model.gpt import GPT
    from gptmini.training.optim import lr_at

    model = GPT(model_config).to(device)
    # The same loss path as GPTTrainingModule's training step (chunked), or forward()'s full logits for comparison.
    loss_fn = model.loss if args.loss == "chunked" else (lambda x, y: model(x, y)[1])
    if cfg.compile:
        mode = None if args.compile_mode == "default" else args.compile_mode
        model.compile(mode=mode)  # forward
        if args.loss == "chunked":
            loss_fn = torch.compile(model.loss, mode=mode)  # as GPTTrainingModule.configure_model does
    optimizer = torch.optim.AdamW(
        model.configure_optimizer_groups(optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
        fused=device.type == "cuda",
    )
    total = args.warmup + args.steps
    decay = optim_cfg.decay_steps or total
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, optim_cfg, decay) / optim_cfg.lr
    )
    clip = cfg.trainer.gradient_clip_val
    log_every = max(1, cfg.trainer.log_every_n_steps)
    if precision == "bf16-mixed":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    elif precision in ("32-true", "32", 32):
        autocast = nullcontext()
    else:
        raise SystemExit(f"the plain loop supports 32-true and bf16-mixed, not {precision!r}")

    loader = make_loader(model_config.vocab_size, cfg.data.batch_size, model_config.block_size)
    clock = StepClock(device)
    clock.start()
    batches = iter(loader)
    for step in range(total):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0:
            loss.item()  # a loop that logs reads its loss now and then (a host sync)
        clock.stamp()
    return model, clock


def run_lightning(cfg, model_config, optim_cfg, precision: str, device: torch.device, args) -> tuple:
    """GPTTrainingModule under a Trainer built as gptmini.training.train builds it (validation off, random batches)."""
    from gptmini.training.module import GPTTrainingModule

    lit_class = GPTTrainingModule if args.loss == "chunked" else StandardLossGPTTrainingModule
    mode = None if args.compile_mode == "default" else args.compile_mode
    lit = lit_class(
        model_config=asdict(model_config), optim=asdict(optim_cfg), compile=cfg.compile, compile_mode=mode
    )

    clock = StepClock(device)
    with tempfile.TemporaryDirectory(prefix="gptmini-bench-") as tmp:
        fit(lit, cfg, Path(tmp), clock, precision, device, args)
    return lit.model, clock


def fit(lit, cfg, run_dir: Path, clock: StepClock, precision: str, device: torch.device, args) -> None:
    import lightning as L
    from omegaconf import OmegaConf

    from gptmini.training.callbacks import LossHistory, Throughput
    from gptmini.training.run import StopAtMaxSteps, build_callbacks, build_loggers

    callbacks = build_callbacks(cfg, run_dir) + [
        Throughput(cfg.throughput_every_n_steps, cfg.peak_flops),
        LossHistory(),
        StopAtMaxSteps(),
        ClockCallback(clock),  # last: its stamp comes after every other callback's end-of-batch work
    ]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.update(
        precision=precision,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,  # no validation: only training steps are timed
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    trainer = L.Trainer(**trainer_args, callbacks=callbacks, logger=build_loggers(cfg, run_dir))
    loader = make_loader(lit.model.config.vocab_size, cfg.data.batch_size, lit.model.config.block_size)
    trainer.fit(lit, train_dataloaders=loader)


def _lit_classes():
    """GPTTrainingModule variants defined lazily so that importing this file does not import Lightning."""
    import lightning as L

    from gptmini.training.module import GPTTrainingModule

    class StandardLoss(GPTTrainingModule):
        """GPTTrainingModule with forward()'s loss (full logits) instead of its chunked one, to compare the two."""

        def configure_model(self) -> None:
            super().configure_model()  # compiles forward when asked; forward is what this loss calls
            self._train_loss = lambda x, y: self.model(x, y)[1]

    class Clock(L.Callback):
        def __init__(self, clock: StepClock) -> None:
            self.clock = clock

        def on_train_start(self, trainer, pl_module) -> None:
            self.clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.clock.stamp()

    return StandardLoss, Clock


def StandardLossGPTTrainingModule(**kwargs):  # noqa: N802 - stands for the class
    return _lit_classes()[0](**kwargs)


def ClockCallback(clock: StepClock):  # noqa: N802 - stands for the class
    return _lit_classes()[1](clock)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_one(spec: dict) -> dict:
    """One (setting, loop) run in this process; returns its figures."""
    from gptmini.training.optim import OptimConfig
    from gptmini.training.perf import mfu, peak_flops
    from gptmini.training.run import model_config_from, resolve_precision

    args = argparse.Namespace(**spec["args"])
    device = pick_device(args.device)
    if args.threads:
        # On a shared CPU, fewer threads than cores avoids OpenMP workers spin-waiting on a busy core.
        torch.set_num_threads(args.threads)
    overrides = list(spec["overrides"])
    if device.type == "cpu":
        overrides.append("trainer.accelerator=cpu")
    overrides += ["callbacks.model_checkpoint=null", f"trainer.enable_progress_bar={args.progress_bar}"]
    cfg = compose(overrides + list(args.override))
    model_config = model_config_from(cfg, cfg.model.vocab_size)
    optim_cfg = OptimConfig(**dict(cfg.optim))
    precision = resolve_precision(cfg.trainer.precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    run = run_plain if spec["loop"] == "plain" else run_lightning
    with sdpa_context(args.sdpa_backend):
        model, clock = run(cfg, model_config, optim_cfg, precision, device, args)

    step_ms = clock.step_ms(args.warmup)
    tokens = cfg.data.batch_size * model_config.block_size
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    tokens_per_s = tokens * len(step_ms) / (sum(step_ms) / 1000)
    peak = peak_flops(device, precision, cfg.peak_flops)
    return {
        "loop": spec["loop"],
        "step_ms": step_ms,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(model.flops_per_token(model_config.block_size), tokens_per_s, peak),
        "first_step_s": clock.first_step_s,
        "peak_mem_mb": peak_mb,
        "precision": precision,
        "n_params": model.num_params(),
    }


# ---------------------------------------------------------------------------------------------------------
# The parent: runs every setting's loops in subprocesses, alternating, then summarises.
# ---------------------------------------------------------------------------------------------------------


def spawn(spec: dict) -> dict:
    """Run one spec in a fresh Python; its last stdout line is its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run failed ({spec['loop']}, {spec['overrides']}): exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Combine the rounds of one loop: median over all timed steps, tokens/s over their total time."""
    steps = [ms for r in runs for ms in r["step_ms"]]
    first = runs[0]
    tokens_per_s = first["tokens_per_step"] * len(steps) / (sum(steps) / 1000)
    mfus = [r["mfu"] for r in runs if r["mfu"] is not None]
    return {
        "ms_per_step_median": statistics.median(steps),
        "ms_per_step_mean": statistics.fmean(steps),
        # The fastest tenth: what the loop costs when a shared CPU's other jobs leave it alone.
        "ms_per_step_p10": statistics.quantiles(steps, n=10)[0] if len(steps) > 1 else steps[0],
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_median": first["tokens_per_step"] / statistics.median(steps) * 1000,
        "mfu": statistics.fmean(mfus) if mfus else None,
        "first_step_s": max(r["first_step_s"] for r in runs),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
        "precision": first["precision"],
        "n_params": first["n_params"],
    }


def machine() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = (
            [
                ln.split(":", 1)[1].strip()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")
            ]
            if cpuinfo.is_file()
            else []
        )
        info["device"] = names[0] if names else platform.processor() or "cpu"
    info["cpus"] = os.cpu_count()
    info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'setting':<34} {'loop':<9} {'ms/step':>8} {'mean':>8} {'p10':>8} {'tokens/s':>10} {'MFU':>6} "
        f"{'peak MB':>8} {'1st step s':>10} {'L/plain':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.get("skipped"):
            print(f"{row['setting']:<34} skipped: {row['skipped']}")
            continue
        for loop in row["loops"]:
            r = row[loop]
            ratio = fmt(row.get("lightning_over_plain"), ".3f") if loop == "lightning" else ""
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            print(
                f"{row['setting']:<34} {loop:<9} {r['ms_per_step_median']:>8.1f} "
                f"{r['ms_per_step_mean']:>8.1f} {r['ms_per_step_p10']:>8.1f} {r['tokens_per_s']:>10,.0f} "
                f"{mfu:>6} {r['peak_mem_mb']:>8.0f} {r['first_step_s']:>10.2f} {ratio:>8}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--cpu-default", action="store_true", help="the default tiny model (the default mode)")
    modes.add_argument("--nanogpt-cpu", action="store_true", help="nanoGPT's CPU recipe shape")
    modes.add_argument("--gpt2", action="store_true", help="GPT-2 small, bf16-mixed, compile on and off")
    modes.add_argument("--smoke", action="store_true", help="a 2-layer model for a few steps (tests)")
    parser.add_argument(
        "--small", action="store_true", help="with --gpt2: a tiny model with GPT-2's vocabulary"
    )
    parser.add_argument("--steps", type=int, help="timed steps per run (default depends on the mode)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default depends on the mode)")
    parser.add_argument(
        "--rounds", type=int, help="alternating runs per loop (default 4 on a CPU, 1 on a GPU)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--batches", default="8,16,32", help="--gpt2 batch sizes (comma-separated)")
    parser.add_argument("--compile", default="both", choices=["both", "on", "off"], help="--gpt2 compile")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    parser.add_argument(
        "--sdpa-backend", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"]
    )
    parser.add_argument(
        "--loss",
        default="chunked",
        choices=["standard", "chunked"],
        help="chunked: GPT.loss, as train.py's step (default); standard: forward()'s full logits",
    )
    parser.add_argument("--loops", default="plain,lightning", help="which loops to run (comma-separated)")
    parser.add_argument("--progress-bar", action="store_true", help="keep the Rich progress bar (Lightning)")
    parser.add_argument(
        "--override", action="append", default=[], help="an extra Hydra override (repeatable)"
    )
    parser.add_argument("--time-budget", type=float, help="seconds; settings not started by then are skipped")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.nanogpt_cpu or args.gpt2 or args.smoke):
        args.cpu_default = True
    defaults = {"cpu_default": (15, 3), "nanogpt_cpu": (60, 10), "gpt2": (30, 5), "smoke": (3, 1)}
    mode = next(m for m in defaults if getattr(args, m))
    steps, warmup = (5, 2) if args.gpt2 and args.small else defaults[mode]
    args.mode = mode.replace("_", "-")
    args.steps = steps if args.steps is None else args.steps
    args.warmup = warmup if args.warmup is None else args.warmup
    if args.rounds is None:
        # A shared CPU's load changes by the second: several short alternating rounds average it out.
        args.rounds = 1 if (pick_device(args.device).type == "cuda" or args.smoke or args.small) else 4
    return args


def settings_for(args: argparse.Namespace) -> list[dict]:
    if args.gpt2:
        compile_modes = {"both": [True, False], "on": [True], "off": [False]}[args.compile]
        return gpt2_settings([int(b) for b in args.batches.split(",")], compile_modes, args.small)
    if args.nanogpt_cpu:
        return nanogpt_cpu_settings()
    if args.smoke:
        return smoke_settings()
    return cpu_default_settings()


def main() -> None:
    args = parse_args()
    if args.run_one:
        quiet()
        print(json.dumps(run_one(json.loads(args.run_one))))
        return
    started = time.perf_counter()
    loops = [loop.strip() for loop in args.loops.split(",") if loop.strip()]
    passed = {k: v for k, v in vars(args).items() if k != "run_one"}
    rows = []
    for s in settings_for(args):
        row = {"setting": s["name"], "overrides": s["overrides"], "loops": loops}
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            row["skipped"] = "time budget spent"
            rows.append(row)
            continue
        runs = {loop: [] for loop in loops}
        for _ in range(args.rounds):
            for loop in loops:
                runs[loop].append(spawn({"loop": loop, "overrides": s["overrides"], "args": passed}))
                print(f"... {s['name']}: {loop} done", file=sys.stderr, flush=True)
        for loop in loops:
            row[loop] = summarise(runs[loop])
        if "plain" in row and "lightning" in row:
            row["lightning_over_plain"] = row["lightning"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
            for stat in ("median", "p10"):
                key = f"ms_per_step_{stat}"
                row[f"lightning_over_plain_{stat}"] = row["plain"][key] / row["lightning"][key]
        rows.append(row)

    info = machine()
    info["threads"] = args.threads or info["threads"]  # the runs' threads (set in each child process)
    print(
        f"bench/train.py --{args.mode}: {info['device']}, torch {info['torch']}, lightning "
        f"{info.get('lightning')}, {info['threads']} threads, load {info['load_avg']}"
    )
    print(
        f"{args.warmup} warmup + {args.steps} timed steps x {args.rounds} round(s); loss {args.loss}, "
        f"sdpa {args.sdpa_backend}, compile mode {args.compile_mode}"
    )
    print_table(rows)
    keys = ("steps", "warmup", "rounds", "loss", "sdpa_backend", "compile_mode")
    summary = {
        "bench": "train",
        "mode": args.mode,
        **{k: getattr(args, k) for k in keys},
        "machine": info,
        "wall_s": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    print(json.dumps(summary))


def quiet() -> None:
    """A run's child process: no Lightning banners or tips on its output (its stdout is one JSON line)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    main()
