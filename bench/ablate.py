"""Ablation: what each switch beyond GPT-2's recipe buys on Tiny Shakespeare in a fixed training-time budget.

Every row is a set of Hydra overrides on top of ``experiment=shakespeare``, trained as ``python train.py``
in a subprocess, one run at a time (runs side by side would share the CPU and slow each other), once per
seed, with ``trainer.max_time=<budget> optim.schedule_by=time``: the schedule spans exactly the budget and
the run ends with one validation on the full validation split. Each run records val nats/byte
(``val_bpb · ln 2``), steps, tokens/s, the torch thread count and ``os.getloadavg()`` before and after (on a
shared machine the load includes other people's jobs). Results are appended to ``<out>/results.jsonl``; a
(row, seed) already there is not run again, so the ablation can be extended or resumed. It prints a table
(mean over seeds, half the max-min spread, the difference to the baseline) and ends with one JSON line.

    python bench/ablate.py --rows baseline,rope --seeds 1,2
    python bench/ablate.py --row "muon_lr04=optim=muon optim.muon_lr=0.04" --seeds 1
    python bench/ablate.py --table-only          # the table of what is in results.jsonl

On a shared machine a wall-clock budget measures the other jobs as much as the recipe (at a load average
of 6 on 2 cores a run gets a third of the steps it gets alone). ``--cpu-budget S`` gives every row the same
CPU time instead: each row's training step (its model, its optimizer, one thread) is timed with
``time.process_time`` in this process, and the row then trains for ``S / (CPU seconds per step)`` steps
with a step-based schedule, which makes its result independent of the load (and lets ``--jobs 2`` run two
rows side by side).

    python bench/ablate.py --cpu-budget 60 --rows baseline,rope,muon --seeds 1,2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# The baseline is experiment=shakespeare as it was before this ablation (4 x 128, BPE 2048, AdamW 3e-3,
# cosine), fitted to the budget; these overrides restore it whatever the experiment file now says. Each
# other row changes one thing. --no-baseline-recipe runs the rows on today's experiment=shakespeare.
BASELINE_RECIPE = [
    "model.pos_emb=learned",
    "model.norm=layernorm",
    "model.qk_norm=false",
    "model.mlp=gelu",
    "model.tie_embeddings=true",
    "model.n_kv_head=null",
    "model.logit_softcap=null",
    "optim=adamw",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_steps=100",
    "optim.schedule=cosine",
    "optim.embed_lr=null",
    # what the experiment gained after this ablation (docs/ablations.md, rounds 3 and 5)
    "optim.weight_decay=0.1",
    "optim.decay_fraction=0.2",
    "model.value_embeds=false",
    "callbacks.ema=null",
]
ROWS: dict[str, list[str]] = {
    "baseline": [],
    "rope": ["model.pos_emb=rope"],
    "rmsnorm": ["model.norm=rmsnorm"],
    "qk_norm": ["model.qk_norm=true"],
    "relu2": ["model.mlp=relu2"],
    "swiglu": ["model.mlp=swiglu"],
    "gqa2": ["model.n_kv_head=2"],
    "untied": ["model.tie_embeddings=false"],
    "softcap15": ["model.logit_softcap=15"],
    "wsd": ["optim.schedule=wsd"],
    "muon": ["optim=muon", "optim.muon_lr=0.02"],
    "warmup30": ["optim.warmup_steps=30"],
    # The switches that helped alone (docs/ablations.md), together.
    "best": [
        "model.pos_emb=rope",
        "model.tie_embeddings=false",
        "model.n_kv_head=2",
        "model.mlp=relu2",
        "optim=muon",
        "optim.muon_lr=0.02",
        "optim.schedule=wsd",
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="", help=f"comma-separated names from: {', '.join(ROWS)}")
    parser.add_argument(
        "--row", action="append", default=[], help='an ad-hoc row, "NAME=override override ..."'
    )
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds")
    parser.add_argument("--budget", type=int, default=120, help="training seconds per run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared 2-core machine, 2 threads stall)",
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="path of tinyshakespeare.txt")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "ablate"), help="results folder")
    parser.add_argument("--no-baseline-recipe", action="store_true", help="rows on today's experiment as is")
    parser.add_argument("--table-only", action="store_true", help="print the table of results.jsonl only")
    parser.add_argument(
        "--cpu-budget", type=float, default=None, help="equal CPU seconds per row instead of wall seconds"
    )
    parser.add_argument("--baseline", default="baseline", help="the row the Δ column compares with")
    parser.add_argument("--jobs", type=int, default=1, help="rows run side by side (--cpu-budget only)")
    return parser.parse_args(argv)


def selected_rows(args: argparse.Namespace) -> dict[str, list[str]]:
    rows = {}
    for name in filter(None, args.rows.split(",")):
        if name not in ROWS:
            raise SystemExit(f"error: unknown row {name!r}; known: {', '.join(ROWS)}")
        rows[name] = ROWS[name]
    for spec in args.row:
        name, _, overrides = spec.partition("=")
        rows[name] = overrides.split()
    return rows


def budget_string(seconds: int) -> str:
    """Seconds as Lightning's "DD:HH:MM:SS"."""
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# Overrides that change numbers, not the computation of a step.
RATE_KEYS = (
    "optim.lr=",
    "optim.min_lr=",
    "optim.muon_lr=",
    "optim.embed_lr=",
    "optim.head_lr=",
    "optim.warmup_steps=",
    "optim.schedule=",
    "optim.decay_fraction=",
    "optim.weight_decay=",
    "model.zero_init_proj=",  # an initialisation: the same step
)


def compute_key(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that decide what a training step computes (so its cost)."""
    return tuple(sorted(o for o in overrides if not o.startswith(RATE_KEYS)))


def cpu_seconds_per_step(overrides: list[str], args: argparse.Namespace) -> float:
    """Median CPU seconds of one training step (loss, backward, clipping, optimizer) of the row's model and
    optimizer on a batch of experiment=shakespeare's shape, with ``args.threads`` threads."""
    import torch

    from gptmini import GPT
    from gptmini.common import as_config
    from gptmini.training.config import compose_config
    from gptmini.training.optim import OptimConfig, build_optimizer
    from gptmini.training.settings import model_config_from

    base = [] if args.no_baseline_recipe else BASELINE_RECIPE
    cfg = compose_config(["experiment=shakespeare", *base, *overrides])
    torch.set_num_threads(args.threads)
    vocab = cfg.tokenizer.vocab_size
    torch.manual_seed(0)
    model = GPT(model_config_from(cfg, vocab))
    optimizer = build_optimizer(model, as_config(cfg.optim, OptimConfig, "optim"), "cpu")
    x = torch.randint(0, vocab, (cfg.data.batch_size, model.config.block_size))
    y = torch.randint(0, vocab, x.shape)
    times = []
    for i in range(12):
        started = time.process_time()
        loss = model.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if i >= 4:  # after warm-up
            times.append(time.process_time() - started)
    return statistics.median(times)


def run_one(name: str, overrides: list[str], seed: int, args: argparse.Namespace, steps: int = 0) -> dict:
    """Train one (row, seed) in its own process; ``steps`` > 0: that many steps instead of the time budget."""
    run_dir = Path(args.out) / f"{name}-s{seed}-{time.time_ns()}"
    base = [] if args.no_baseline_recipe else BASELINE_RECIPE
    if steps:
        budget = [f"trainer.max_steps={steps}", "optim.schedule_by=steps", "trainer.max_time=null"]
    else:
        budget = [f"trainer.max_time={budget_string(args.budget)}", "optim.schedule_by=time"]
    command = [
        sys.executable,
        "train.py",
        "experiment=shakespeare",
        f"data.path={args.data}",
        *base,
        *overrides,
        f"seed={seed}",
        f"threads={args.threads}",
        *budget,
        "trainer.val_check_interval=1000000",  # one validation, at the end: the budget is all training
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "sample.max_new_tokens=0",
        f"hydra.run.dir={run_dir}",
    ]
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    record = {
        "row": name,
        "seed": seed,
        "overrides": overrides,
        "budget_s": args.cpu_budget if steps else args.budget,
        "budget_kind": "cpu" if steps else "wall",
        "threads": args.threads,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "process_s": round(wall, 1),
        "run_dir": str(run_dir),
    }
    summary_file = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        record["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return record
    summary = json.loads(summary_file.read_text())
    record.update(
        nats_per_byte=summary["val_bpb"] * math.log(2),
        val_bpb=summary["val_bpb"],
        val_loss=summary["val_loss"],
        steps=summary["steps"],
        tokens_per_s=summary["tokens_per_s"],
        train_time_s=summary.get("train_time_s"),
        n_params=summary["n_params"],
    )
    return record


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(results: list[dict], baseline: str = "baseline") -> tuple[str, list[dict]]:
    """A markdown table, one line per row name in first-seen order, and the same figures as dicts.

    Δ is paired by seed: the mean over the row's seeds of (row − ``baseline`` with the same seed), so a row
    run with fewer seeds is compared with the baseline's runs on those seeds only."""
    by_row: dict[str, list[dict]] = {}
    for r in results:
        if "nats_per_byte" in r:
            by_row.setdefault(r["row"], []).append(r)
    base = {r["seed"]: r["nats_per_byte"] for r in by_row.get(baseline, [])}
    lines = [
        "| row | overrides | seeds | nats/byte (mean) | ± (half range) | Δ vs baseline | steps | tokens/s | "
        "params | load 1-min (before→after) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for name, runs in by_row.items():
        values = [r["nats_per_byte"] for r in runs]
        mean = statistics.mean(values)
        spread = (max(values) - min(values)) / 2
        paired = [r["nats_per_byte"] - base[r["seed"]] for r in runs if r["seed"] in base]
        delta = statistics.mean(paired) if paired else None
        load = ", ".join(
            f"{r['load_before'][0]:.1f}→{r['load_after'][0]:.1f}" if r.get("load_before") else "?"
            for r in runs
        )
        rows.append({"row": name, "mean": mean, "half_range": spread, "delta": delta, "n": len(runs)})
        delta_text = "–" if delta is None or name == baseline else f"{delta:+.4f}"
        lines.append(
            f"| {name} | `{' '.join(runs[0]['overrides']) or '(experiment=shakespeare)'}` | "
            f"{','.join(str(r['seed']) for r in runs)} | {mean:.4f} | {spread:.4f} | {delta_text} | "
            f"{statistics.mean(r['steps'] for r in runs):.0f} | "
            f"{statistics.mean(r['tokens_per_s'] or 0 for r in runs):,.0f} | {runs[0]['n_params']:,} | "
            f"{load} |"
        )
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    if not args.table_only:
        if not Path(args.data).is_file():
            raise SystemExit(f"error: Tiny Shakespeare not found at {args.data}; pass --data PATH")
        done = {(r["row"], r["seed"]) for r in read_results(results_file) if "nats_per_byte" in r}
        rows = selected_rows(args)
        steps = {name: 0 for name in rows}
        if args.cpu_budget:
            # Rows that change only rates or the schedule compute what another row does: time each distinct
            # computation once per round, in five interleaved rounds (a change of load shifts all alike).
            # A computation timed by an earlier invocation into the same --out keeps its timing, so rows added
            # later train for the same number of steps as the rows they are compared with.
            groups = {name: compute_key(overrides) for name, overrides in rows.items()}
            timed_file = out / "cpu_ms_per_step.json"
            timed = json.loads(timed_file.read_text()) if timed_file.is_file() else {}
            new = {key for key in groups.values() if " ".join(key) not in timed}
            # The machine's speed drifts between invocations (2x between days here), and a new row must get
            # the steps it would have got beside the rows timed before: the recipe's own step (key ()) is
            # timed again in the same rounds, and the new times are scaled by its recorded/measured ratio.
            anchor = [()] if new and "" in timed and () not in new else []
            timings: dict[tuple, list[float]] = {key: [] for key in [*sorted(new), *anchor]}
            for _ in range(5 if new else 0):
                for key in timings:
                    timings[key].append(cpu_seconds_per_step(list(key), args))
            scale = 1.0
            if anchor:
                scale = timed[""] / (statistics.median(timings[()]) * 1e3)
                print(
                    f"the recipe's step: {timed['']:.0f} CPU ms recorded, "
                    f"{timed[''] / scale:.0f} now: new rows' times x {scale:.3f}",
                    flush=True,
                )
            timed.update({" ".join(key): statistics.median(timings[key]) * 1e3 * scale for key in new})
            timed_file.write_text(json.dumps(timed, indent=1))
            for name, key in groups.items():
                per_step = timed[" ".join(key)] / 1e3
                steps[name] = max(1, round(args.cpu_budget / per_step))
                print(f"{name}: {per_step * 1e3:.0f} CPU ms/step -> {steps[name]} steps", flush=True)
        todo = [(n, s) for s in [int(s) for s in args.seeds.split(",")] for n in rows if (n, s) not in done]
        lock = threading.Lock()

        def run_and_record(job: tuple[str, int]) -> None:
            name, seed = job
            record = run_one(name, rows[name], seed, args, steps[name])
            with lock, results_file.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            figure = record.get("nats_per_byte")
            shown = f"{figure:.4f} nats/byte" if figure is not None else f"FAILED: {record['error']}"
            print(f"{name} seed {seed}: {shown}, load {record['load_before'][0]}", flush=True)

        jobs = args.jobs if args.cpu_budget else 1  # wall-clock rows must not share the CPU
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(run_and_record, todo))
    text, rows = table(read_results(results_file), args.baseline)
    print(text)
    budget = {"cpu_budget_s": args.cpu_budget} if args.cpu_budget else {"budget_s": args.budget}
    print(json.dumps({"bench": "ablate", **budget, "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
