"""The ``gptmini`` command (gptmini/cli.py): its jobs, their help, the one error policy every entry point
shares, and a wheel that works from any directory."""

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from gptmini import __version__
from gptmini.cli import JOBS, main
from gptmini.common import CONFIG_DIR, GptMiniError, run_job

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def logging_put_back():
    """Hydra configures logging for the whole process (even for --help, and generate's switches loggers
    off): put levels, switches and root handlers back, so the tests after these see Python's defaults."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    loggers = {
        name: (logger.level, logger.disabled)
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            saved_level, logger.disabled = loggers.get(name, (logging.NOTSET, False))
            logger.setLevel(saved_level)  # (setLevel also clears the loggers' cached levels)


def gptmini_subprocess(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m gptmini ARGS`` in a fresh interpreter (the checkout's gptmini)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gptmini", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def assert_one_error_line(status: int, err: str, start: str) -> None:
    assert status == 2, err
    assert err.startswith(f"error: {start}") and err.count("\n") == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------------------
# The command: jobs, help, version
# ---------------------------------------------------------------------------------------------------------


def test_help_lists_every_job_on_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, job in JOBS.items():
        assert re.search(rf"^  {name} +{re.escape(job.summary)}$", out, re.MULTILINE), out
    assert str(CONFIG_DIR) in out and "--config-dir" in out


def test_version_and_python_m_gptmini_are_the_command(tmp_path):
    done = gptmini_subprocess("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == f"gptmini {__version__}\n"


def test_no_job_or_an_unknown_one_is_an_error(capsys):
    assert main([]) == 2
    assert "usage: gptmini <job>" in capsys.readouterr().err
    assert main(["trian"]) == 2
    assert_one_error_line(2, capsys.readouterr().err, "'trian' is not a gptmini job; the jobs are train,")


@pytest.mark.parametrize("name", list(JOBS))
def test_each_job_has_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    if JOBS[name].config:  # Hydra's help: the header, then the composed config
        assert out.startswith(f"gptmini {name}: {JOBS[name].summary}\nusage: gptmini {name} ")
        assert "== Config ==" in out
    else:  # the job function's docstring
        assert out.startswith(f"usage: gptmini {name}")


def test_train_help_shows_the_config_and_its_groups(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "experiment: finetune_shakespeare, gpt2_fineweb" in out and "max_steps:" in out


# ---------------------------------------------------------------------------------------------------------
# One policy: an error line and status 2, Ctrl-C 130, a closed stdout quiet, a bug's traceback kept
# ---------------------------------------------------------------------------------------------------------

# One user mistake per job that reads arguments or composes without writing anything.
IN_PROCESS_ERRORS = {
    "eval": (["ckpt=latest", "task=mmlu"], "task='mmlu' is unknown; use one of: hellaswag, val."),
    "export": (["output=x"], "unknown argument 'output=x'; use ckpt=<checkpoint> out=<folder>."),
    "rebase": (["ckpt=a.ckpt"], "usage: gptmini rebase ckpt=<LoRA checkpoint> base=<weights>"),
    "walkthrough": (["x"], "walkthrough takes no arguments, got 'x'"),
}


@pytest.mark.parametrize("name", list(IN_PROCESS_ERRORS))
def test_a_user_error_is_one_line_and_status_2(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, message = IN_PROCESS_ERRORS[name]
    status = main([name, *args])
    assert_one_error_line(status, capsys.readouterr().err, message)
    assert list(tmp_path.iterdir()) == []  # nothing written


# train, generate, prepare and serve configure logging for the whole process (Hydra's job_logging), so each
# runs in a process of its own.
SUBPROCESS_ERRORS = {
    "generate": (["ckpt=/nonexistent/x.ckpt"], "checkpoint not found: /nonexistent/x.ckpt"),
    "train": (["seed=-1"], "seed=-1 must be an integer in 0..4294967295; try seed=1337."),
    "prepare": (["data=text", "data.path=/nonexistent/c.txt"], "data.path='/nonexistent/c.txt' does not"),
    "serve": (["ckpt=/nonexistent/x.ckpt", "port=0"], "checkpoint not found: /nonexistent/x.ckpt"),
}


@pytest.mark.parametrize("name", list(SUBPROCESS_ERRORS))
def test_a_user_error_of_a_job_with_a_config_is_one_line_and_status_2(name, tmp_path):
    args, message = SUBPROCESS_ERRORS[name]
    done = gptmini_subprocess(name, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_error_line(done.returncode, done.stderr, message)


def test_every_job_has_a_test_of_its_error_line():
    assert set(IN_PROCESS_ERRORS) | set(SUBPROCESS_ERRORS) == set(JOBS)


def test_the_policy_for_a_machine_fault_ctrl_c_a_closed_stdout_and_a_bug(capsys):
    def fail(error: BaseException):
        def work():
            raise error

        return work

    full = OSError(errno.ENOSPC, "No space left on device", "/data/x.bin")
    assert run_job(fail(full)) == 2
    assert capsys.readouterr().err == "error: cannot write a file (/data/x.bin): the disk is full\n"
    assert run_job(fail(KeyboardInterrupt()), interrupted="interrupted: nothing half-written.") == 130
    assert capsys.readouterr().err == "\ninterrupted: nothing half-written.\n"
    assert run_job(fail(BrokenPipeError(errno.EPIPE, "Broken pipe"))) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="a bug"):
        run_job(fail(ValueError("a bug")))
    assert run_job(fail(GptMiniError("bad value"))) == 2
    assert capsys.readouterr().err == "error: bad value\n"


def test_a_failed_sweep_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    """Both seeds are refused before any data is read: each job is recorded, and the sweep ends with 2."""
    sweep = tmp_path / "sweep"
    done = gptmini_subprocess("train", "-m", "seed=-1,-2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "2 of 2 jobs failed (jobs 0, 1)" in done.stderr
    assert "seed=-2 must be an integer" in (sweep / "1" / "error.txt").read_text()


# ---------------------------------------------------------------------------------------------------------
# Configs: the checkout's folder here, the package's copy in a wheel
# ---------------------------------------------------------------------------------------------------------


def test_a_checkout_reads_its_own_configs_folder():
    assert CONFIG_DIR == REPO_ROOT / "configs" and CONFIG_DIR.is_dir() and not CONFIG_DIR.is_symlink()


def test_pyproject_lists_every_package_and_ships_the_configs():
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for init in (REPO_ROOT / "gptmini").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk | {"gptmini.configs"}
    assert setuptools["package-dir"] == {"gptmini.configs": "configs"}


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_runs_every_job_from_any_directory(tmp_path, write_corpus):
    # Build from a copy, so the build leaves nothing in the checkout; no network (no isolation, no deps).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("gptmini", "configs"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True)
    (wheel,) = wheels.glob("gptmini-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True)
    installed = snapshot(site)
    assert (site / "gptmini" / "configs" / "experiment" / "gpt2_fineweb.yaml").is_file()

    work = tmp_path / "work"
    corpus = write_corpus(work / "notes")
    data = ["data=text", f"data.path={corpus}"]  # the default cache folder: the user's, set here
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PYTHONDONTWRITEBYTECODE": "1",
        "XDG_CACHE_HOME": str(work / "cache"),
    }

    def gptmini(*args: str) -> str:
        done = subprocess.run(
            [site / "bin" / "gptmini", *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = subprocess.run(
        [sys.executable, "-c", "import gptmini.common as c; print(c.__file__, c.CONFIG_DIR)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where == [str(site / "gptmini" / "common.py"), str(site / "gptmini" / "configs")]

    gptmini("train", "debug=smoke", *data)
    assert len(list(work.glob("outputs/*/*/checkpoints/last.ckpt"))) == 1
    assert gptmini("generate", "ckpt=latest", "prompt=the", "max_new_tokens=8", "seed=1").strip()
    assert '"task": "val"' in gptmini("eval", "ckpt=latest", "task=val", *data).splitlines()[-1]
    prepared = gptmini("prepare", "debug=smoke", "tokenizer.vocab_size=280", *data).splitlines()[-1]
    assert (work / prepared / "meta.json").is_file()
    assert Path(prepared).is_relative_to(work / "cache" / "gptmini")
    if _has_hf_extra():
        gptmini("export", "ckpt=latest", "out=hf_model")
        assert (work / "hf_model" / "model.safetensors").is_file()

    # A reader that stops early (| head): the job ends quietly.
    reader = subprocess.Popen(
        [
            site / "bin" / "gptmini",
            "generate",
            "ckpt=latest",
            "prompt=the",
            "max_new_tokens=64",
            "num_samples=400",
        ],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader.stdout.read(16)
    reader.stdout.close()
    assert reader.wait(timeout=300) == 0
    err = reader.stderr.read().decode()
    assert "Traceback" not in err and "Broken pipe" not in err, err

    assert snapshot(site) == installed  # the installed package is left as it was
    assert {p.name for p in work.iterdir()} <= {"notes", "cache", "outputs", "hf_model"}


def _has_hf_extra() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("safetensors", "tokenizers"))
