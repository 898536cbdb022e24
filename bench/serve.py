"""Serving throughput: aggregate tokens/s, time to first token and tokens/s per request for 1, 4, 8 and 32
concurrent streaming clients of ``python serve.py``.

    python bench/serve.py                         # the default model's shape, on the CPU
    python bench/serve.py --clients 1 8 --rounds 3 --max-tokens 64

The model has the shape ``python train.py`` trains by default (model.size=tiny: 4 layers, 4 heads, 128 wide,
a 128-token context, the 4096-token BPE) with untrained, random weights: speed does not depend on what the
weights say. The BPE is trained on a slice of the Python standard library (the default corpus) so its
vocabulary is the real size. The server is the real command, ``python serve.py``, in its own process (the
clients' own work, parsing events, would otherwise take the server's interpreter lock); the clients are
asyncio streams in this process. Each level runs ``--rounds`` back-to-back requests per client, all started
together. Prints a table, then one JSON line with every figure, the load average and the server's threads.
Target: 8 clients get at least 4x the aggregate tokens/s of one client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gptmini import GPT, GPTConfig
from gptmini.data.tokenizer import tokenizer_to_spec, train_bpe
from gptmini.model.config import MODEL_SIZES
from gptmini.weights import save_model_checkpoint

SERVE_PY = Path(__file__).resolve().parents[1] / "serve.py"
TARGET = 4.0  # 8 clients' aggregate tokens/s over one client's


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 32], help="concurrency levels")
    parser.add_argument(
        "--rounds", type=int, default=2, help="requests per client at each level, one after another"
    )
    parser.add_argument("--max-tokens", type=int, default=96, help="max_tokens of every request")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's max_batch (its default: 8)")
    parser.add_argument("--threads", default="auto", help="the server's threads: auto (timed), or a number")
    parser.add_argument("--device", default="cpu", help="the server's device")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary (the default run's: 4096)")
    return parser.parse_args()


def default_checkpoint(folder: Path, vocab: int) -> Path:
    """An untrained model of the default run's shape, with a BPE of the default size."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:120]]
    enc = train_bpe(texts, vocab)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, **MODEL_SIZES["tiny"]))
    return save_model_checkpoint(folder / "default-shape.ckpt", model, tokenizer_to_spec(enc))


def start_server(ckpt: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    """``python serve.py`` on a free port; returns the process, its URL and its thread line."""
    command = [sys.executable, str(SERVE_PY), f"ckpt={ckpt}", "port=0", f"device={args.device}"]
    command += [f"threads={args.threads}", f"max_batch={args.max_batch}", "max_queue=256"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    threads = ""
    for line in process.stderr:
        if line.startswith("threads"):
            threads = line.strip()
        found = re.search(r"at (http://[\d.]+:\d+)/", line)
        if found:
            return process, found.group(1), threads
    raise SystemExit(f"serve.py did not start (exit {process.wait()})")


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: seconds to the first text, seconds in all, and tokens generated."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True}
    started = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if first is None and data["choices"] and data["choices"][0]["text"]:
                first = time.perf_counter()
            if "usage" in data:
                tokens = data["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return {"ttft": (first or ended) - started, "seconds": ended - started, "tokens": tokens}


async def level(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """``clients`` streams at once, each ``rounds`` requests in a row: the level's figures."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def client(i: int) -> list[dict]:
            return [
                await one_request(http, url, f"def f{i}_{r}(x):\n    return", max_tokens)
                for r in range(rounds)
            ]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": round(wall, 2),
        "aggregate_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], 3),
        "per_request_tokens_per_s": round(statistics.median(r["tokens"] / r["seconds"] for r in results), 1),
        "load_average": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ckpt = default_checkpoint(Path(folder), args.vocab)
        process, url, threads = start_server(ckpt, args)
        try:
            asyncio.run(level(url, 1, 1, 16))  # warm-up: first-call costs stay out of the figures
            rows = [asyncio.run(level(url, c, args.rounds, args.max_tokens)) for c in args.clients]
        finally:
            process.terminate()
            process.wait(30)
    print(f"server: {threads}; max_batch={args.max_batch}; {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(
        f"{'clients':>7} {'requests':>8} {'tokens':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'tok/s/req':>10} {'load':>5}"
    )
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['aggregate_tokens_per_s']:>10} "
            f"{r['ttft_p50_s']:>8}s {r['ttft_p95_s']:>8}s {r['per_request_tokens_per_s']:>10} "
            f"{r['load_average']:>5}"
        )
    by_clients = {r["clients"]: r for r in rows}
    speedup = None
    if 1 in by_clients and 8 in by_clients:
        speedup = round(by_clients[8]["aggregate_tokens_per_s"] / by_clients[1]["aggregate_tokens_per_s"], 2)
        verdict = "meets" if speedup >= TARGET else "misses"
        print(f"8 clients / 1 client aggregate: {speedup}x ({verdict} the {TARGET:g}x target)")
    summary = {
        "model": "default shape (model.size=tiny), untrained",
        "vocab": args.vocab,
        "device": args.device,
        "max_batch": args.max_batch,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "server_threads": threads,
        "cpus": os.cpu_count(),
        "levels": rows,
        "speedup_8_vs_1": speedup,
        "target": TARGET,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
