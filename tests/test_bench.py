"""Benchmarks: each script runs in its smallest mode and ends with one JSON line; no timing assertions.

The chunked loss the training benchmark measures is tested in test_loss.py.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_script(*command: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Run a bench command from the repository root; return its last stdout line, parsed as JSON."""
    proc = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


# ----- the bench scripts ------------------------------------------------------------------------------------

TRAIN_LOOP_KEYS = {
    "ms_per_step_median",
    "ms_per_step_mean",
    "tokens_per_s",
    "mfu",
    "peak_mem_mb",
    "first_step_s",
}


def check_train_summary(summary: dict, loops: tuple[str, ...] = ("plain", "lightning")) -> None:
    assert summary["bench"] == "train"
    assert {"mode", "steps", "warmup", "machine", "results"} <= set(summary)
    for row in summary["results"]:
        for loop in loops:
            assert TRAIN_LOOP_KEYS <= set(row[loop]), row[loop]
            assert row[loop]["tokens_per_s"] > 0
        if set(loops) == {"plain", "lightning"}:
            assert row["lightning_over_plain"] > 0


def load_bench(name: str):
    """bench/<name>.py imported as a module (the bench folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "n_settings"),
    [
        ([], 1),
        (["--nanogpt-cpu"], 1),
        (["--smoke"], 1),
        (["--gpt2"], 6),
        (["--gpt2", "--small", "--compile", "off"], 3),
    ],
)
def test_train_bench_settings_compose(argv, n_settings):
    """Every setting of every mode is a valid config and model, without running a step."""
    from gptmini.training.settings import model_config_from

    bench = load_bench("train")
    args = bench.parse_args([*argv, "--device", "cpu"])
    settings = bench.settings_for(args)
    assert len(settings) == n_settings
    for _, overrides in settings:
        cfg = bench.train_config(overrides, args, torch.device("cpu"))
        assert cfg.trainer.accelerator == "cpu" and cfg.callbacks.model_checkpoint is None
        model_config_from(cfg, cfg.model.vocab_size)


def test_attention_bench_smallest():
    summary = run_script(
        sys.executable, "bench/attention.py", "--small", "--device", "cpu", "--batch", "1", "--seq", "16",
        "--embd", "32", "--heads", "2", "--warmup", "1", "--repeats", "1",
    )  # fmt: skip
    assert {"device", "dtype", "results"} <= set(summary)
    assert all({"forward_ms", "forward_backward_ms"} <= set(r) for r in summary["results"].values())


def test_cpu_step_bench_smallest():
    summary = run_script(
        sys.executable, "bench/cpu_step.py", "--threads", "1", "--rounds", "1", "--vocab", "64",
        "--override", "model.n_layer=1", "--override", "model.n_embd=32", "--override", "model.block_size=16",
    )  # fmt: skip
    assert summary["bench"] == "cpu_step" and summary["threads"] == 1
    parts = summary["ms"]
    assert all(ms > 0 for ms in parts.values())
    assert {"forward + backward", "AdamW, fused", "whole step (train.py's optimizer)"} <= set(parts)
    assert sum("Muon" in name for name in parts) == 2  # one matrix at a time, and stacked
    assert "forward + backward, ReLU² by autograd's chain" in parts  # the preset's MLP is ReLU²


def test_weight_average_bench_smallest(tmp_path, write_corpus):
    corpus = write_corpus(tmp_path / "corpus")
    small = ["data=text", f"data.cache_dir={tmp_path / 'cache'}", "tokenizer.vocab_size=300"]
    small += ["model.n_layer=1", "model.n_embd=32", "model.block_size=16", "data.batch_size=4"]
    overrides = [arg for override in small for arg in ("--override", override)]
    command = [sys.executable, "bench/weight_average.py", "--data", str(corpus), "--steps", "8"]
    summary = run_script(*command, "--decays", "0.5,0.9", *overrides)
    assert summary["bench"] == "weight_average" and summary["steps"] == 8
    scores = summary["nats_per_byte"]
    assert set(scores) == {"trained weights", "EMA 0.5", "EMA 0.9", "mean of the last 2 steps"}
    assert all(0 < value < 10 for value in scores.values())
    assert len(set(scores.values())) == len(scores)  # each average is its own weights


def test_generate_bench_smallest():
    summary = run_script(
        sys.executable, "bench/generate.py", "--device", "cpu", "--skip-gpt2", "--default-shape", "2", "2",
        "32", "32", "128", "--new-tokens", "4", "--prompt-tokens", "2", "--repeats", "2", "--compile", "off",
        "--threads", "auto",
    )  # fmt: skip
    assert {"device", "new_tokens", "results", "load_avg"} <= set(summary)
    row = summary["results"][0]
    assert {"cache_tok_s", "no_cache_tok_s", "speedup"} <= set(row)
    assert row["threads_how"] == "auto" and row["threads"] >= 1  # the count it ran with is reported
    assert len(row["runs_tok_s"]["cache"]) == len(row["runs_tok_s"]["no_cache"]) == 2
    assert row["compiled_tok_s"] is None  # --compile off


@pytest.mark.slow
def test_gpu_script_small_mode(tmp_path):
    """bench/gpu.sh --small: every bench it runs ends well, and the last line gathers their JSON."""
    # The script's own deadline is for a GPU session; on a busy CPU the plumbing check may take longer.
    env = {"OUT": str(tmp_path), "GPU_BENCH_SECONDS": "1500"}
    summary = run_script("bash", "bench/gpu.sh", "--small", env=env, timeout=1600)
    assert summary["bench"] == "gpu" and summary["small"] is True
    results = summary["results"]
    expected = {"attention", "train_gpt2", "train_sdpa_math", "train_standard_loss", "profile_step"}
    assert expected | {"generate"} <= set(results)
    failed = {name: r for name, r in results.items() if "error" in r or "skipped" in r}
    assert not failed, failed
    check_train_summary(results["train_gpt2"])
    assert results["train_gpt2"]["results"][0]["plain"]["mfu"] is None  # a CPU has no known peak: no guess
    check_train_summary(results["train_sdpa_math"], loops=("plain",))
    # The switches reach the bench (this also covers bench/train.py's --loss and --sdpa-backend flags).
    assert results["train_sdpa_math"]["sdpa_backend"] == "math"
    assert results["train_standard_loss"]["loss"] == "standard"
    check_train_summary(results["train_standard_loss"], loops=("plain",))
    assert json.loads((tmp_path / "summary.json").read_text())["results"].keys() == results.keys()


@pytest.mark.slow
def test_data_bench_smallest():
    summary = run_script(sys.executable, "bench/data.py", "--big-mb", "0", "--skip-gpt2", "--repeats", "1")
    assert summary["bench"] == "data"
    assert summary["results"]


def test_structure_counts_modules_and_finds_no_import_circle():
    result = run_script(sys.executable, "bench/structure.py")
    assert result["modules"] == len(list((REPO_ROOT / "gptmini").rglob("*.py")))
    assert result["lines"] >= result["code_lines"] > 0
    assert result["circles"] == []  # the flow runs one way: no two modules import each other
    assert "gptmini.training.run" in result["train_path"]
    assert not any(module.startswith("gptmini.generation.text") for module in result["train_path"])


def test_race_refuses_a_folder_that_is_not_nanogpt(tmp_path):
    """bench/race.py names the missing file instead of failing inside nanoGPT's train.py."""
    (tmp_path / "train.py").write_text("")
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\n")
    proc = subprocess.run(
        [
            sys.executable,
            "bench/race.py",
            "--nanogpt",
            str(tmp_path),
            "--text",
            str(text),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"--nanogpt {tmp_path} has no model.py" in proc.stderr


def test_race_runs_nanogpts_readme_cpu_recipe_as_written():
    """The recipe raced against is nanoGPT's README CPU line (only --out_dir is added)."""
    recipe = load_bench("race").NANOGPT_RECIPE
    assert recipe[0] == "config/train_shakespeare_char.py" and recipe[-1] == "--out_dir=out-race"
    assert set(recipe[1:-1]) == {
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
    }
