"""Preparing a sharded token cache (``data=hf``) against bare tiktoken, side by side, on a generated corpus.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/prepare.py            # 1 GB, ~10 minutes
    python bench/prepare.py --gb 0.05 --compare-encoders                           # a quick look

1. Writes a local jsonl corpus of ``--gb`` GB (once; reused): documents of English-like text made here from
   an invented vocabulary with Zipf-distributed word frequencies, numbers and punctuation (no copied text).
2. **bare**: reads the jsonl line by line (``json.loads``) and encodes it with tiktoken's own batch encoder,
   ``encode_ordinary_batch(texts, num_threads)``, keeping only the token count: the baseline the issue names
   (reading + parsing + encoding, nothing written).
3. **gptmini**: ``prepare_cache`` with ``data=hf data.hf.path=json`` on the same files: streaming read,
   validation split, parallel encoding, shard files, progress state. Each run is a fresh process, so its
   peak RSS (``ru_maxrss``) is its own.
4. ``--compare-encoders``: on the first 20 MB, in three interleaved rounds (best of each), encodes the
   same documents with (a) a pool of threads calling ``encode_to_numpy`` (what gptmini does),
   (b) ``encode_ordinary_batch`` and (c) worker processes (``multiprocessing.Pool``), to justify the choice.

Prints a table, then one JSON line. Load average and torch's thread count are reported with every figure.
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

import numpy as np

SYLLABLES = "ka ri to me na su lo vi de ran tel mor quin sha bel fo gu lix ter am or en is ul".split()
FUNCTION_WORDS = "the of and to a in is that for it as was with be by on not he this are or at from".split()


def make_vocabulary(rng: np.random.Generator, size: int = 20000) -> list[str]:
    """Invented words of 1 to 4 syllables, plus common function words at the head of the Zipf ranking."""
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))))
    return FUNCTION_WORDS + sorted(words)


def make_sentences(rng: np.random.Generator, vocab: list[str], count: int) -> list[str]:
    """Sentences of Zipf-distributed words with occasional numbers, commas and capitals."""
    ranks = np.minimum(rng.zipf(1.2, size=count * 14), len(vocab)) - 1
    sentences, at = [], 0
    for _ in range(count):
        n = int(rng.integers(5, 25))
        words = [vocab[r] for r in ranks[at : at + n]]
        at = (at + n) % (len(ranks) - 30)
        if rng.random() < 0.2:
            words.insert(int(rng.integers(0, n)), str(int(rng.integers(0, 10000))))
        if n > 8 and rng.random() < 0.5:
            words[n // 2] += ","
        words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!"]))
    return sentences


def generate_corpus(path: Path, n_bytes: int, seed: int = 0) -> None:
    """Write ``n_bytes`` of jsonl documents ({"text": ..., "id": ...}) to ``path`` (atomically)."""
    from gptmini.common import atomic_file

    rng = np.random.default_rng(seed)
    vocab = make_vocabulary(rng)
    pool = make_sentences(rng, vocab, 200_000)
    written, doc = 0, 0
    with atomic_file(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            picks = rng.integers(0, len(pool), size=(1000, 60))
            lines = []
            for row in picks:
                n_sentences = int(rng.integers(5, 60))
                paragraphs = [" ".join(pool[i] for i in row[j : j + 6]) for j in range(0, n_sentences, 6)]
                lines.append(json.dumps({"text": "\n\n".join(paragraphs), "id": doc}) + "\n")
                doc += 1
            block = "".join(lines)
            f.write(block)
            written += len(block.encode())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def run_bare(corpus: Path, threads: int) -> dict:
    """Read + parse + tiktoken batch-encode the jsonl; count tokens; nothing written."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    started, tokens, nbytes, batch = time.perf_counter(), 0, 0, []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1024:
                tokens += sum(map(len, enc.encode_ordinary_batch(batch, num_threads=threads)))
                batch = []
        if batch:
            tokens += sum(map(len, enc.encode_ordinary_batch(batch, num_threads=threads)))
    nbytes = corpus.stat().st_size
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "file_mb": nbytes / 1e6}


def run_gptmini(corpus: Path, cache_dir: Path) -> dict:
    """``prepare_cache`` on the jsonl through ``data=hf`` (a fresh cache every time)."""
    from gptmini.data.corpus import DataConfig
    from gptmini.data.token_cache import open_cache, prepare_cache
    from gptmini.data.tokenizer import TokenizerConfig

    data = DataConfig(
        name="hf",
        hf={"path": "json", "data_files": str(corpus)},
        val_fraction=0.001,
        cache_dir=str(cache_dir),
    )
    started = time.perf_counter()
    cache = open_cache(prepare_cache(data, TokenizerConfig(name="gpt2")))
    seconds = time.perf_counter() - started
    tokens = cache.meta["train_tokens"] + cache.meta["val_tokens"]
    shards = len(cache.meta["shards"]["train"]) + len(cache.meta["shards"]["val"])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "shards": shards}


def compare_encoders(corpus: Path, threads: int, limit_bytes: int = 20_000_000, rounds: int = 3) -> dict:
    """tokens/s of three ways to encode the same documents in parallel (see the module docstring)."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > limit_bytes:
                break
    batches = [texts[i : i + 256] for i in range(0, len(texts), 256)]

    def numpy_task(batch: list[str]) -> int:
        return sum(len(enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=())) for t in batch)

    def threads_numpy() -> int:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(numpy_task, batches))

    def ordinary_batch() -> int:
        return sum(sum(map(len, enc.encode_ordinary_batch(b, num_threads=threads))) for b in batches)

    def processes() -> int:
        with multiprocessing.get_context("spawn").Pool(threads, initializer=_process_init) as pool:
            return sum(pool.imap(_process_task, batches, chunksize=1))

    # Interleaved rounds, best of each: on a shared machine the load changes from one run to the next.
    methods = {"threads_encode_to_numpy": threads_numpy, "encode_ordinary_batch": ordinary_batch}
    methods["processes"] = processes
    results = {name: 0.0 for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            started = time.perf_counter()
            tokens = method()
            results[name] = max(results[name], tokens / (time.perf_counter() - started))
    return {name: round(value) for name, value in results.items()}


_ENC = None


def _process_init() -> None:
    global _ENC
    import tiktoken

    _ENC = tiktoken.get_encoding("gpt2")


def _process_task(batch: list[str]) -> int:
    arrays = [_ENC.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in batch]
    return sum(len(a) for a in arrays)


def in_subprocess(mode: str, corpus: Path, extra: list[str]) -> dict:
    """Run one measurement in a fresh interpreter, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size in GB (1e9 bytes)")
    parser.add_argument(
        "--corpus", type=Path, default=None, help="the jsonl (default: /tmp/gptmini-bench-<gb>.jsonl)"
    )
    parser.add_argument("--compare-encoders", action="store_true", help="also time the three encoders")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from gptmini.data.shards import encode_threads

    threads = encode_threads()
    if args.child:
        if args.child == "bare":
            result = run_bare(args.corpus, threads)
        elif args.child == "gptmini":
            result = run_gptmini(args.corpus, args.cache_dir)
        else:
            result = compare_encoders(args.corpus, threads)
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(json.dumps(result))
        return

    import torch

    corpus = args.corpus or Path(tempfile.gettempdir()) / f"gptmini-bench-{args.gb:g}gb.jsonl"
    if not corpus.is_file():
        print(f"writing {args.gb:g} GB of generated jsonl to {corpus} ...", flush=True)
        generate_corpus(corpus, int(args.gb * 1e9))
    rows = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        load = os.getloadavg()[0]
        rows["bare"] = {**in_subprocess("bare", corpus, []), "load": round(load, 2)}
        load = os.getloadavg()[0]
        rows["gptmini"] = {
            **in_subprocess("gptmini", corpus, ["--cache-dir", cache_dir]),
            "load": round(load, 2),
        }
    encoders = in_subprocess("encoders", corpus, []) if args.compare_encoders else None
    ratio = rows["gptmini"]["tokens_per_s"] / rows["bare"]["tokens_per_s"]
    size_mb = corpus.stat().st_size / 1e6
    torch_threads = torch.get_num_threads()
    print(f"\ncorpus {corpus} ({size_mb:,.0f} MB), encode threads {threads}, torch threads {torch_threads}")
    print(f"{'':10} {'tokens':>14} {'seconds':>9} {'tokens/s':>12} {'peak RSS MB':>12} {'load':>6}")
    for name, row in rows.items():
        print(
            f"{name:10} {row['tokens']:>14,} {row['seconds']:>9.1f} {row['tokens_per_s']:>12,.0f} "
            f"{row['peak_rss_mb']:>12,.0f} {row['load']:>6.2f}"
        )
    print(f"gptmini / bare = {ratio:.2f}x  (targets: >= 0.8x, peak RSS < 1500 MB)")
    if encoders:
        print(
            "encoders, best of 3 rounds on the first 20 MB (tokens/s): "
            + ", ".join(f"{k} {v:,}" for k, v in encoders.items())
        )
    summary = {
        "bench": "prepare",
        "corpus_mb": round(size_mb, 1),
        "encode_threads": threads,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "bare_tokens_per_s": round(rows["bare"]["tokens_per_s"]),
        "gptmini_tokens_per_s": round(rows["gptmini"]["tokens_per_s"]),
        "ratio": round(ratio, 3),
        "gptmini_peak_rss_mb": rows["gptmini"]["peak_rss_mb"],
        "bare_peak_rss_mb": rows["bare"]["peak_rss_mb"],
        "tokens": rows["gptmini"]["tokens"],
        "encoders": encoders,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
