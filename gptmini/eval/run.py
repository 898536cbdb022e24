"""``run_eval(cfg) -> result``: what ``python -m gptmini.eval`` runs, importable so tests call it directly.

It loads the checkpoint (``gptmini.weights.load_checkpoint``: anything it accepts), runs the task,
prints the figures on stderr-free stdout lines and, last, one JSON line with the result.
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig

from gptmini.common import CONFIG_DIR, as_config, pick_device
from gptmini.eval import hellaswag
from gptmini.eval.config import EvalConfig
from gptmini.eval.val import evaluate_val
from gptmini.weights import load_checkpoint

SCHEMA_NAME = "eval_schema"


def register_config() -> None:
    """Make ``eval_schema`` available to configs/eval.yaml's defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=EvalConfig)


def compose_eval(overrides: list[str]) -> DictConfig:
    """configs/eval.yaml composed with ``overrides`` (``key=value`` strings, as on the command line)."""
    from hydra import compose, initialize_config_dir

    register_config()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def run_eval(cfg: DictConfig | dict | EvalConfig) -> dict:
    """Evaluate ``cfg.ckpt`` on ``cfg.task``; print the figures, then one JSON line; return the result."""
    config = as_config(cfg, EvalConfig, "eval")  # checked; a mapping of its keys becomes an EvalConfig
    device = pick_device(config.device)
    started = time.perf_counter()
    if config.task == "hellaswag":  # read the examples first: an offline Hub fails before the model loads
        examples = hellaswag.load_examples(config.path, config.hub, config.limit)
    loaded = load_checkpoint(config.ckpt, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    result = {"task": config.task, "ckpt": str(loaded.path)}
    if config.task == "hellaswag":
        figures = hellaswag.score(model, tokenizer, examples, device)
        result.update(figures)
        print(f"hellaswag: {figures['n']} examples from {config.path or config.hub}")
        print(f"  acc       {figures['acc']:.4f}  ({figures['correct']}/{figures['n']}, lowest total loss)")
        norm = f"{figures['correct_norm']}/{figures['n']}"
        print(f"  acc_norm  {figures['acc_norm']:.4f}  ({norm}, lowest mean loss per token)")
    else:
        figures = evaluate_val(model, tokenizer, config.data, device, config.batch_size, config.limit)
        result.update(figures)
        print(f"val: {figures['tokens']:,} tokens in {figures['windows']} windows of data={config.data.name}")
        print(f"  val_loss  {figures['val_loss']:.4f} nats/token")
        print(f"  val_bpb   {figures['val_bpb']:.4f} bits/byte")
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result))
    return result
