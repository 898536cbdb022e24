"""What averaging the weights buys: one run, its own weights and their averages scored side by side.

    python bench/weight_average.py --data /path/to/tinyshakespeare.txt --seed 1 --steps 591
    python bench/weight_average.py --data ... --seed 2 --steps 577 --override model.value_embeds=false

One ``experiment=shakespeare`` run with a step-based schedule (``--steps``, 1 thread: the ablation's regime,
docs/ablations.md) keeps, beside the weights it trains, exponential moving averages of them at each
``--decays`` value and a plain average of the last quarter of the steps. At the end each is scored on the
whole validation split in nats per byte. The comparison is paired: every average comes from the same run
as the weights it is compared with, so the seed-to-seed spread (~0.005 here) does not enter it.

The preset's own average (``callbacks.ema``) is switched off for the run: the weights it trains are then the
plain ones. It prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import lightning as L
import torch

from gptmini.training.config import compose_config
from gptmini.training.run import train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt (or any text for data=text)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=591, help="optimizer steps (the ablation's 591)")
    parser.add_argument("--decays", default="0.95,0.98,0.99", help="comma-separated EMA decays")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", action="append", default=[], help="a Hydra override, KEY=VALUE")
    return parser.parse_args()


class Averages(L.Callback):
    """EMAs of the model's weights (from the first step) and the plain mean of the last quarter's."""

    def __init__(self, decays: list[float], steps: int) -> None:
        self.decays, self.steps = decays, steps
        self.ema: dict[float, list[torch.Tensor]] = {}
        self.tail: list[torch.Tensor] | None = None
        self.tail_count = 0
        self.scores: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weights = [p.detach() for p in pl_module.model.parameters()]
        for decay in self.decays:
            if decay not in self.ema:
                self.ema[decay] = [w.clone() for w in weights]
            else:
                torch._foreach_lerp_(self.ema[decay], weights, 1 - decay)
        if trainer.global_step > 0.75 * self.steps:
            self.tail_count += 1
            if self.tail is None:
                self.tail = [w.clone() for w in weights]
            else:  # the running mean: m += (w - m) / n
                torch._foreach_lerp_(self.tail, weights, 1 / self.tail_count)

    def on_train_end(self, trainer, pl_module) -> None:
        model, datamodule = pl_module.model, trainer.datamodule
        trained = [p.detach().clone() for p in model.parameters()]
        candidates = {"trained weights": trained}
        candidates |= {f"EMA {decay}": weights for decay, weights in self.ema.items()}
        if self.tail is not None:
            candidates[f"mean of the last {self.tail_count} steps"] = self.tail
        for name, weights in candidates.items():
            with torch.no_grad():
                for param, value in zip(model.parameters(), weights, strict=True):
                    param.copy_(value)
            self.scores[name] = nats_per_byte(model, datamodule)
        with torch.no_grad():
            for param, value in zip(model.parameters(), trained, strict=True):
                param.copy_(value)


def nats_per_byte(model, datamodule) -> float:
    """Mean loss over every validation target, per byte of text: the run's own validation windows
    (``gptmini.eval.val.evaluate_val`` would open the token cache again from a tokenizer and data config)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            total += model.loss(x, y).item() * y.numel()
            count += y.numel()
    model.train()
    return total / count / datamodule.val_bytes_per_token


def main() -> None:
    args = parse_args()
    decays = [float(d) for d in args.decays.split(",")]
    averages = Averages(decays, args.steps)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config(
            [
                "experiment=shakespeare",
                f"data.path={args.data}",
                "callbacks.ema=null",  # the run trains and keeps its plain weights; the averages are ours
                *args.override,
                f"seed={args.seed}",
                f"threads={args.threads}",
                f"trainer.max_steps={args.steps}",
                "optim.schedule_by=steps",
                "trainer.max_time=null",
                "trainer.val_check_interval=1000000",
                "trainer.enable_progress_bar=false",
                "sample.max_new_tokens=0",
            ]
        )
        train(cfg, out_dir=run_dir, extra_callbacks=[averages])
    base = averages.scores["trained weights"]
    load = os.getloadavg()
    print(f"seed {args.seed}, {args.steps} steps, {args.threads} threads, overrides {args.override}")
    print(f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| weights | nats/byte | Δ vs trained |\n|---|---|---|")
    for name, value in averages.scores.items():
        print(f"| {name} | {value:.4f} | {value - base:+.4f} |")
    summary = {"bench": "weight_average", "seed": args.seed, "steps": args.steps, "threads": args.threads}
    summary |= {"overrides": args.override, "nats_per_byte": averages.scores}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
