"""Exports that appear whole or not at all, never over what they are read from; exported BPE models read
back exactly; damaged checkpoint contents answered in one line.

Small random models with a BPE trained here (no GPT-2 files, no network). Interruptions are real: a
process that gets SIGTERM or kill -9 while it writes the export's files.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from gptmini.common import GptMiniError
from gptmini.data.tokenizer import tokenizer_to_spec, train_bpe
from gptmini.model.config import GPTConfig
from gptmini.model.gpt import GPT
from gptmini.weights import (
    gptmini_entry,
    load_checkpoint,
    read_checkpoint,
    read_weights,
    save_model_checkpoint,
)

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import gptmini.hf.export as export_module  # noqa: E402 - needs the hf extra
from gptmini.hf.export import export  # noqa: E402
from gptmini.hf.export import main as export_main  # noqa: E402

CORPUS = "".join(
    f"The {w} sat on the mat, {i} times. Ünïcödé café {w * 2}!\n    def f{i}(x): return x + {i}\n"
    for i, w in enumerate(["cat", "dog", "bird", "fish", "cow", "hen", "ant", "bee"] * 30)
)
EXPORT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


@pytest.fixture(scope="module")
def bpe():
    """A 384-token BPE: a multiple of 64, so the model's vocabulary needs no padding rows."""
    enc = train_bpe([CORPUS], vocab_size=384, pattern="gpt4")
    assert enc.n_vocab == 384
    return enc


def bpe_checkpoint(path, enc, seed=0):
    """A random GPT with varied weights (so greedy text varies) and the BPE, saved as a gptmini checkpoint."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return save_model_checkpoint(path, model, tokenizer_to_spec(enc))


@pytest.fixture
def ckpt(tmp_path, bpe):
    return bpe_checkpoint(tmp_path / "m.ckpt", bpe)


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ---------------------------------------------------------------------------------------------------------
# Whole or not at all
# ---------------------------------------------------------------------------------------------------------


def test_an_export_over_an_earlier_one_keeps_none_of_its_files(tmp_path, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("vocab.json", "merges.txt", "pytorch_model.bin", "model-00001-of-00002.safetensors"):
        (out / name).write_text("an earlier export's file")  # e.g. a GPT-2 export's tokenizer files
    assert export(str(ckpt), out) == out
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert hidden_leftovers(out) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_a_failure_while_writing_leaves_the_earlier_export_whole(
    tmp_path, ckpt, bpe, monkeypatch, capsys, exchange
):
    out = tmp_path / "out"
    export(str(ckpt), out)
    before = snapshot(out)
    if not exchange:
        monkeypatch.setattr(export_module, "_exchange", lambda a, b: False)
    real_write, written = export_module._write_file, []

    def disk_fills(path, data):
        written.append(path.name)
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(export_module, "_write_file", disk_fills)
    assert export_main([f"ckpt={ckpt}", f"out={out}"]) == 2
    assert "the disk is full; pick another out= folder" in one_line_error(capsys)
    assert snapshot(out) == before and hidden_leftovers(out) == []
    monkeypatch.setattr(export_module, "_write_file", real_write)
    export(str(bpe_checkpoint(tmp_path / "other.ckpt", bpe, seed=1)), out)  # the new one replaces it whole
    assert snapshot(out) != before and {p.name for p in out.iterdir()} == EXPORT_FILES


@pytest.mark.parametrize("earlier", [True, False], ids=["over-an-export", "fresh-folder"])
def test_ctrl_c_while_writing_exits_130_and_leaves_nothing_half_written(
    tmp_path, ckpt, monkeypatch, capsys, earlier
):
    out = tmp_path / "out"
    if earlier:
        export(str(ckpt), out)
    before = snapshot(out) if earlier else None
    real_write = export_module._write_file

    def interrupted(path, data):
        if path.name == "tokenizer.json":
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(export_module, "_write_file", interrupted)
    assert export_main([f"ckpt={ckpt}", f"out={out}"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: no export was left half-written."
    assert (snapshot(out) == before) if earlier else not out.exists()
    assert hidden_leftovers(out) == []


def run_export_that_signals_itself(ckpt, out, signum, cwd):
    """``python -m gptmini.hf.export`` in a fresh process that sends itself ``signum`` while it writes the
    second file of the export (the first is already on disk)."""
    script = textwrap.dedent(
        f"""
        import os, sys
        import gptmini.hf.export as e
        real, count = e._write_file, []
        def write(path, data):
            count.append(1)
            if len(count) == 2:
                os.kill(os.getpid(), {int(signum)})
            real(path, data)
        e._write_file = write
        sys.exit(e.main(["ckpt={ckpt}", "out={out}"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.slow
def test_sigterm_on_a_real_export_exits_130_with_the_earlier_export_whole(tmp_path, ckpt, repo_root):
    out = tmp_path / "out"
    export(str(ckpt), out)
    before = snapshot(out)
    done = run_export_that_signals_itself(ckpt, out, signal.SIGTERM, repo_root)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip() == "interrupted: no export was left half-written."
    assert snapshot(out) == before and hidden_leftovers(out) == []


@pytest.mark.slow
def test_kill_9_leaves_the_earlier_export_and_the_next_export_removes_the_leftover(tmp_path, ckpt, repo_root):
    out = tmp_path / "out"
    export(str(ckpt), out)
    before = snapshot(out)
    done = run_export_that_signals_itself(ckpt, out, signal.SIGKILL, repo_root)
    assert done.returncode == -signal.SIGKILL
    assert snapshot(out) == before  # nothing of the killed export is in out
    assert len(hidden_leftovers(out)) == 1  # its hidden folder, beside out
    export(str(ckpt), out)
    assert hidden_leftovers(out) == [] and {p.name for p in out.iterdir()} == EXPORT_FILES


# ---------------------------------------------------------------------------------------------------------
# Where an export may not go
# ---------------------------------------------------------------------------------------------------------


def test_out_with_files_of_its_own_is_refused_naming_them(tmp_path, ckpt, capsys):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    assert export_main([f"ckpt={ckpt}", f"out={out}"]) == 2
    message = one_line_error(capsys)
    assert f"out={out} holds files that are not a Hugging Face model's (data/, notes.txt)" in message
    assert "pick a new or empty folder, or one holding an earlier export" in message
    assert snapshot(out) == before


def test_the_cli_refuses_in_one_line_with_exit_2(tmp_path, ckpt, repo_root):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    done = subprocess.run(
        [sys.executable, "-m", "gptmini.hf.export", f"ckpt={ckpt}", f"out={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    assert done.returncode == 2
    assert (
        done.stderr.count("\n") == 1 and done.stderr.startswith("error: out=") and "notes.txt" in done.stderr
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda out: out.parent.joinpath("out").write_text("a file"), r"out=.*/out is a file; pass a folder"),
        (
            lambda out: (out.parent / "a_file").write_text("x"),
            r"out=.*/a_file/out cannot be created: .*/a_file is a file, not a folder; pick another out=",
        ),
        (
            lambda out: (out / "tokenizer.json").mkdir(parents=True),
            r"out=.*/out holds a folder \(or link\) tokenizer.json where the export writes a file",
        ),
    ],
    ids=["out-is-a-file", "out-under-a-file", "a-folder-where-a-file-goes"],
)
def test_a_destination_that_cannot_hold_the_export_is_one_line(tmp_path, ckpt, capsys, make, message):
    out = tmp_path / "out"
    make(out)
    if (tmp_path / "a_file").exists():
        out = tmp_path / "a_file" / "out"
    assert export_main([f"ckpt={ckpt}", f"out={out}"]) == 2
    assert re.search(message, one_line_error(capsys))


def test_an_out_that_cannot_be_written_is_one_line(ckpt, read_only_dir, capsys):
    out = read_only_dir / "gptmini-export"
    assert export_main([f"ckpt={ckpt}", f"out={out}"]) == 2
    message = one_line_error(capsys)
    assert f"cannot write the export out={out}" in message and "pick another out= folder" in message
    assert not out.exists()


def lora_checkpoint(path, base, rank=4, alpha=8.0, fingerprint=True, seed=0, **changes):
    """A LoRA checkpoint on ``base`` (its adapters random), as a LoRA run writes it; ``changes`` overwrite
    entries of its lora record (to damage it)."""
    from gptmini.model.lora import FinetuneConfig, adapter_state, add_lora

    source = read_weights(base)
    torch.manual_seed(seed)
    model = GPT(source.model_config)
    add_lora(model, FinetuneConfig(method="lora", rank=rank, alpha=alpha))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_()
    lora = {
        "rank": rank,
        "alpha": alpha,
        "dropout": 0.0,
        "targets": ["qkv", "proj", "mlp"],
        "base": source.spec,
    }
    if fingerprint:
        lora["base_fingerprint"] = source.fingerprint
    lora.update(changes)
    state = {f"model.{k}": v for k, v in adapter_state(model.state_dict()).items()}
    entry = gptmini_entry(source.model_config, source.tokenizer_spec, lora=lora)
    torch.save({"state_dict": state, "gptmini": entry, "global_step": 3}, path)
    return path


def test_an_export_never_replaces_what_it_is_read_from(tmp_path, ckpt):
    base = export(str(ckpt), tmp_path / "base")  # a Hugging Face folder, the base of LoRA checkpoints
    lora = lora_checkpoint(tmp_path / "lora.ckpt", base)
    lora_on_lora = lora_checkpoint(tmp_path / "lora2.ckpt", lora)  # its base's base is the folder
    before = snapshot(base)
    base_of = f"out={base} would replace {base}, the LoRA base of the checkpoint being exported"
    cases = [
        (lora, base_of),
        (lora_on_lora, base_of),
        (base, f"out={base} would replace {base}, what is being exported"),
    ]
    for source, message in cases:
        with pytest.raises(GptMiniError, match="would replace") as info:
            export(str(source), base)
        assert str(info.value) == message + "; export to another folder."
    assert snapshot(base) == before
    export(str(lora_on_lora), tmp_path / "merged")  # anywhere else: the adapters merged into the base
    assert {p.name for p in (tmp_path / "merged").iterdir()} == EXPORT_FILES


# ---------------------------------------------------------------------------------------------------------
# gptmini -> export -> gptmini
# ---------------------------------------------------------------------------------------------------------


def test_an_exported_bpe_model_reads_back_with_its_own_tokenizer(tmp_path, ckpt, bpe):
    from gptmini.eval.run import compose_eval, run_eval
    from gptmini.generation.text import GenerateTextConfig, generate_text

    out = export(str(ckpt), tmp_path / "out")
    assert read_weights(out).tokenizer_spec == tokenizer_to_spec(bpe)  # the very BPE, not GPT-2's
    texts = {}
    for source in (ckpt, out):
        config = GenerateTextConfig(ckpt=str(source), prompt="The cat", max_new_tokens=30, temperature=0.0)
        texts[source] = generate_text(config)
    assert texts[ckpt] == texts[out] and len(set(texts[ckpt][0])) > 5
    (tmp_path / "corpus.txt").write_text(CORPUS * 3)
    data = ["data=text", f"data.path={tmp_path / 'corpus.txt'}", f"data.cache_dir={tmp_path / 'cache'}"]
    val = [run_eval(compose_eval([f"ckpt={s}", "task=val", "device=cpu", *data])) for s in (ckpt, out)]
    assert val[0]["val_loss"] == val[1]["val_loss"] and val[0]["tokens"] == val[1]["tokens"] > 0


# ---------------------------------------------------------------------------------------------------------
# Damaged gptmini checkpoint contents: one line naming the file and what is wrong
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: c.update(state_dict=["not", "a", "mapping"]), r"its state_dict is a list, not a mapping"),
        (
            lambda c: c["state_dict"].update({"model.wte.weight": "text"}),
            r"its weights hold a str under 'wte",
        ),
        (
            lambda c: c["gptmini"]["model_config"].update(block_size=10**12),
            r"its model config has block_size=1,000,000,000,000, far past any model gptmini runs",
        ),
        (
            lambda c: c["gptmini"]["model_config"].update(block_size=64),
            r"do not fit the model its config describes: shape mismatch in wpe.weight",
        ),
        (lambda c: c["gptmini"]["model_config"].update(n_head="two"), r"its model config is damaged"),
        (
            lambda c: c["state_dict"]["model.wpe.weight"].fill_(float("nan")),
            r"the weight wpe.weight holds NaN or infinite values",
        ),
        (
            lambda c: c["state_dict"].update(
                {"model.wpe.weight": c["state_dict"]["model.wpe.weight"].long()}
            ),
            r"the weight wpe.weight is int64, not floating point",
        ),
    ],
    ids=[
        "state-dict-a-list",
        "a-str-weight",
        "absurd-block-size",
        "config-and-weights-disagree",
        "bad-n-head",
        "nan",
        "int64",
    ],
)
def test_damaged_checkpoint_contents_are_one_line_naming_the_file(tmp_path, ckpt, damage, message):
    checkpoint = read_checkpoint(ckpt)
    damage(checkpoint)
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    with pytest.raises(GptMiniError, match=message) as info:
        load_checkpoint(tmp_path / "damaged.ckpt")
    assert str(tmp_path / "damaged.ckpt") in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# A LoRA checkpoint and its base
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def base_and_lora(tmp_path, ckpt):
    """(a Hugging Face folder exported from ``ckpt``, a LoRA checkpoint on it)."""
    base = export(str(ckpt), tmp_path / "base")
    return base, lora_checkpoint(tmp_path / "lora.ckpt", base)


def test_a_replaced_base_is_refused_until_rebased_on_purpose(tmp_path, bpe, base_and_lora, capsys):
    from gptmini.weights import main as checkpoint_main
    from gptmini.weights import weights_fingerprint

    base, lora = base_and_lora
    assert read_checkpoint(lora)["gptmini"]["lora"]["base_fingerprint"] == weights_fingerprint(
        read_weights(base).state
    )
    load_checkpoint(lora)
    export(str(bpe_checkpoint(tmp_path / "other.ckpt", bpe, seed=1)), base)  # same shape, other weights
    with pytest.raises(
        GptMiniError, match=r"whose base .*/base now holds other weights than the adapters"
    ) as info:
        load_checkpoint(lora)
    assert f"gptmini rebase ckpt={lora} base=<its base>" in str(info.value)
    assert "\n" not in str(info.value)

    assert checkpoint_main(["rebase", f"ckpt={lora}", f"base={base}"]) == 0
    assert "other weights than it was trained on: re-based" in capsys.readouterr().err
    merged = load_checkpoint(lora).model.state_dict()  # the adapters, now on the new base
    new_base, adapters = read_weights(base).state, read_checkpoint(lora)["state_dict"]
    a, b = adapters["model.blocks.0.attn.qkv.lora_a"], adapters["model.blocks.0.attn.qkv.lora_b"]
    expected = new_base["blocks.0.attn.qkv.weight"] + 8.0 / 4 * (b @ a)  # alpha / rank
    assert torch.allclose(merged["blocks.0.attn.qkv.weight"], expected)


def test_rebase_refuses_what_it_cannot_apply_the_adapters_to(tmp_path, base_and_lora, capsys):
    from gptmini.weights import main as checkpoint_main

    base, lora = base_and_lora
    assert checkpoint_main(["rebase", f"ckpt={base / 'config.json'}"]) == 2
    assert "usage: gptmini rebase ckpt=" in one_line_error(capsys)
    other = train_bpe([CORPUS[:5000]], vocab_size=320)
    small = bpe_checkpoint(tmp_path / "small.ckpt", other)
    assert checkpoint_main(["rebase", f"ckpt={lora}", f"base={small}"]) == 2
    assert "has another tokenizer than the one" in one_line_error(capsys)
    assert checkpoint_main(["rebase", f"ckpt={lora}", f"base={lora}"]) == 2
    assert "bases form a cycle" in one_line_error(capsys)


def test_an_old_lora_checkpoint_without_a_fingerprint_loads_with_a_warning(tmp_path, base_and_lora):
    base, _ = base_and_lora
    old = lora_checkpoint(tmp_path / "old.ckpt", base, fingerprint=False)
    with pytest.warns(UserWarning, match=r"records no fingerprint of its LoRA base .* rebase ckpt="):
        load_checkpoint(old)


def _drop_a_lora_b(checkpoint):
    del checkpoint["state_dict"][next(k for k in checkpoint["state_dict"] if k.endswith("lora_b"))]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c, p: c["gptmini"]["lora"].update(rank=0), r"its LoRA entry has rank=0 \(an integer >= 1\)"),
        (
            lambda c, p: c["gptmini"]["lora"].update(alpha="abc"),
            r"its LoRA entry has alpha='abc' \(a number > 0\)",
        ),
        (lambda c, p: c["gptmini"]["lora"].update(alpha=float("inf")), r"its LoRA entry has alpha=inf"),
        (
            lambda c, p: c["gptmini"]["lora"].pop("base"),
            r"its LoRA entry has base=None \(the path or Hub name",
        ),
        (lambda c, p: c["gptmini"]["lora"].update(base=123), r"its LoRA entry has base=123"),
        (
            lambda c, p: c["gptmini"]["lora"].update(base=str(p)),
            r"is a LoRA checkpoint that names itself as its base",
        ),
        (lambda c, p: c["gptmini"].update(lora=["a"]), r"its LoRA entry is a list, not a mapping"),
        (
            lambda c, p: c["gptmini"]["lora"].update(rank=64),
            r"its LoRA entry does not fit its model \(finetune.rank=64",
        ),
        (
            lambda c, p: _drop_a_lora_b(c),
            r"do not fit the model its config describes: missing blocks.0.attn.qkv.lora_b",
        ),
    ],
    ids=[
        "rank-0",
        "alpha-a-string",
        "alpha-inf",
        "no-base",
        "base-not-a-path",
        "base-itself",
        "entry-a-list",
        "rank-past-the-layers",
        "missing-adapter",
    ],
)
def test_a_damaged_lora_entry_is_one_line_naming_the_file(tmp_path, base_and_lora, damage, message):
    _, lora = base_and_lora
    checkpoint = read_checkpoint(lora)
    damaged = tmp_path / "damaged.ckpt"
    damage(checkpoint, damaged)
    torch.save(checkpoint, damaged)
    with pytest.raises(GptMiniError, match=message) as info:
        load_checkpoint(damaged)
    assert str(damaged) in str(info.value) and "\n" not in str(info.value)


def test_lora_bases_that_form_a_cycle_are_one_short_line(tmp_path, base_and_lora):
    _, lora = base_and_lora
    first, second = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    for path, base in ((first, second), (second, first)):
        checkpoint = read_checkpoint(lora)
        checkpoint["gptmini"]["lora"].update(base=str(base), base_fingerprint=None)
        torch.save(checkpoint, path)
    with pytest.raises(
        GptMiniError, match=r"the LoRA checkpoints' bases form a cycle \(.*a.ckpt -> .*b.ckpt -> .*a.ckpt\)"
    ) as info:
        load_checkpoint(first)
    assert len(str(info.value)) < 600


def test_a_base_of_another_shape_is_named_not_a_matmul_error(tmp_path, base_and_lora):
    base, _ = base_and_lora
    old = lora_checkpoint(tmp_path / "old.ckpt", base, fingerprint=False)  # nothing to tell weights apart
    enc = read_weights(base)
    torch.manual_seed(0)
    wider = GPT(GPTConfig(vocab_size=384, block_size=32, n_layer=2, n_head=2, n_embd=64))
    save_model_checkpoint(tmp_path / "wider.ckpt", wider, enc.tokenizer_spec)
    export(str(tmp_path / "wider.ckpt"), base)
    with pytest.warns(UserWarning), pytest.raises(GptMiniError, match=r"the weights in .*base.* do not fit"):
        load_checkpoint(old)
