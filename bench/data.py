"""Data pipeline speed and memory: BPE training, tokenization into the cache, and the bare-tiktoken baseline.

Two corpora, each measured in its own subprocess so their peak memory doesn't mix:

- ``pystdlib``: the default corpus (~12 MB of Python source);
- ``big``: ``--big-mb`` MB (default 200) of stdlib source written to a temporary folder, each copy with its
  lines shuffled differently so the text varies.

For each: the BPE training time (vocab ``--vocab-size``), tokenization throughput of the cache writer, the
baseline (bare ``encode_ordinary_batch`` over the same files with the same threads, timing only the encode
calls), the cost of the cache check on a warm cache, and peak RSS. Caches go to a temporary folder, never
the repository's data/.

    python bench/data.py                  # both corpora (about a minute on 2 cores)
    python bench/data.py --big-mb 0       # pystdlib only

Targets: pipeline throughput >= 0.8x the baseline; peak RSS < 1 GB on the 200 MB corpus; pystdlib BPE
(vocab 4096) + tokenization < 15 s. Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# tiktoken's GPT-2 files, when a shared copy sits beside the repository (as in tests/conftest.py).
if "TIKTOKEN_CACHE_DIR" not in os.environ and (REPO_ROOT.parent / "shared" / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(REPO_ROOT.parent / "shared" / "tiktoken_cache")

MB = 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_big_corpus(folder: Path, megabytes: int) -> int:
    """Write shuffled-line copies of the stdlib source until ``megabytes`` MB; return the bytes written."""
    from gptmini.data import DataConfig, resolve_corpus

    sources = [
        path.read_text(encoding="utf-8", errors="replace") for path in resolve_corpus(DataConfig()).files
    ]
    written, copy = 0, 0
    while written < megabytes * MB:
        rng = random.Random(copy)
        for i, text in enumerate(sources):
            lines = text.splitlines(keepends=True)
            rng.shuffle(lines)
            path = folder / f"copy{copy:03d}" / f"{i:04d}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            written += path.write_bytes("".join(lines).encode("utf-8"))
            if written >= megabytes * MB:
                break
        copy += 1
    return written


def baseline_encode(enc, files: list[Path], threads: int, batch_mb: float = 8) -> float:
    """Seconds spent in bare encode_ordinary_batch over the files, in batches (reads not timed)."""
    elapsed, batch, size = 0.0, [], 0
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        batch.append(text)
        size += len(text)
        if size >= batch_mb * MB or i == len(files) - 1:
            start = time.perf_counter()
            enc.encode_ordinary_batch(batch, num_threads=threads)
            elapsed += time.perf_counter() - start
            batch, size = [], 0
    return elapsed


def measure(
    corpus: str, path: str | None, cache_dir: str, vocab_size: int, with_gpt2: bool, repeats: int
) -> dict:
    """Everything for one corpus, in this (child) process; throughputs are the best of ``repeats`` runs."""
    import gptmini.data as data
    from gptmini.data.shards import _train_tokenizer, encode_threads, write_cache
    from gptmini.data.tokenizer import TokenizerConfig, load_encoding

    rss_after_import = peak_rss_mb()
    cfg = data.DataConfig(name=corpus, path=path, cache_dir=cache_dir)
    resolved = data.resolve_corpus(cfg)
    files = resolved.files
    total = sum(p.stat().st_size for p in files)
    threads = encode_threads()
    out = {"corpus": corpus, "files": len(files), "mb": total / MB, "threads": threads}
    out["rss_after_import_mb"] = rss_after_import

    # The full first preparation (list, fingerprint, train the BPE, tokenize), as a user pays it.
    start = time.perf_counter()
    folder = data.prepare_cache(cfg, TokenizerConfig(vocab_size=vocab_size))
    out["prepare_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = peak_rss_mb()  # before the baseline, which holds more text at once
    meta = data.read_meta(folder)
    out["tokens"] = meta["train_tokens"] + meta["val_tokens"]

    start = time.perf_counter()
    data.prepare_cache(cfg, TokenizerConfig(vocab_size=vocab_size))
    out["cached_prepare_s"] = time.perf_counter() - start  # listing + content fingerprint

    # The parts on their own: the same calls prepare_cache makes.
    start = time.perf_counter()
    source = resolved
    assert source.fingerprint  # the contents hash, outside the writer's timing below (as prepare_cache does)
    enc = _train_tokenizer(source, cfg, TokenizerConfig(vocab_size=vocab_size))
    out["bpe_train_s"] = time.perf_counter() - start
    encodings = {"bpe": enc}
    if with_gpt2:
        try:
            encodings["gpt2"] = load_encoding("gpt2")
        except Exception as exc:  # noqa: BLE001 - the gpt2 row is optional
            print(f"skipping gpt2: {exc}", file=sys.stderr)
    for name, encoding in encodings.items():
        pipeline_s = baseline_s = float("inf")
        # Interleaved and best-of: other work on a shared 2-core machine makes single runs noisy.
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
                start = time.perf_counter()
                write_cache(source, cfg, Path(scratch), TokenizerConfig(), encoding)  # the writer alone
                pipeline_s = min(pipeline_s, time.perf_counter() - start)
            baseline_s = min(baseline_s, baseline_encode(encoding, files, threads))
        out[f"{name}_pipeline_mb_s"] = total / MB / pipeline_s
        out[f"{name}_baseline_mb_s"] = total / MB / baseline_s
        out[f"{name}_ratio"] = baseline_s / pipeline_s
    return out


def run_child(corpus: str, path: str | None, cache_dir: str, repeats: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        corpus,
        "--cache-dir",
        cache_dir,
        "--repeats",
        str(repeats),
    ]
    command += ["--vocab-size", str(args.vocab_size)] + (["--path", path] if path else [])
    command += [] if args.skip_gpt2 else ["--gpt2"]
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    columns = [
        ("corpus", "{}"),
        ("mb", "{:.1f}"),
        ("files", "{}"),
        ("prepare_s", "{:.2f}"),
        ("bpe_train_s", "{:.2f}"),
        ("bpe_pipeline_mb_s", "{:.1f}"),
        ("bpe_baseline_mb_s", "{:.1f}"),
        ("bpe_ratio", "{:.2f}"),
        ("gpt2_pipeline_mb_s", "{:.1f}"),
        ("gpt2_baseline_mb_s", "{:.1f}"),
        ("gpt2_ratio", "{:.2f}"),
        ("cached_prepare_s", "{:.2f}"),
        ("rss_after_import_mb", "{:.0f}"),
        ("peak_rss_mb", "{:.0f}"),
    ]
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[name]) if name in row else "-" for name, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--big-mb", type=int, default=200, help="size of the generated corpus (0: skip it)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--skip-gpt2", action="store_true", help="only the trained BPE")
    parser.add_argument("--repeats", type=int, default=3, help="best-of runs on pystdlib")
    parser.add_argument("--big-repeats", type=int, default=1, help="best-of runs on the big corpus")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--gpt2", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.child, args.path, args.cache_dir, args.vocab_size, args.gpt2, args.repeats)
        print(json.dumps(result))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="gptmini-bench-data-") as tmp:
        rows.append(run_child("pystdlib", None, str(Path(tmp) / "cache"), args.repeats, args))
        if args.big_mb > 0:
            big = Path(tmp) / "big"
            start = time.perf_counter()
            make_big_corpus(big, args.big_mb)
            print(
                f"generated {args.big_mb} MB corpus in {time.perf_counter() - start:.1f} s", file=sys.stderr
            )
            rows.append(run_child("text", str(big), str(Path(tmp) / "cache"), args.big_repeats, args))
            rows[-1]["corpus"] = f"big-{args.big_mb}mb"
    print_table(rows)
    pystdlib = rows[0]
    targets = {
        "pipeline_vs_baseline_ge_0.8": all(row["bpe_ratio"] >= 0.8 for row in rows),
        "pystdlib_bpe_plus_tokenize_lt_15s": pystdlib["prepare_s"] < 15,
    }
    if len(rows) > 1:
        targets["big_peak_rss_lt_1gb"] = rows[1]["peak_rss_mb"] < 1024
    print(json.dumps({"bench": "data", "results": rows, "targets": targets}))


if __name__ == "__main__":
    main()
