"""The race: nanoGPT's README CPU recipe against ``experiment=shakespeare`` in the same wall time, same run.

One after the other, in one process tree (never side by side: they would share the CPU):

1. nanoGPT's README CPU recipe on its ``shakespeare_char`` data, made by nanoGPT's own ``prepare.py`` from the
   same tinyshakespeare.txt (a 90/10 character split), timed as a whole process, as a user sees it;
2. nanoGPT's final checkpoint scored on its whole validation split: non-overlapping windows of its
   block_size (64), every character predicted once, in nats per character (= nats per byte: the text is
   ASCII);
3. ``python train.py experiment=shakespeare`` with ``trainer.max_time`` set to nanoGPT's measured wall time;
   its validation loss covers the same last 10% of the text, in nats per byte (``val_bpb · ln 2``).

It prints both figures, their ratio, the load average and the threads used, then one JSON line.

    python bench/race.py --nanogpt /path/to/nanoGPT
    python bench/race.py --nanogpt /path/to/nanoGPT --gptmini "model.n_layer=6"   # try a recipe change

nanoGPT (MIT) is not part of this repository: clone it anywhere (``git clone
https://github.com/karpathy/nanoGPT``) and pass its folder. The harness copies what it runs into ``--out``,
so the clone is never written to.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# nanoGPT's README, "I only have a macbook" (its CPU recipe), word for word apart from --out_dir.
NANOGPT_RECIPE = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
    "--out_dir=out-race",
]
# Scores nanoGPT's checkpoint on the whole validation split, run inside the copied nanoGPT folder so its
# model.py is the one imported. Prints one JSON line.
SCORE_NANOGPT = r"""
import json, math, sys
import numpy as np, torch
from model import GPT, GPTConfig
ckpt = torch.load("out-race/ckpt.pt", map_location="cpu", weights_only=False)
model = GPT(GPTConfig(**ckpt["model_args"]))
state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
model.load_state_dict(state)
model.eval()
val = np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64)
T = ckpt["model_args"]["block_size"]
n = (len(val) - 1) // T
x = torch.from_numpy(val[: n * T]).view(n, T)
y = torch.from_numpy(val[1 : n * T + 1]).view(n, T)
total = 0.0
with torch.no_grad():
    for i in range(0, n, 256):
        logits, _ = model(x[i : i + 256], y[i : i + 256])  # with targets: logits at every position
        rows, targets = logits.flatten(0, 1), y[i : i + 256].flatten()
        total += torch.nn.functional.cross_entropy(rows, targets, reduction="sum").item()
print(json.dumps({"nats_per_char": total / (n * T), "targets": n * T, "iter_num": ckpt["iter_num"]}))
"""


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def run(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> float:
    """Run ``cmd`` in ``cwd`` with its output in ``log``; return its wall time in seconds."""
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        what = " ".join(cmd[:3])
        sys.exit(f"{what} ... failed (exit {done.returncode}); the end of {log}:\n" + "\n".join(tail))
    return seconds


def prepare_nanogpt(source: Path, text: Path, work: Path) -> Path:
    """A copy of nanoGPT's code in ``work``, with its shakespeare_char data made from ``text``."""
    for needed in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py"):
        if not (source / needed).is_file():
            sys.exit(f"--nanogpt {source} has no {needed}; pass the folder of a nanoGPT clone.")
    folder = work / "nanogpt"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".git", "*.bin", "*.pkl", "out*", "assets"))
    data = folder / "data" / "shakespeare_char"
    shutil.copyfile(text, data / "input.txt")  # prepare.py downloads only when input.txt is missing
    run([sys.executable, "prepare.py"], data, work / "nanogpt_prepare.log")
    return folder


def race_nanogpt(folder: Path, work: Path) -> dict:
    seconds = run([sys.executable, "train.py", *NANOGPT_RECIPE], folder, work / "nanogpt_train.log")
    scored = subprocess.run(
        [sys.executable, "-c", SCORE_NANOGPT], cwd=folder, capture_output=True, text=True, check=True
    )
    return {"wall_s": seconds, **json.loads(scored.stdout.strip().splitlines()[-1])}


def race_gptmini(text: Path, seconds: float, work: Path, threads: str, extra: list[str]) -> dict:
    run_dir = work / "gptmini_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "experiment=shakespeare",
        f"data.path={text}",
        f"trainer.max_time={{seconds:{seconds:.1f}}}",
        f"threads={threads}",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    wall = run(cmd, REPO_ROOT, work / "gptmini_train.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "wall_s": wall,
        "train_time_s": summary.get("train_time_s"),
        "steps": summary.get("steps"),
        "nats_per_byte": summary["val_bpb"] * math.log(2),
        "threads": (summary.get("threads_choice") or {}).get("threads"),
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT clone (read only)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="tinyshakespeare.txt")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "race")
    parser.add_argument("--threads", default="auto", help="gptmini's threads= (nanoGPT uses torch's default)")
    parser.add_argument("--gptmini", default="", help="extra train.py overrides, space-separated")
    args = parser.parse_args()
    if not args.text.is_file():
        sys.exit(f"--text {args.text} does not exist; pass a copy of tinyshakespeare.txt.")
    args.out.mkdir(parents=True, exist_ok=True)
    import torch  # only for the thread count nanoGPT runs with

    load_before = load()
    folder = prepare_nanogpt(args.nanogpt.resolve(), args.text.resolve(), args.out)
    nano = race_nanogpt(folder, args.out)
    mini = race_gptmini(args.text.resolve(), nano["wall_s"], args.out, args.threads, args.gptmini.split())
    load_after = load()
    ratio = mini["nats_per_byte"] / nano["nats_per_char"]
    print(f"\nload average before {load_before}, after {load_after}; {os.cpu_count()} cores")
    print("| run | wall s | train s | steps | threads | val nats/byte |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| nanoGPT README CPU recipe | {nano['wall_s']:.1f} | | {nano['iter_num']} | "
        f"{torch.get_num_threads()} | {nano['nats_per_char']:.4f} |"
    )
    print(
        f"| gptmini experiment=shakespeare | {mini['wall_s']:.1f} | {mini['train_time_s']:.1f} | "
        f"{mini['steps']} | {mini['threads']} | {mini['nats_per_byte']:.4f} |"
    )
    print(f"\ngptmini / nanoGPT: {ratio:.3f}")
    result = {
        "nanogpt_nats_per_byte": round(nano["nats_per_char"], 4),
        "gptmini_nats_per_byte": round(mini["nats_per_byte"], 4),
        "ratio": round(ratio, 4),
        "nanogpt_wall_s": round(nano["wall_s"], 1),
        "gptmini_wall_s": round(mini["wall_s"], 1),
        "gptmini_train_s": mini["train_time_s"],
        "gptmini_steps": mini["steps"],
        "gptmini_threads": mini["threads"],
        "nanogpt_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_after,
        "gptmini_overrides": args.gptmini,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
