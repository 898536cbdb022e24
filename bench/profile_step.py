"""Where a GPT-2 small training step spends its time: torch.profiler over a few steps of the plain loop.

    python bench/profile_step.py                                  # B=32, compiled, chunked loss, on a GPU
    python bench/profile_step.py --loss standard --compile off --batch 16
    python bench/profile_step.py --small --device cpu --steps 2   # the plumbing, on a CPU

The loop is bench/train.py's plain loop on ``experiment=gpt2_small`` composed as train.py composes it (its
model, optimizer settings and clipping; bf16 autocast on a GPU, fused AdamW through ``build_optimizer``).
It times ``--steps`` steps with CUDA events first, then profiles ``--profile-steps`` more, and prints the
most expensive kernels (self device time), the share of each kind of kernel (matmul, attention,
elementwise/fused, optimizer, copies), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptmini import GPT
from gptmini.common import as_config, pick_device
from gptmini.training.config import compose_config
from gptmini.training.optim import OptimConfig, build_optimizer
from gptmini.training.perf import flops_per_token, mfu, peak_flops
from gptmini.training.settings import model_config_from

# Kernel families by name fragment, first match wins: what each share of the step is spent on.
FAMILIES = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "addmm", "aten::mm", "aten::bmm")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("copy/cast", ("copy", "cast", "memcpy", "memset", "fill")),
    ("loss", ("cross_entropy", "nll", "log_softmax", "logsumexp")),
]


def family(name: str) -> str:
    lowered = name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in lowered for k in keys)), "elementwise/fused")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--compile", default="on", choices=["on", "off"])
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--loss", default="chunked", choices=["chunked", "standard"])
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--small", action="store_true", help="a 2-layer, 64-wide model with GPT-2's vocabulary")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    small = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"]
    cfg = compose_config(["experiment=gpt2_small", *(small if args.small else [])])
    config = model_config_from(cfg, tokenizer_vocab=50257)  # GPT-2's tokenizer
    model = GPT(config).to(device)
    step_loss = model.loss if args.loss == "chunked" else (lambda x, y: model(x, y)[1])
    if args.compile == "on":
        model.compile(mode=args.compile_mode)
        if args.loss == "chunked":
            step_loss = torch.compile(model.loss, mode=args.compile_mode)
    optimizer = build_optimizer(model, as_config(cfg.optim, OptimConfig, "optim"), device)
    clip = cfg.trainer.gradient_clip_val
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    tokens = torch.randint(0, config.vocab_size, (4, args.batch, config.block_size + 1), device=device)

    def step(i: int) -> torch.Tensor:
        batch = tokens[i % 4]
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = step_loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    for i in range(3):
        step(i)
    sync()
    warmup_s = time.perf_counter() - started
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append((time.perf_counter() - t0) * 1000)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.profile_steps):
            step(i)
        sync()
    report(prof, args, device, config, model, times, warmup_s)


def report(prof, args, device, config, model, times, warmup_s) -> None:
    cuda = device.type == "cuda"
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total)]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    if cuda:  # kernels only: CPU-side ops have no self device time
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(own(e) for e in events) or 1
    events.sort(key=own, reverse=True)
    per_step = args.profile_steps
    print(f"{'kernel / op':<90} {'ms/step':>8} {'share':>6} {'calls':>6}")
    for e in events[: args.top]:
        ms, calls = own(e) / 1000 / per_step, e.count // per_step
        print(f"{e.key[:90]:<90} {ms:>8.2f} {own(e) / total:>6.1%} {calls:>6}")
    shares: dict[str, float] = {}
    for e in events:
        shares[family(e.key)] = shares.get(family(e.key), 0.0) + own(e)
    by_share = sorted(shares.items(), key=lambda kv: -kv[1])
    print("\nby kind: " + ", ".join(f"{k} {v / total:.1%}" for k, v in by_share))
    median = statistics.median(times)
    tokens_per_s = args.batch * config.block_size / (median / 1000)
    precision = "bf16-mixed" if cuda else "32-true"
    util = mfu(flops_per_token(model, config.block_size), tokens_per_s, peak_flops(device, precision, None))
    card = torch.cuda.get_device_name(device) if cuda else device.type
    busy_ms = total / 1000 / per_step
    print(
        f"\n{card}: B={args.batch}x{config.block_size}, compile {args.compile}, loss {args.loss}: "
        f"{median:.1f} ms/step (median of {len(times)}), {tokens_per_s:,.0f} tokens/s, MFU "
        f"{'n/a' if util is None else f'{util:.1%}'}; kernels busy {busy_ms:.1f} ms/step "
        f"({busy_ms / median:.0%} of the step); first 3 steps {warmup_s:.1f} s; "
        f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}"
    )
    summary = {
        "bench": "profile_step", "device": card, "batch": args.batch, "compile": args.compile,
        "loss": args.loss, "ms_per_step_median": round(median, 2), "tokens_per_s": round(tokens_per_s),
        "mfu": None if util is None else round(util, 4), "kernel_busy_ms": round(busy_ms, 2),
        "shares": {k: round(v / total, 4) for k, v in shares.items()},
        "top": [[e.key[:120], round(own(e) / 1000 / per_step, 3)] for e in events[:10]],
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
