"""Decoding speed with and without the KV cache: greedy, random weights, on one device.

    python bench/generate.py                      # default shape and GPT-2 small, on the best device
    python bench/generate.py --device cpu --skip-gpt2
    python bench/generate.py --default-shape 4 4 128 128 4096   # n_layer n_head n_embd block_size vocab

Prints a table, then one JSON line with every figure. Targets at 256 new tokens: the cache at least 5x
faster for GPT-2 small and 3x for the default shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from gptmini import GPT, GPTConfig
from gptmini.common import pick_device
from gptmini.generation.sampling import SamplingOptions, sample_tokens
from gptmini.model.config import MODEL_SIZES

TARGETS = {"default": 3.0, "gpt2-small": 5.0}  # required speed-up of the cache


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument(
        "--default-shape",
        nargs=5,
        type=int,
        default=[*(MODEL_SIZES["tiny"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")), 4096],
        metavar=("N_LAYER", "N_HEAD", "N_EMBD", "BLOCK", "VOCAB"),
        help="the default model's shape (default: model.size=tiny with the 4096-token BPE)",
    )
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (the best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument(
        "--skip-gpt2", action="store_true", help="only the default shape (GPT-2 is slow on CPU)"
    )
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_decode(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool, repeats: int) -> float:
    """Best tokens/s over ``repeats`` greedy runs, reading every token as the CLI does (one sync per step)."""
    best, greedy = 0.0, SamplingOptions(max_new_tokens=new_tokens, temperature=0.0)
    for _ in range(repeats):
        synchronize(prompt.device)
        start = time.perf_counter()
        n = 0
        for token in sample_tokens(model, prompt, greedy, use_cache=use_cache):
            int(token)  # read each token as the CLI does: one device sync per step
            n += 1
        synchronize(prompt.device)
        best = max(best, n / (time.perf_counter() - start))
    return best


def bench_shape(name: str, config: GPTConfig, device: torch.device, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device=device)
    time_decode(model, prompt, 8, True, 1)  # warm-up: kernels, allocator, lazy init
    time_decode(model, prompt, 8, False, 1)
    cached = time_decode(model, prompt, args.new_tokens, True, args.repeats)
    uncached = time_decode(model, prompt, args.new_tokens, False, args.repeats)
    return {
        "model": name,
        "shape": f"{config.n_layer}L/{config.n_head}H/{config.n_embd}, block {config.block_size}, "
        f"vocab {config.vocab_size}",
        "params_M": round(model.num_params() / 1e6, 2),
        "cache_tok_s": round(cached, 1),
        "no_cache_tok_s": round(uncached, 1),
        "speedup": round(cached / uncached, 2),
        "target": TARGETS[name],
        "meets_target": cached / uncached >= TARGETS[name],
    }


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    if args.threads:
        # On a shared CPU, fewer threads than cores avoids stalls in spin-waiting worker threads.
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    n_layer, n_head, n_embd, block, vocab = args.default_shape
    shapes = {"default": GPTConfig(vocab, block, n_layer, n_head, n_embd)}
    if not args.skip_gpt2:
        shapes["gpt2-small"] = GPTConfig.from_name("gpt2", vocab_size=50257)
    rows = []
    for name, config in shapes.items():
        rows.append(bench_shape(name, config, device, args))
        print(f"... {name} done", file=sys.stderr, flush=True)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    threads = torch.get_num_threads()
    print(
        f"device: {card}, {threads} threads; {args.new_tokens} new tokens, {args.prompt_tokens}-token prompt"
    )
    header = f"{'model':<11} {'shape':<36} {'params':>8} {'cache tok/s':>12} {'no cache':>10} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        verdict = "ok" if r["meets_target"] else f"< {r['target']}x"
        print(
            f"{r['model']:<11} {r['shape']:<36} {r['params_M']:>7.2f}M {r['cache_tok_s']:>12.1f} "
            f"{r['no_cache_tok_s']:>10.1f} {r['speedup']:>8.2f}x {verdict}"
        )
    summary = {"device": str(device), "threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    print(json.dumps({**summary, "results": rows}))


if __name__ == "__main__":
    main()
