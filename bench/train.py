"""Training-step throughput: gptmini's Lightning path against a plain PyTorch loop on the same model.

Lightning is set up as ``gptmini.training.run.train`` sets it up (``trainer_arguments``, ``build_callbacks``
minus checkpointing, ``build_loggers``) without validation; the plain loop runs the same model,
``build_optimizer``, ``build_lr_schedule``, clipping and autocast. Both get the same random batches from a
DataLoader. Each run is its own process (its own peak memory and compile time); runs alternate over
``--rounds``. Modes: ``--cpu-default`` (model.size=tiny, B=36, the default optimizer), ``--nanogpt-cpu``
(model.size=mini, B=12), ``--gpt2`` (GPT-2 small, bf16-mixed, compile on/off, on a GPU; ``--small``: 2 layers,
for a CPU) and ``--smoke`` (seconds, for tests). Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptmini import GPT
from gptmini.common import as_config, pick_device
from gptmini.threads import AUTO, apply_threads, training_step_probe
from gptmini.training import run, settings
from gptmini.training.callbacks import LossHistory, StopAtMaxSteps, Throughput
from gptmini.training.config import compose_config
from gptmini.training.module import GPTTrainingModule
from gptmini.training.optim import OptimConfig, build_lr_schedule, build_optimizer
from gptmini.training.perf import flops_per_token, mfu, peak_flops

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = {"cpu_default": (15, 3), "nanogpt_cpu": (60, 10), "gpt2": (30, 5), "smoke": (3, 1)}  # steps, warmup


def settings_for(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, Hydra overrides on configs/train.yaml) for each setting of the mode."""
    if args.mode == "smoke":
        shape = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16"]
        return [("smoke 2L/32, B=4 T=16", [*shape, "data.batch_size=4", "model.vocab_size=256"])]
    if args.mode == "nanogpt-cpu":  # nanoGPT's README CPU recipe; gptmini's biases and padded vocabulary
        nanogpt = ["model.size=mini", "data.batch_size=12", "model.vocab_size=65"]
        return [("nanoGPT CPU shape, B=12 T=64", nanogpt)]
    if args.mode == "cpu-default":  # the default model and data config as they are; the BPE's 4096 tokens
        return [("default tiny, B=36 T=128 (train.yaml)", ["model.vocab_size=4096"])]
    # GPT-2 small as experiment=gpt2_small trains it, but one optimizer step per batch (no accumulation).
    base = ["experiment=gpt2_small", "model.vocab_size=50257", "trainer.accumulate_grad_batches=1"]
    if args.small:  # the same code path, sized for a CPU: a 2-layer, 64-wide model keeping the 50k vocabulary
        base += ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"]
    label = "GPT-2 (small)" if args.small else "GPT-2"
    compiled = {"both": [True, False], "on": [True], "off": [False]}[args.compile]
    return [
        (f"{label} B={b} {'compiled' if c else 'eager'}", [*base, f"data.batch_size={b}", f"compile={c}"])
        for b in args.batches.split(",")
        for c in compiled
    ]


class RandomBatches(torch.utils.data.IterableDataset):
    """An endless cycle over a few fixed random (x, y) batches: no tokenizer, no disk, same shapes."""

    def __init__(self, vocab_size: int, batch_size: int, block_size: int) -> None:
        tokens = torch.randint(0, vocab_size, (4, batch_size, block_size + 1), generator=torch.Generator())
        self.batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]

    def __iter__(self):
        return itertools.cycle(self.batches)


class StepClock:
    """A mark at the start and after every step: a CUDA event on a GPU (no sync), the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda, self.marks = device, device.type == "cuda", []

    def stamp(self) -> None:
        if len(self.marks) < 2 and self.cuda:  # the start and the first step (compile, allocator) are synced
            torch.cuda.synchronize(self.device)
        self.marks.append(torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter())
        if self.cuda:
            self.marks[-1].record()

    def step_ms(self, first: int = 0) -> list[float]:
        """Milliseconds of each step from step ``first`` (0-based) on."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        pairs = zip(self.marks[first:], self.marks[first + 1 :], strict=False)
        return [a.elapsed_time(b) if self.cuda else (b - a) * 1000 for a, b in pairs]


def run_plain(cfg, targs: dict, model_config, optim, loader, clock: StepClock, device, loss_kind: str):
    """The floor: the same model, optimizer, schedule, clipping, autocast and batches, no framework."""
    model = GPT(model_config).to(device)
    loss_fn = model.loss if loss_kind == "chunked" else (lambda x, y: model(x, y)[1])  # or full logits
    if cfg.compile:  # as GPTTrainingModule.configure_model: forward in place, the chunked loss on its own
        model.compile(mode=cfg.compile_mode)
        loss_fn = torch.compile(model.loss, mode=cfg.compile_mode) if loss_kind == "chunked" else loss_fn
    optimizer = build_optimizer(model, optim, device)
    schedule = build_lr_schedule(optimizer, optim, optim.decay_steps or targs["max_steps"])
    if targs["precision"] not in ("bf16-mixed", "32-true", "32", 32):
        raise SystemExit(f"the plain loop supports 32-true and bf16-mixed, not {targs['precision']!r}")
    clock.stamp()
    for step, (x, y) in zip(range(targs["max_steps"]), loader, strict=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=targs["precision"] == "bf16-mixed"):
            loss = loss_fn(x, y)
        loss.backward()
        if targs["gradient_clip_val"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), targs["gradient_clip_val"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, targs["log_every_n_steps"]) == 0:
            loss.item()  # a loop that logs reads its loss now and then (a host sync)
        clock.stamp()
    return model


def run_lightning(cfg, targs: dict, model_config, optim, loader, clock: StepClock, device, loss_kind: str):
    """GPTTrainingModule under a Trainer set up as gptmini.training.run.train sets it up."""

    class Clock(L.Callback):  # a mark at the start, then one after every batch
        def on_train_start(self, *_) -> None:
            clock.stamp()

        def on_train_batch_end(self, *_) -> None:
            clock.stamp()

    plan, targs = run.plan_run(targs, optim)  # as train() decides it
    lit = GPTTrainingModule(
        asdict(model_config),
        asdict(optim),
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        loss=loss_kind,
        plan=asdict(plan),
    )
    callbacks = run.build_callbacks(cfg) + [Throughput(cfg.throughput_every_n_steps, cfg.peak_flops)]
    callbacks += [LossHistory(), StopAtMaxSteps(), Clock()]  # Clock last: after the others' end-of-batch work
    L.Trainer(**targs, callbacks=callbacks, logger=run.build_loggers(cfg)).fit(lit, loader)
    return lit.model


def train_config(overrides: list[str], args: argparse.Namespace, device: torch.device) -> DictConfig:
    """configs/train.yaml composed as train.py composes it, with a setting's and the command's overrides."""
    accelerator = "gpu" if device.type == "cuda" else device.type
    mode = "null" if args.compile_mode == "default" else args.compile_mode
    ours = [f"trainer.accelerator={accelerator}", f"compile_mode={mode}", "callbacks.model_checkpoint=null"]
    ours.append(f"trainer.enable_progress_bar={args.progress_bar}")
    return compose_config([*overrides, *ours, *args.override])


def run_one(loop: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """One (setting, loop) run in this process; returns its figures."""
    device = pick_device(args.device)
    cfg = train_config(overrides, args, device)
    model_config = settings.model_config_from(cfg, cfg.model.vocab_size)
    # As train.py: "auto" times this setting's own step with 1, 2, 4 ... threads on a CPU.
    auto = args.threads == AUTO and device.type == "cpu"
    precision = settings.resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    probe = training_step_probe(GPT(model_config), cfg.data.batch_size, precision) if auto else None
    threads = apply_threads(args.threads or None, probe)  # 0: torch's default; auto untimed: the same
    torch.manual_seed(cfg.seed)
    batches = RandomBatches(model_config.vocab_size, cfg.data.batch_size, model_config.block_size)
    # As TextDataModule.train_dataloader: whole batches, the main process, pinned memory on CUDA.
    loader = torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=device.type == "cuda")
    backend = "MATH" if args.sdpa_backend == "math" else f"{args.sdpa_backend.upper()}_ATTENTION"
    sdpa = nullcontext() if args.sdpa_backend == "auto" else sdpa_kernel(getattr(SDPBackend, backend))
    clock = StepClock(device)
    with tempfile.TemporaryDirectory(prefix="gptmini-bench-") as run_dir, sdpa:
        cfg = run.with_run_dir(cfg, Path(run_dir))  # what the loggers write goes there
        targs = settings.trainer_arguments(cfg, Path(run_dir))  # training steps only: no validation/summary
        targs.update(max_steps=args.warmup + args.steps, limit_val_batches=0, enable_model_summary=False)
        run_loop = run_plain if loop == "plain" else run_lightning
        loss = settings.resolve_loss(args.loss, cfg.trainer.accelerator)
        model = run_loop(
            cfg, targs, model_config, as_config(cfg.optim, OptimConfig, "optim"), loader, clock, device, loss
        )

    step_ms = clock.step_ms(args.warmup)  # the timed steps, after the warmup
    tokens = cfg.data.batch_size * model_config.block_size
    tokens_per_s = tokens * len(step_ms) / (sum(step_ms) / 1000)
    peak = peak_flops(device, targs["precision"], cfg.peak_flops)
    if device.type == "cuda":  # this process's own peak: each run is a fresh process
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "loop": loop, "step_ms": step_ms, "tokens_per_step": tokens, "tokens_per_s": tokens_per_s,
        "mfu": mfu(flops_per_token(model, model_config.block_size), tokens_per_s, peak),
        "first_step_s": clock.step_ms()[0] / 1000,  # compile, allocator and kernel selection
        "precision": targs["precision"], "n_params": model.num_params(), "peak_mem_mb": peak_mb,
        "threads": threads.threads, "threads_how": threads.how,
    }  # fmt: skip


def spawn(loop: str, overrides: list[str]) -> dict:
    """Run one (setting, loop) in a fresh Python with this command's arguments; its last line is its JSON."""
    command = [sys.executable, __file__, *sys.argv[1:], "--run-one", json.dumps([loop, overrides])]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:  # its stderr (Lightning's banners and warnings) is shown only when it fails
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run failed ({loop}, {overrides}): exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Combine the rounds of one loop: median over all timed steps, tokens/s over their total time."""
    steps, tokens = [ms for r in runs for ms in r["step_ms"]], runs[0]["tokens_per_step"]
    mfus = [r["mfu"] for r in runs if r["mfu"] is not None]
    return {
        "ms_per_step_median": statistics.median(steps), "ms_per_step_mean": statistics.fmean(steps),
        # The fastest tenth: what the loop costs when a shared CPU's other jobs leave it alone.
        "ms_per_step_p10": statistics.quantiles(steps, n=10)[0] if len(steps) > 1 else steps[0],
        "tokens_per_s": tokens * len(steps) / (sum(steps) / 1000),
        "tokens_per_s_median": tokens / statistics.median(steps) * 1000,
        "mfu": statistics.fmean(mfus) if mfus else None, "first_step_s": max(r["first_step_s"] for r in runs),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in runs), "precision": runs[0]["precision"],
        # Each run's own thread count ("1,2" when auto chose differently between rounds).
        "threads": ",".join(str(n) for n in sorted({r["threads"] for r in runs})),
        "n_params": runs[0]["n_params"],
    }  # fmt: skip


def machine(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpus = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "torch": torch.__version__, "python": platform.python_version(), "lightning": L.__version__,
        "threads": threads or torch.get_num_threads(),  # asked for; each run's own is in its row
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else (cpus or ["cpu"])[0],
        "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip


# The table's columns after setting and loop: (header, summary key, width, format).
COLUMNS = [
    ("ms/step", "ms_per_step_median", 8, ".1f"), ("mean", "ms_per_step_mean", 8, ".1f"),
    ("p10", "ms_per_step_p10", 8, ".1f"), ("tokens/s", "tokens_per_s", 10, ",.0f"), ("MFU", "mfu", 6, ".1%"),
    ("peak MB", "peak_mem_mb", 8, ".0f"), ("1st step s", "first_step_s", 10, ".2f"),
    ("threads", "threads", 7, "s"),
]  # fmt: skip


def print_table(rows: list[dict]) -> None:
    header = " ".join([f"{'setting':<34} {'loop':<9}", *(f"{c[0]:>{c[2]}}" for c in COLUMNS), " L/plain"])
    print(f"{header}\n{'-' * len(header)}")
    for row in rows:
        for loop in [] if row.get("skipped") else row["loops"]:
            values = [(row[loop][key], width, spec) for _, key, width, spec in COLUMNS]
            cells = [f"{'n/a' if v is None else format(v, spec):>{width}}" for v, width, spec in values]
            ratio = f"{row['lightning_over_plain']:>7.3f}" if loop == "lightning" and row.get("plain") else ""
            print(f"{row['setting']:<34} {loop:<9}", *cells, ratio)
        if row.get("skipped"):
            print(f"{row['setting']:<34} skipped: {row['skipped']}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add, modes = parser.add_argument, parser.add_mutually_exclusive_group()
    modes.add_argument("--cpu-default", action="store_true", help="the default tiny model (the default mode)")
    modes.add_argument("--nanogpt-cpu", action="store_true", help="nanoGPT's CPU recipe shape")
    modes.add_argument("--gpt2", action="store_true", help="GPT-2 small, bf16-mixed, compile on and off")
    modes.add_argument("--smoke", action="store_true", help="a 2-layer model for a few steps (tests)")
    add("--small", action="store_true", help="with --gpt2: a tiny model with GPT-2's vocabulary")
    add("--steps", type=int, help="timed steps per run (default depends on the mode)")
    add("--warmup", type=int, help="untimed steps first (default depends on the mode)")
    add("--rounds", type=int, help="alternating runs per loop (default 4 on a CPU, 1 on a GPU)")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1")
    add(
        "--threads",
        default="0",
        type=lambda v: v if v == AUTO else int(v),
        help="CPU threads: a number, auto (timed per setting, as train.py does) or 0 (torch's default)",
    )
    add("--batches", default="8,16,32", help="--gpt2 batch sizes (comma-separated)")
    add("--compile", default="both", choices=["both", "on", "off"], help="--gpt2 compile")
    add("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune",
        "max-autotune-no-cudagraphs"])  # fmt: skip
    add("--sdpa-backend", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"])
    add("--loss", default="auto", choices=["auto", "standard", "chunked"],
        help="auto: as train.py (standard on a GPU, chunked else); chunked: GPT.loss; standard: forward()'s "
        "full logits")  # fmt: skip
    add("--loops", default="plain,lightning", help="which loops to run (comma-separated)")
    add("--progress-bar", action="store_true", help="keep the Rich progress bar (Lightning)")
    add("--override", action="append", default=[], help="an extra Hydra override (repeatable)")
    add("--time-budget", type=float, help="seconds; settings not started by then are skipped")
    add("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    mode = next((m for m in MODES if getattr(args, m)), "cpu_default")
    steps, warmup = (5, 2) if args.gpt2 and args.small else MODES[mode]
    args.mode, args.steps = mode.replace("_", "-"), steps if args.steps is None else args.steps
    args.warmup = warmup if args.warmup is None else args.warmup
    if args.rounds is None:  # a shared CPU's load changes by the second: short alternating rounds average it
        args.rounds = 1 if (mode == "smoke" or args.small or pick_device(args.device).type == "cuda") else 4
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.run_one:  # a child: its stdout is one JSON line
        print(json.dumps(run_one(*json.loads(args.run_one), args)))
        return
    started, loops, rows = time.perf_counter(), [s.strip() for s in args.loops.split(",") if s.strip()], []
    for name, overrides in settings_for(args):
        rows.append(row := {"setting": name, "overrides": overrides, "loops": loops})
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            row["skipped"] = "time budget spent"
            continue
        runs = {loop: [] for loop in loops}
        for _, loop in itertools.product(range(args.rounds), loops):  # plain, lightning, plain, ...
            runs[loop].append(spawn(loop, overrides))
            print(f"... {name}: {loop} done", file=sys.stderr, flush=True)
        row.update({loop: summarise(runs[loop]) for loop in loops})
        if {"plain", "lightning"} <= row.keys():  # tokens/s ratio, then speed ratios of step times
            plain, lit = row["plain"], row["lightning"]
            row["lightning_over_plain"] = lit["tokens_per_s"] / plain["tokens_per_s"]
            row["lightning_over_plain_median"] = plain["ms_per_step_median"] / lit["ms_per_step_median"]
            row["lightning_over_plain_p10"] = plain["ms_per_step_p10"] / lit["ms_per_step_p10"]

    info = machine(args.threads)
    print(
        f"bench/train.py --{args.mode}: {info['device']}, torch {info['torch']}, lightning "
        f"{info['lightning']}, {info['threads']} threads, load {info['load_avg']}\n{args.warmup} warmup + "
        f"{args.steps} timed steps x {args.rounds} round(s); loss {args.loss}, sdpa {args.sdpa_backend}, "
        f"compile mode {args.compile_mode}"
    )
    print_table(rows)
    keys = ("mode", "steps", "warmup", "rounds", "loss", "sdpa_backend", "compile_mode")
    summary = {"bench": "train", **{k: getattr(args, k) for k in keys}, "machine": info}
    print(json.dumps({**summary, "wall_s": round(time.perf_counter() - started, 1), "results": rows}))


if __name__ == "__main__":
    main()
