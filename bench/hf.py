"""GPT-2 small from a Hugging Face folder: import time, LoRA against full fine-tuning, KV-cache decoding.

    python bench/hf.py                        # GPT-2 small (124M, random weights), 1 thread
    python bench/hf.py --threads 2 --steps 3  # two threads, fewer steps
    python bench/hf.py --small                # a 2-layer, 64-wide GPT-2 shape: checks the script in seconds

1. Import: a random 124M ``GPT2LMHeadModel`` is saved with ``save_pretrained`` (once, into a temporary
   folder), then ``gptmini.weights.load_checkpoint(folder)`` is timed: safetensors read, layout
   conversion, GPT built and loaded. Target: at most 10 s on a 2-core CPU.
2. Fine-tuning on the CPU, batch 1 x 128 tokens, AdamW: full (every weight) against LoRA rank 8 (qkv, proj,
   mlp). Each runs in its own process, so its peak RSS is its own. Target: LoRA trains at most 1% of the
   parameters.
3. Decoding: greedy, 128 new tokens after a 16-token prompt, with the KV cache.

Random weights time exactly like real ones. Prints a table, then one JSON line with every figure, the load
average and the torch thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (1: steadiest on a shared CPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="timed training steps per mode (after 2 warm-up)"
    )
    parser.add_argument("--seq", type=int, default=128, help="tokens per training sequence (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded with the KV cache")
    parser.add_argument("--small", action="store_true", help="a tiny GPT-2 shape, to check the script")
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # set for the per-mode child processes
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def save_random_gpt2(folder: Path, small: bool) -> None:
    import transformers

    shape = {"n_layer": 2, "n_head": 2, "n_embd": 64} if small else {}  # {} = GPT-2 small's defaults
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).save_pretrained(folder)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fine_tune_figures(args: argparse.Namespace) -> dict:
    """One mode's figures, in this process: trainable share, s/step, peak RSS."""
    from gptmini.model.lora import FinetuneConfig, add_lora, trainable_fraction
    from gptmini.weights import load_checkpoint

    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.folder).model.train()
    if args.mode == "lora":
        add_lora(model, FinetuneConfig(method="lora", rank=8))
    trainable, total = trainable_fraction(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (1, args.seq + 1))
    times = []
    for step in range(2 + args.steps):
        started = time.perf_counter()
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - started)
    times.sort()
    return {
        "mode": args.mode,
        "trainable": trainable,
        "params": total,
        "trainable_pct": 100 * trainable / total,
        "s_per_step": times[len(times) // 2],
        "peak_rss_mb": peak_rss_mb(),
    }


def run_mode(args: argparse.Namespace, folder: Path, mode: str) -> dict:
    command = [sys.executable, __file__, f"--folder={folder}", f"--mode={mode}", f"--threads={args.threads}"]
    command += [f"--steps={args.steps}", f"--seq={args.seq}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_seconds(folder: Path) -> float:
    from gptmini.weights import load_checkpoint

    started = time.perf_counter()
    load_checkpoint(folder)
    return time.perf_counter() - started


def decode_tokens_per_s(folder: Path, new_tokens: int) -> float:
    from gptmini.generation.sampling import SamplingOptions, sample_tokens
    from gptmini.weights import load_checkpoint

    model = load_checkpoint(folder).model
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    greedy = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0)
    started = time.perf_counter()
    n = sum(1 for _ in sample_tokens(model, prompt, greedy, use_cache=True))
    return n / (time.perf_counter() - started)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode:  # a child process: one fine-tuning mode
        print(json.dumps(fine_tune_figures(args)))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "tiktoken_cache"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        save_random_gpt2(folder, args.small)
        import_s = min(import_seconds(folder) for _ in range(2))  # the second read has a warm page cache
        modes = {mode: run_mode(args, folder, mode) for mode in ("full", "lora")}
        tokens_per_s = decode_tokens_per_s(folder, args.new_tokens)
    load = [round(x, 2) for x in os.getloadavg()]
    shape = "2 x 2 x 64 (--small)" if args.small else "GPT-2 small (124M)"
    print(f"{shape}, random weights; torch threads {args.threads}; load average {load}")
    print(f"import from a local folder: {import_s:.2f} s")
    print(
        f"{'mode':<6} {'trainable':>12} {'%':>8} {'s/step':>8} {'peak RSS MB':>12}   (batch 1 x {args.seq})"
    )
    for row in modes.values():
        print(
            f"{row['mode']:<6} {row['trainable']:>12,} {row['trainable_pct']:>8.3f} "
            f"{row['s_per_step']:>8.3f} {row['peak_rss_mb']:>12.0f}"
        )
    print(f"KV-cache decoding: {tokens_per_s:.1f} tokens/s ({args.new_tokens} new tokens, greedy)")
    summary = {"shape": shape, "threads": args.threads, "loadavg": load, "import_s": round(import_s, 3)}
    summary.update({"fine_tune": list(modes.values()), "decode_tokens_per_s": round(tokens_per_s, 1)})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
