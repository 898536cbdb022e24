"""The default run, old recipe against new: ``python train.py`` as a user runs it, whole, one run at a time.

Each recipe is a set of train.py overrides: by default ``old``, what ``python train.py`` ran before Muon
became its optimizer (GPT-2's recipe), and ``new``, today's ``python train.py`` (no overrides). The runs are
interleaved by seed (old s1, new s1, old s2, new s2, ...) so that a change of the machine's speed during the
benchmark touches both alike, and never overlap: the target is wall time as well as quality. The token cache
is built first (``gptmini prepare``, untimed), so no run pays for the tokenizer. Each run records val
bits/byte, steps, tokens/s, its process wall time, the threads it chose and the load average before and after.

    python bench/default_run.py --seeds 1,2
    python bench/default_run.py --recipe "new=" --recipe "rope=model.pos_emb=rope" --seeds 1

Prints a table (mean over seeds ± half the spread, and the new/old ratios), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# What python train.py ran before (GPT-2's recipe: AdamW and cosine, 40 rows a step), and what it runs now.
DEFAULT_RECIPES = ["old=optim=adamw data.batch_size=40", "new="]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_recipe(name: str, overrides: list[str], seed: int, out: Path) -> dict:
    run_dir = out / f"{name}-s{seed}-{time.time_ns()}"
    command = [
        sys.executable,
        "train.py",
        *overrides,
        f"seed={seed}",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    before = load()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    record = {
        "recipe": name,
        "seed": seed,
        "overrides": overrides,
        "process_s": time.perf_counter() - started,
    }
    record.update(load_before=before, load_after=load(), run_dir=str(run_dir))
    if done.returncode != 0:
        sys.exit(f"{name} seed {seed} failed:\n" + "\n".join(done.stderr.strip().splitlines()[-10:]))
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("val_bpb", "steps", "tokens_per_s", "train_time_s", "n_params"):
        record[key] = summary.get(key)
    record["threads"] = (summary.get("threads_choice") or {}).get("threads")
    return record


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (max(values) - min(values)) / 2


def table(records: list[dict], names: list[str]) -> tuple[str, dict]:
    lines = [
        "| recipe | seeds | val bits/byte | ± | steps | process s | train s | tokens/s | threads | params "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    figures = {}
    for name in names:
        runs = [r for r in records if r["recipe"] == name]
        bpb, spread = mean_spread([r["val_bpb"] for r in runs])
        process = statistics.mean(r["process_s"] for r in runs)
        train = statistics.mean(r["train_time_s"] or 0 for r in runs)
        tokens = statistics.mean(r["tokens_per_s"] for r in runs)
        loads = ", ".join(f"{r['load_before'][0]}→{r['load_after'][0]}" for r in runs)
        figures[name] = {"val_bpb": round(bpb, 4), "spread": round(spread, 4), "process_s": round(process, 1)}
        figures[name].update(train_s=round(train, 1), seeds=[r["seed"] for r in runs])
        lines.append(
            f"| {name} | {','.join(str(r['seed']) for r in runs)} | {bpb:.4f} | {spread:.4f} | "
            f"{statistics.mean(r['steps'] for r in runs):.0f} | {process:.1f} | {train:.1f} | "
            f"{tokens:,.0f} | "
            f"{runs[0]['threads']} | {runs[0]['n_params']:,} | {loads} |"
        )
    first = names[0]
    for name in names[1:]:
        ratio_bpb = figures[name]["val_bpb"] / figures[first]["val_bpb"]
        ratio_s = figures[name]["process_s"] / figures[first]["process_s"]
        lines.append(f"\n{name} / {first}: bits/byte ×{ratio_bpb:.3f}, process time ×{ratio_s:.3f}")
    return "\n".join(lines), figures


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--recipe", action="append", default=[], help="NAME=OVERRIDES (repeatable)")
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "default_run")
    args = parser.parse_args()
    recipes = {}
    for spec in args.recipe or DEFAULT_RECIPES:
        name, _, overrides = spec.partition("=")
        recipes[name] = overrides.split()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for overrides in {tuple(o for o in v if o.startswith(("data", "tokenizer"))) for v in recipes.values()}:
        subprocess.run([sys.executable, "-m", "gptmini", "prepare", *overrides], cwd=REPO_ROOT, check=True)
    print(f"token caches ready in {time.perf_counter() - started:.0f} s", flush=True)
    records = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, overrides in recipes.items():
            records.append(run_recipe(name, overrides, seed, args.out))
            last = records[-1]
            with (args.out / "results.jsonl").open(
                "a"
            ) as handle:  # each run as it ends: a stopped bench keeps it
                handle.write(json.dumps(last) + "\n")
            print(
                f"{name} seed {seed}: {last['val_bpb']:.4f} bits/byte in {last['process_s']:.0f} s",
                flush=True,
            )
    text, figures = table(records, list(recipes))
    print(f"\n{os.cpu_count()} cores\n{text}")
    print(json.dumps({"bench": "default_run", "recipes": figures}))


if __name__ == "__main__":
    main()
