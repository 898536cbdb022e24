"""Decoding speed without the KV cache, with it, and with the compiled one-token step: greedy, random weights.

    python bench/generate.py                      # default shape and GPT-2 small, on the best device
    python bench/generate.py --device cpu --skip-gpt2 --threads auto
    python bench/generate.py --default-shape 4 4 128 128 4096   # n_layer n_head n_embd block_size vocab
    python bench/generate.py --device cpu --threads auto --compile off --repeats 5 --gpt2-repeats 1
        # eager only; on a CPU each of GPT-2's recomputing runs takes minutes

The modes alternate over ``--repeats`` runs (medians are reported), so a shared machine's changing load
hits them alike. Prints a table, then one JSON line with every figure. Targets at 256 new tokens: the cache
at least 5x faster than recomputation for GPT-2 small and 3x for the default shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from gptmini import GPT, GPTConfig
from gptmini.common import pick_device
from gptmini.generation.sampling import SamplingOptions, sample_tokens
from gptmini.model.config import MODEL_SIZES
from gptmini.threads import AUTO, apply_threads, decode_probe

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
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per setting, cache and no cache alternating"
    )
    parser.add_argument(
        "--gpt2-repeats",
        type=int,
        default=None,
        help="timed runs for GPT-2 small (default: --repeats); one recomputing run of 256 tokens is minutes",
    )
    parser.add_argument(
        "--threads",
        default="0",
        type=lambda v: v if v == AUTO else int(v),
        help="CPU threads: a number, auto (timed on cached decoding, as generate.py does) or 0 (torch's)",
    )
    parser.add_argument(
        "--skip-gpt2", action="store_true", help="only the default shape (GPT-2 is slow on CPU)"
    )
    parser.add_argument(
        "--compile", default="on", choices=["on", "off"], help="also time the compiled decoding step"
    )
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# The decoding modes compared, by name: (use_cache, compile).
MODES = {"cache": (True, False), "compiled": (True, True), "no_cache": (False, False)}


def time_decode(model: GPT, prompt: torch.Tensor, new_tokens: int, mode: str) -> float:
    """Tokens/s of one greedy run, reading every token as the CLI does (one device sync per step)."""
    greedy = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0)
    use_cache, compile = MODES[mode]
    synchronize(prompt.device)
    start = time.perf_counter()
    n = 0
    for token in sample_tokens(model, prompt, greedy, use_cache=use_cache, compile=compile):
        int(token)
        n += 1
    synchronize(prompt.device)
    return n / (time.perf_counter() - start)


def bench_shape(
    name: str, config: GPTConfig, device: torch.device, args: argparse.Namespace, repeats: int
) -> dict:
    load_before = round(os.getloadavg()[0], 2)
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device=device)
    modes = [m for m in MODES if args.compile == "on" or m != "compiled"]
    # As generate.py: "auto" times its probe (a few cached one-token steps of this model) with 1, 2, 4 ...
    # threads and keeps the fastest (CPU only).
    auto = args.threads == AUTO and device.type == "cpu"
    probe = decode_probe(model) if auto else None
    threads = apply_threads(args.threads or None, probe)  # 0: torch's default; auto untimed: the same
    started = time.perf_counter()
    for mode in modes:  # warm-up: kernels, allocator, lazy init; the compiled step compiles here
        time_decode(model, prompt, 8, mode)
        if mode == "compiled":
            compile_s = time.perf_counter() - started
        started = time.perf_counter()
    # Alternate the modes, so a load that comes and goes on a shared machine hits them all alike.
    runs = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            runs[mode].append(time_decode(model, prompt, args.new_tokens, mode))
    tok_s = {mode: statistics.median(values) for mode, values in runs.items()}
    cached, uncached = tok_s["cache"], tok_s["no_cache"]
    compiled = tok_s.get("compiled")
    return {
        "model": name,
        "shape": f"{config.n_layer}L/{config.n_head}H/{config.n_embd}, block {config.block_size}, "
        f"vocab {config.vocab_size}",
        "params_M": round(model.num_params() / 1e6, 2),
        "threads": threads.threads,
        "threads_how": threads.how,
        "cache_tok_s": round(cached, 1),
        "no_cache_tok_s": round(uncached, 1),
        "speedup": round(cached / uncached, 2),
        "compiled_tok_s": None if compiled is None else round(compiled, 1),
        "compiled_speedup": None if compiled is None else round(compiled / uncached, 2),
        "compile_s": round(compile_s, 1) if compiled is not None else None,
        "runs_tok_s": {mode: [round(x, 1) for x in values] for mode, values in runs.items()},
        "repeats": repeats,
        "load_1min": [load_before, round(os.getloadavg()[0], 2)],  # at the start and the end of this shape
        "target": TARGETS[name],
        "meets_target": cached / uncached >= TARGETS[name],
        "compiled_meets_target": compiled is not None and compiled / uncached >= TARGETS[name],
    }


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    torch.set_float32_matmul_precision("high")
    n_layer, n_head, n_embd, block, vocab = args.default_shape
    shapes = {"default": GPTConfig(vocab, block, n_layer, n_head, n_embd)}
    if not args.skip_gpt2:
        shapes["gpt2-small"] = GPTConfig.from_name("gpt2", vocab_size=50257)
    rows = []
    for name, config in shapes.items():
        repeats = args.gpt2_repeats if name == "gpt2-small" and args.gpt2_repeats else args.repeats
        rows.append(bench_shape(name, config, device, args, repeats))
        print(f"... {name} done", file=sys.stderr, flush=True)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    load = [round(x, 2) for x in os.getloadavg()]
    print(
        f"device: {card}, threads {args.threads or 'default'}, load {load}; {args.new_tokens} new tokens, "
        f"{args.prompt_tokens}-token prompt, median of {args.repeats} runs each"
        + (f" ({args.gpt2_repeats} for GPT-2 small)" if args.gpt2_repeats and not args.skip_gpt2 else "")
    )
    header = (
        f"{'model':<11} {'shape':<36} {'params':>8} {'threads':>7} {'no cache':>9} {'cache':>8} "
        f"{'speed-up':>9} {'compiled':>9} {'speed-up':>9} {'compile s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        verdict = "cache " + ("ok" if r["meets_target"] else f"< {r['target']}x")
        if r["compiled_tok_s"] is not None:
            verdict += ", compiled " + ("ok" if r["compiled_meets_target"] else f"< {r['target']}x")
        compiled = "" if r["compiled_tok_s"] is None else (
            f" {r['compiled_tok_s']:>9.1f} {r['compiled_speedup']:>8.2f}x {r['compile_s']:>9.1f}"
        )  # fmt: skip
        print(
            f"{r['model']:<11} {r['shape']:<36} {r['params_M']:>7.2f}M {r['threads']:>7} "
            f"{r['no_cache_tok_s']:>9.1f} {r['cache_tok_s']:>8.1f} {r['speedup']:>8.2f}x{compiled}  {verdict}"
            f" (load {r['load_1min'][0]}-{r['load_1min'][1]})"
        )
    summary = {
        "bench": "generate", "device": card, "threads": args.threads or "default", "load_avg": load,
        "new_tokens": args.new_tokens, "repeats": args.repeats,
    }  # fmt: skip
    print(json.dumps({**summary, "results": rows}))


if __name__ == "__main__":
    main()
