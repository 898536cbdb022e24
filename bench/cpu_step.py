"""Where a CPU training step of ``experiment=shakespeare`` goes, and what the optimizer's two speed-ups buy.

    python bench/cpu_step.py                       # 2 threads, the race's model (4 x 4 x 128, B=16, T=128)
    python bench/cpu_step.py --threads 1 --override model.value_embeds=true

Times, in one process with the parts interleaved over ``--rounds`` (a load that comes and goes hits them
alike; each part's median is reported):
- forward + backward (``GPT.loss`` and ``backward``: what ``threads=auto`` times), and the same with
  ReLU² left to autograd's chain (``F.relu(x).square()``) instead of ``ReLUSquared``'s written-out backward;
- Muon's Newton-Schulz on the blocks' matrices, one matrix at a time against stacked by shape (what
  ``Float32Muon`` does);
- AdamW on the other parameters, one tensor at a time (torch's CPU default) against fused (what
  ``build_optimizer`` builds on a CPU);
- the whole step as train.py runs it (loss, backward, clipping, ``MuonWithAdamW``).

It prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from gptmini import GPT
from gptmini.training.config import compose_config
from gptmini.training.optim import build_optimizer, muon_parameters, orthogonalize, rate_groups
from gptmini.training.settings import model_config_from

NS = ((3.4445, -4.7750, 2.0315), 5, 1e-7)  # torch's Muon coefficients, steps, eps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048, help="the tokenizer's size (experiment: 2048)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--override", action="append", default=[], help="a Hydra override, KEY=VALUE")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_config(["experiment=shakespeare", *args.override])
    torch.manual_seed(0)
    model = GPT(model_config_from(cfg, tokenizer_vocab=args.vocab))
    batch = torch.randint(0, args.vocab, (cfg.data.batch_size, model.config.block_size + 1))
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def forward_backward() -> None:
        model.loss(inputs, targets).backward()

    def forward_backward_autograd_relu2() -> None:
        mlps = [block.mlp for block in model.blocks]
        own = [mlp.act for mlp in mlps]
        for mlp in mlps:
            mlp.act = lambda x: F.relu(x).square()
        try:
            model.zero_grad(set_to_none=True)
            forward_backward()
        finally:
            for mlp, act in zip(mlps, own, strict=True):
                mlp.act = act

    forward_backward()  # gradients for the optimizer parts below
    matrices = [p.grad.clone() for p in muon_parameters(model)]
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for m in matrices:
        by_shape.setdefault(tuple(m.shape), []).append(m)
    hidden = {id(p) for p in muon_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in hidden]
    adamw_single = torch.optim.AdamW(rate_groups(model, rest, cfg.optim), lr=cfg.optim.lr, foreach=False)
    adamw_fused = torch.optim.AdamW(rate_groups(model, rest, cfg.optim), lr=cfg.optim.lr, fused=True)
    optimizer = build_optimizer(model, cfg.optim, "cpu", "32-true", clipping=True)

    def whole_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(inputs, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    parts = {
        "forward + backward": lambda: (model.zero_grad(set_to_none=True), forward_backward()),
        **(
            {"forward + backward, ReLU² by autograd's chain": forward_backward_autograd_relu2}
            if model.config.mlp == "relu2"
            else {}
        ),
        "Muon Newton-Schulz, one matrix at a time": lambda: [orthogonalize(m, *NS) for m in matrices],
        "Muon Newton-Schulz, stacked by shape": lambda: [
            orthogonalize(torch.stack(ms), *NS) for ms in by_shape.values()
        ],
        "AdamW, one tensor at a time": adamw_single.step,
        "AdamW, fused": adamw_fused.step,
        "whole step (train.py's optimizer)": whole_step,
    }
    forward_backward()  # gradients again for the AdamW parts (whole_step leaves its own)
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for round_ in range(args.rounds + 2):  # two warm-up rounds, not recorded
        for name, part in parts.items():
            start = time.perf_counter()
            part()
            if round_ >= 2:
                seconds[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(s) * 1000 for name, s in seconds.items()}

    load = os.getloadavg()
    print(
        f"experiment=shakespeare {' '.join(args.override)}: {model.config.n_layer} x {model.config.n_embd}, "
        f"B={cfg.data.batch_size}, T={model.config.block_size}, vocab {args.vocab}; {args.threads} threads; "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; median of {args.rounds} interleaved rounds"
    )
    print("| part | ms |\n|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} |")
    print(
        json.dumps(
            {
                "bench": "cpu_step",
                "threads": args.threads,
                "overrides": args.override,
                "load": [round(x, 2) for x in load],
                "ms": {k: round(v, 2) for k, v in ms.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
