"""The ``gptmini`` command, ``gptmini <job> [options] [key=value ...]``, and the policy every job runs under.

``JOBS`` is the table of jobs; adding one is one line. A job either composes a Hydra config (``config``): its
function gets the composed config, and Hydra's options all work (``--help``, ``--cfg job``, ``-m`` sweeps,
``--config-dir DIR``, ``hydra.searchpath=[file://DIR]``); or it reads its own ``key=value`` arguments: its
function is the command itself, ``function(argv) -> exit status`` (``python -m gptmini.hf.export`` runs the
same function), built on ``gptmini.common.run_with_arguments``.

Either way the job runs under ``gptmini.common.run_job``, the one error policy of every entry point: one
``error:`` line and status 2 for a mistake or a fault of the machine, 130 for Ctrl-C, a quiet end when the
reader goes away (``| head``), a failed job of a ``-m`` sweep recorded while the sweep goes on.

This module is the top of the package: nothing in gptmini imports it (train.py, generate.py,
``python -m gptmini`` and ``python -m gptmini.eval`` do). Nothing heavy is imported until a job runs, so
``gptmini --help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from gptmini import __version__
from gptmini.common import GptMiniError, config_dir, discard_stdout, run_job, run_with_arguments, say


@dataclass(frozen=True)
class Job:
    """One job of the gptmini command."""

    summary: str
    """One line for ``gptmini --help``."""
    run: str
    """``module:function``, imported when the job runs: with a config, ``function(cfg)`` does the work;
    without, ``function(argv)`` is the whole command and returns its exit status."""
    config: str | None = None
    """The Hydra config it composes (``configs/<config>.yaml``); None: the function reads its arguments."""
    schema: str | None = None
    """``module:function`` that registers the config's typed schema with Hydra, called before composing."""
    hydra: tuple[str, ...] = ()
    """Hydra settings of this job, placed before the user's overrides (which may change them)."""
    interrupted: str = "interrupted"
    """What Ctrl-C prints in a job with a config: whether anything was left half-written."""
    quotes_prompt: bool = False
    """Quote a raw ``prompt=...`` argument for Hydra, so it arrives as typed."""


TRAIN_SCHEMA = "gptmini.training.config:register_configs"
# A job that only reads and reports: no run directory, no copy of the config, no log file.
WRITES_NO_RUN_DIR = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")

JOBS: dict[str, Job] = {
    "train": Job(
        "train a GPT (configs/train.yaml); -m runs a sweep",
        "gptmini.cli:train",
        config="train",
        schema=TRAIN_SCHEMA,
        interrupted="interrupted: no cache or checkpoint was left half-written.",
    ),
    "generate": Job(
        "write text from a checkpoint (configs/generate.yaml)",
        "gptmini.generation.text:generate_text",
        config="generate",
        schema="gptmini.generation.text:register_config",
        quotes_prompt=True,
    ),
    "eval": Job(
        "score a checkpoint: task=val or task=hellaswag (configs/eval.yaml)",
        "gptmini.eval.run:run_eval",
        config="eval",
        schema="gptmini.eval.run:register_config",
    ),
    "prepare": Job(
        "build the token cache of a data config and stop (configs/train.yaml's data and tokenizer)",
        "gptmini.cli:prepare",
        config="train",
        schema=TRAIN_SCHEMA,
        hydra=WRITES_NO_RUN_DIR,
        interrupted="interrupted: no cache was left half-written.",
    ),
    "serve": Job(
        "serve a checkpoint: the OpenAI API and a chat page (configs/serve.yaml)",
        "gptmini.serve.run:serve",
        config="serve",
        schema="gptmini.serve.config:register_config",
        interrupted="stopped",
    ),
    "export": Job("write a checkpoint as a Hugging Face GPT-2 folder", "gptmini.hf.export:main"),
    "rebase": Job("point a LoRA checkpoint at another base on purpose", "gptmini.weights:main"),
    "walkthrough": Job("print chapter 3's attention example, step by step", "gptmini.cli:walkthrough"),
}

HELP_FLAGS = ("-h", "--help")
HYDRA_USAGE = (
    "usage: gptmini {name} [key=value ...] [group=option ...] [-m (a sweep)] [--cfg job (print the config)]\n"
    "       [--config-dir DIR (a folder of your own configs)] [--hydra-help]"
)


def main(argv: list[str] | None = None) -> int:
    """``gptmini <job> ...``: the console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        say(usage())
        return 2
    if args[0] in HELP_FLAGS:
        return run_job(lambda: print(usage()))
    if args[0] == "--version":
        return run_job(lambda: print(f"gptmini {__version__}"))
    if args[0] not in JOBS:
        say(f"error: {args[0]!r} is not a gptmini job; the jobs are {', '.join(JOBS)} (gptmini --help).")
        return 2
    return run_command(args[0], args[1:])


def usage() -> str:
    """What ``gptmini --help`` prints: the jobs, one line each."""
    width = max(map(len, JOBS))
    lines = [f"  {name:<{width}}  {job.summary}" for name, job in JOBS.items()]
    return "\n".join(
        [
            "usage: gptmini <job> [options] [key=value ...]",
            "",
            "jobs:",
            *lines,
            "",
            "gptmini <job> --help shows the job's config and options; gptmini --version prints the version.",
            f"configs: {config_dir()}",
            "  your own config folder: --config-dir DIR, or hydra.searchpath=[file:///abs/DIR]",
        ]
    )


def run_command(name: str, argv: list[str]) -> int:
    """Run the job ``name`` with its arguments, under ``run_job``'s policy; return the status."""
    job = JOBS[name]
    if job.config is None:
        return _load(job.run)(argv)
    return _run_with_config(name, job, argv)


def _run_with_config(name: str, job: Job, argv: list[str]) -> int:
    """A job on a Hydra config: ``hydra.main`` parses the arguments, composes and calls the job's function."""
    import hydra

    if job.schema:
        _load(job.schema)()
    function = _load(job.run)

    saved = sys.argv

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=job.config)
    def task(cfg):
        # Back to what the user ran: Lightning's DDP launcher starts each further process by running
        # sys.argv again (the script, or python -m), and that process adds the job's settings itself.
        sys.argv = saved
        result = []
        status = run_job(lambda: result.append(function(cfg)), job.interrupted)
        if status:
            raise SystemExit(status)  # also ends a sweep: Ctrl-C, or a failure outside one
        return result[0] if result else None  # what a Hydra sweeper would optimise (train: val_loss)

    if job.quotes_prompt:
        from gptmini.generation.prompt import quote_prompt_argument

        argv = quote_prompt_argument(argv)
    # What hydra.main reads; the name is argparse's, for --help's usage line.
    sys.argv = [f"gptmini {name}", *_with_job_settings(name, job, argv)]
    try:
        task()
    except SystemExit as done:  # Hydra's own exits (--help, a config typo) and the job's status
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BrokenPipeError:  # Hydra printing --help or --cfg into a closed pipe
        discard_stdout()
        return 0
    finally:
        sys.argv = saved
    return 0


def _with_job_settings(name: str, job: Job, argv: list[str]) -> list[str]:
    """The user's arguments with the job's Hydra settings put just before the user's overrides.

    Before them, so the user's own value of a setting wins; next to them, because Hydra's parser (argparse)
    takes the overrides only as one run, wherever the flags (``-m``, ``--cfg job``) stand.
    """
    settings = [
        f"hydra.job.name={name}",  # names the log file (train.log)
        # What --help shows first; the config and its groups follow (Hydra's help).
        f'hydra.help.header="gptmini {name}: {job.summary}\n{HYDRA_USAGE.format(name=name)}\n"',
        *job.hydra,
    ]
    at = _start_of_overrides(argv)
    return [*argv[:at], *settings, *argv[at:]]


def _start_of_overrides(argv: list[str]) -> int:
    """Where the overrides start in ``argv``, found by Hydra's own parser (0 when there are none, or when
    the arguments do not parse: hydra.main then says what is wrong)."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser  # Hydra's parser (pinned to 1.3 in pyproject.toml)

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            overrides = get_args_parser().parse_args(argv).overrides
    except SystemExit:
        return 0
    n = len(overrides)
    return next((i for i in range(len(argv) - n + 1) if argv[i : i + n] == overrides), 0)


def _load(target: str) -> Callable:
    """The function named ``module:function``."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


# ---------------------------------------------------------------------------------------------------------
# Jobs with no function of their own elsewhere
# ---------------------------------------------------------------------------------------------------------


def train(cfg) -> float | None:
    """Train on the composed config; return the validation loss (what a Hydra sweeper optimises)."""
    from gptmini.training.run import train as train_run

    return train_run(cfg).get("val_loss")


def prepare(cfg) -> None:
    """Tokenize the data config's corpus into its token cache (unless it is there); print its folder."""
    from gptmini.data.token_cache import prepare_cache

    print(prepare_cache(cfg.data, cfg.tokenizer), flush=True)


def walkthrough(argv: list[str]) -> int:
    """``gptmini walkthrough``: the command (``python -m gptmini.book.walkthrough`` prints the same)."""
    return run_with_arguments(_print_walkthrough, argv)


def _print_walkthrough(argv: list[str]) -> None:
    """usage: gptmini walkthrough

    Print chapter 3's worked example ("Your journey starts with one step"): the attention scores, weights
    and context vectors of each rung, from simplified self-attention to the model's fused attention, with
    the book's seeds. Takes no arguments.
    """
    if argv:
        raise GptMiniError(f"walkthrough takes no arguments, got {argv[0]!r}: run gptmini walkthrough.")
    from gptmini.book.walkthrough import main as print_walkthrough

    print_walkthrough()
