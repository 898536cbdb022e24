"""Chapter 3's efficient-attention comparison: every multi-head variant, forward and forward+backward.

Variants: the book's stacked heads ("heads") and compact MHA ("mha") from gptmini/book, the model's
CausalSelfAttention ("sdpa"), its explicit-softmax pass for attention maps ("sdpa-maps"), and "bare-sdpa":
the same two projections around ``scaled_dot_product_attention`` with no module around them, the floor the
others are measured against. Prints a table, then one JSON line with every figure.

    python bench/attention.py --small          # 2 x 256 tokens x 256 dims x 4 heads: minutes on a CPU
    python bench/attention.py                  # 8 x 1024 x 768 x 12 (GPT-2 small's attention) on a GPU
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gptmini.book.attention import CompactMultiHeadAttention, StackedHeadsAttention
from gptmini.common import pick_device
from gptmini.model.attention import CausalSelfAttention
from gptmini.model.config import GPTConfig


class BareSDPA(nn.Module):
    """The baseline: the qkv and output projections with SDPA between them, nothing else."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MapsPass(nn.Module):
    """The model's attention on its explicit-softmax path, the one attention maps take."""

    def __init__(self, attention: CausalSelfAttention):
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, maps=[])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes: 2 x 256 x 256, 4 heads")
    parser.add_argument("--batch", type=int, help="batch size (default 8, or 2 with --small)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 1024, or 256 with --small)")
    parser.add_argument("--embd", type=int, help="model width (default 768, or 256 with --small)")
    parser.add_argument("--heads", type=int, help="attention heads (default 12, or 4 with --small)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (kernel selection, caches)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs; the median is reported")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args()
    defaults = (2, 256, 256, 4) if args.small else (8, 1024, 768, 12)
    for name, default in zip(("batch", "seq", "embd", "heads"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def pick_dtype(dev: torch.device, dtype: str) -> torch.dtype:
    """auto: bf16 on CUDA where supported, else fp32 (bf16 matmuls are slow on a CPU)."""
    if dtype == "auto":
        use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo on Linux, where platform.processor() is empty)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def median_ms(fn: Callable[[], object], dev: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds; CUDA events time the GPU work, not the kernel launches."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(dev)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            if dev.type == "mps":  # auto picks MPS on a Mac: wait for its queue as for CUDA's
                torch.mps.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_module(module: nn.Module, x: torch.Tensor, args: argparse.Namespace, dev: torch.device) -> dict:
    """Forward (no grad, as in inference) and forward+backward times of one module on x."""

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def forward_backward() -> None:
        module(x).sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return {
        "forward_ms": median_ms(forward, dev, args.warmup, args.repeats),
        "forward_backward_ms": median_ms(forward_backward, dev, args.warmup, args.repeats),
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    dtype = pick_dtype(dev, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.embd, device=dev, dtype=dtype, requires_grad=True)
    # Every variant maps embd features to embd features: the book's stacked heads make embd // heads each.
    C, nh, T = args.embd, args.heads, args.seq
    modules = {
        "heads": StackedHeadsAttention(C, C // nh, T, 0.0, num_heads=nh, qkv_bias=True),
        "mha": CompactMultiHeadAttention(C, C, T, 0.0, num_heads=nh, qkv_bias=True),
        "sdpa": CausalSelfAttention(GPTConfig(n_embd=C, n_head=nh, block_size=T)),
        "sdpa-maps": MapsPass(CausalSelfAttention(GPTConfig(n_embd=C, n_head=nh, block_size=T))),
        "bare-sdpa": BareSDPA(C, nh),
    }

    results = {}
    for name, module in modules.items():
        results[name] = bench_module(module.to(dev, dtype).train(), x, args, dev)

    name = device_name(dev)
    shape = f"B={args.batch} T={args.seq} C={args.embd} heads={args.heads}"
    print(f"attention on {name} ({dev.type}, {str(dtype).removeprefix('torch.')}), {shape}")
    print(f"{'variant':<12} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for variant, r in results.items():
        print(f"{variant:<12} {r['forward_ms']:>11.2f} {r['forward_backward_ms']:>11.2f}")
    summary = {
        "device": name,
        "device_type": dev.type,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "seq": args.seq,
        "embd": args.embd,
        "heads": args.heads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
