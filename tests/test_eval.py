"""python -m gptmini.eval: HellaSwag scoring (fixture written here), val loss and bits/byte of a checkpoint,
HellaSwag during training, bad input, and the CPU smoke path of experiment=gpt2_fineweb."""

import csv
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptmini.common import GptMiniError
from gptmini.eval.__main__ import main as eval_main
from gptmini.eval.config import EvalConfig, HellaSwagConfig
from gptmini.eval.hellaswag import Example, _rows, load_examples, read_jsonl, score, score_example
from gptmini.eval.run import compose_eval, run_eval
from gptmini.training.run import train
from gptmini.weights import load_checkpoint

# In the smoke corpus's words (conftest's _write_corpus) vs. bytes it never saw: a trained model can tell.
GOOD = ["cat sat on the mat.", "beta gamma delta.", "alpha model data.", "the cat sat."]
BAD = ["{{}}|~~^^ QQ##", "ZZXW@@ ~~qq", "%%%% 0x7f ^^", "Ⅷ ⅹ ∰ ∯ ⊕"]


def write_hellaswag(path, n=8):
    """n examples in HellaSwag's own jsonl format; the right ending is in-distribution, at index i % 4."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            label = i % 4
            endings = [BAD[(i + j) % 4] for j in range(4)]
            endings[label] = GOOD[i % 4]
            f.write(
                json.dumps({"ctx": "the cat sat on the mat. alpha beta", "endings": endings, "label": label})
            )
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """60 steps of debug=smoke on conftest's corpus, HellaSwag every 20: (run dir, summary, data, fixture)."""
    from conftest import _write_corpus

    from gptmini.training.config import compose_config

    root = tmp_path_factory.mktemp("eval")
    corpus = _write_corpus(root / "corpus")
    fixture = write_hellaswag(root / "hellaswag.jsonl")
    data = ["data=text", f"data.path={corpus}", f"data.cache_dir={root / 'cache'}"]
    overrides = ["debug=smoke", *data, "trainer.max_steps=60", "trainer.val_check_interval=60"]
    overrides += ["eval.hellaswag_every=20", f"eval.hellaswag_path={fixture}"]
    threads = torch.get_num_threads()
    try:
        summary = train(compose_config(overrides), out_dir=root / "run")
    finally:
        torch.set_num_threads(threads)
    return root / "run", summary, data, fixture


def test_batched_scoring_equals_each_ending_scored_alone(trained):
    loaded = load_checkpoint(trained[0])
    model, enc = loaded.model, loaded.tokenizer
    example = Example("the cat sat on", ["the mat.", "a", "beta gamma delta alpha model", "x"], 2)
    pred, pred_norm = score_example(model, enc, example, torch.device("cpu"))
    totals, means = [], []
    with torch.no_grad():
        for ending in example.endings:
            ctx, end = enc.encode_ordinary(example.ctx), enc.encode_ordinary(" " + ending)
            tokens = torch.tensor([ctx + end])
            logits = model(tokens[:, :-1])[0]
            losses = F.cross_entropy(logits[0], tokens[0, 1:], reduction="none")[len(ctx) - 1 :]
            assert len(losses) == len(end)
            totals.append(float(losses.sum()))
            means.append(float(losses.mean()))
    assert pred == min(range(4), key=totals.__getitem__)
    assert pred_norm == min(range(4), key=means.__getitem__)
    assert len(set(totals)) == 4  # four distinct figures: the argmin means something


def test_long_contexts_are_cut_from_the_left_and_endings_always_scored(trained):
    enc = load_checkpoint(trained[0]).tokenizer
    example = Example("alpha beta " * 40, ["gamma delta", "the"], 0)
    tokens, mask = _rows(enc, example, block_size=16)
    assert tokens.shape[1] == 17  # block_size inputs + 1 target
    end = enc.encode_ordinary(" gamma delta")
    assert tokens[0, 17 - len(end) :].tolist() == end and mask[0].sum() == len(end)


def test_a_trained_model_prefers_the_in_distribution_endings(trained):
    loaded = load_checkpoint(trained[0])
    figures = score(
        loaded.model, loaded.tokenizer, read_jsonl(trained[3]), torch.device("cpu"), progress=False
    )
    assert figures["n"] == 8 and figures["acc"] == 1.0 and figures["acc_norm"] >= 0.75


def test_hellaswag_during_training_is_logged(trained):
    run_dir = trained[0]
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/hellaswag_acc")]
    assert [int(r["step"]) for r in rows] == [19, 39, 59]  # Lightning's label of steps 20, 40 and 60
    assert all(0.0 <= float(r["eval/hellaswag_acc_norm"]) <= 1.0 for r in rows)
    assert float(rows[-1]["eval/hellaswag_acc"]) == 1.0


def test_task_val_equals_the_training_runs_validation(trained):
    run_dir, summary, data, _ = trained
    result = run_eval(compose_eval([f"ckpt={run_dir}", "task=val", *data]))
    assert result["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-4)
    assert result["val_bpb"] == pytest.approx(summary["val_bpb"], abs=1e-4)
    limited = run_eval(compose_eval([f"ckpt={run_dir}", "task=val", "limit=3", "batch_size=2", *data]))
    assert limited["windows"] == 3 and limited["tokens"] == 3 * 16


def test_cli_prints_the_figures_then_one_json_line(trained, capsys):
    run_dir, _, _, fixture = trained
    assert eval_main([f"ckpt={run_dir}", "task=hellaswag", f"path={fixture}", "limit=4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["n"] == 4 and set(result) >= {"acc", "acc_norm"} and "acc_norm" in lines[-2]


@pytest.mark.slow
def test_python_m_gptmini_eval(trained, repo_root):
    run_dir, _, _, fixture = trained
    cmd = [
        sys.executable,
        "-m",
        "gptmini.eval",
        f"ckpt={run_dir}",
        "task=hellaswag",
        f"path={fixture}",
        "limit=2",
    ]
    out = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["n"] == 2


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["task=mmlu"], 2, "error: task='mmlu' is unknown; use one of: hellaswag, val."),
        (
            ["path=/nonexistent/h.jsonl"],
            2,
            "error: path='/nonexistent/h.jsonl' does not exist; give HellaSwag",
        ),
        (["limit=0"], 2, "error: limit=0 must be a positive integer, or null for all."),
        (["tsk=val"], 1, "Could not override 'tsk'."),  # Hydra's message, as for every config typo
    ],
)
def test_cli_bad_input_is_one_line(trained, capsys, args, status, message):
    assert eval_main([f"ckpt={trained[0]}", *args]) == status
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err, err


def test_bad_hellaswag_files_and_settings(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"ctx": "x", "endings": ["a", "b"], "label": 1}\nnot json\n')
    with pytest.raises(
        GptMiniError, match=r"a.jsonl line 2 is not JSON; the format is one JSON object per line"
    ):
        read_jsonl(tmp_path / "a.jsonl")
    assert len(read_jsonl(tmp_path / "a.jsonl", limit=1)) == 1
    (tmp_path / "b.jsonl").write_text('{"ctx": "x", "endings": ["a", "b"], "label": 5}\n')
    with pytest.raises(GptMiniError, match="b.jsonl line 1 is not a HellaSwag example"):
        read_jsonl(tmp_path / "b.jsonl")
    with pytest.raises(GptMiniError, match="eval.hellaswag_every=-1 must be 0"):
        HellaSwagConfig(hellaswag_every=-1)
    with pytest.raises(GptMiniError, match="batch_size=0 must be"):
        EvalConfig(batch_size=0)


HINT = 'the format is one JSON object per line with "ctx" (text), "endings" (a list of texts) and "label"'


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {"ctx": "", "endings": ["a", "b"], "label": 0},
            '"ctx" is empty: an ending can only be scored after a',
        ),
        ({"ctx": 7, "endings": ["a", "b"], "label": 0}, '"ctx" is the number 7, not a text'),
        (
            {"ctx": "x", "endings": "abcd", "label": 0},
            '"endings" is the text "abcd", not a list of at least 2',
        ),
        (
            {"ctx": "x", "endings": {"a": 1, "b": 2}, "label": 0},
            "\"endings\" is an object {'a': 1, 'b': 2}, not",
        ),
        ({"ctx": "x", "endings": ["a", 3], "label": 0}, '"endings"[1] is the number 3, not a text'),
        ({"ctx": "x", "endings": ["a", ""], "label": 0}, '"endings"[1] is empty: there is nothing to score'),
        (
            {"ctx": "x", "endings": ["a", "b"], "label": 1.0},
            '"label" is the number 1.0, not the index of an ending',
        ),
        (
            {"ctx": "x", "endings": ["a", "b"], "label": True},
            '"label" is the boolean true, not the index of an',
        ),
        (
            {"ctx": "x", "endings": ["a", "b"], "label": "1.0"},
            '"label" is the text "1.0", not the index of an',
        ),
        ({"ctx": "x", "endings": ["a", "b"]}, 'it has no "label"'),
        (["x", ["a", "b"], 0], "it is not a JSON object"),
    ],
)
def test_a_hellaswag_record_it_cannot_score_is_named_with_its_field(tmp_path, record, reason):
    path = tmp_path / "h.jsonl"
    good = {"ctx": "the cat", "endings": ["sat.", "ran."], "label": 1}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(GptMiniError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path} line 3 is not a HellaSwag example: {reason}"), message
    assert message.endswith(f"; {HINT} (an index).") and "\n" not in message


def test_hellaswag_labels_as_the_hub_writes_them_and_non_utf8_files(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps({"ctx": "the cat", "endings": ["sat.", "ran.", "is."], "label": "2"}) + "\n")
    assert read_jsonl(path) == [Example("the cat", ["sat.", "ran.", "is."], 2)]  # the Hub's "2" is fine
    path.write_bytes(path.read_bytes() + b'{"ctx": "caf\xe9", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(GptMiniError) as info:
        read_jsonl(path)
    assert str(info.value) == f"{path} line 2 is not UTF-8 (byte 13 of the line); save the file as UTF-8."


def test_hellaswag_from_the_hub_offline_is_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        GptMiniError, match=r"hub='Rowan/hellaswag': offline and not cached .* pass path="
    ) as info:
        load_examples(None, "Rowan/hellaswag", limit=5)
    assert "\n" not in str(info.value)


def test_gpt2_fineweb_smoke_on_the_cpu(tmp_path, gpt2_available, compose_train):
    """The experiment's CPU smoke path (README): tiny model, local jsonl, 12 steps, a checkpoint, an eval."""
    pytest.importorskip("datasets")
    rng = torch.Generator().manual_seed(0)
    words = "the cat sat on mat alpha beta gamma delta model data".split()
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for _ in range(200):
            picks = torch.randint(
                len(words), (int(torch.randint(5, 40, (1,), generator=rng)),), generator=rng
            )
            f.write(json.dumps({"text": " ".join(words[int(j)] for j in picks) + "."}) + "\n")
    fixture = write_hellaswag(tmp_path / "hellaswag.jsonl", n=4)
    smoke = [
        "experiment=gpt2_fineweb",
        "debug=smoke",
        "compile=false",
        "trainer.precision=32-true",
        "trainer.accumulate_grad_batches=2",
        "data.hf.path=json",
        f"data.hf.data_files={tmp_path / 'corpus.jsonl'}",
        "data.hf.name=null",
        "data.val_fraction=0.1",
        "data.num_workers=0",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"eval.hellaswag_path={fixture}",
        "eval.hellaswag_every=6",
    ]
    cfg = compose_train(smoke)
    assert cfg.optim.lr == 6e-4 and cfg.optim.weight_decay == 0.1 and cfg.tokenizer.name == "gpt2"
    summary = train(cfg, out_dir=tmp_path / "run")
    assert summary["val_loss"] < 10.8  # below ln(50257): it learned something in 12 steps
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.model.config.vocab_size == 50257 and loaded.global_step == 12
    result = run_eval(compose_eval([f"ckpt={tmp_path / 'run'}", "task=hellaswag", f"path={fixture}"]))
    assert result["n"] == 4 and 0 <= result["acc_norm"] <= 1
    data = [o for o in smoke if o.startswith("data.") and "num_workers" not in o]
    val = run_eval(compose_eval([f"ckpt={tmp_path / 'run'}", "task=val", "data=hf", *data]))
    assert val["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-4)


def test_task_val_without_validation_text_is_one_line(trained):
    run_dir, _, data, _ = trained
    with pytest.raises(
        GptMiniError, match=r"data=text has no validation text \(data.val_fraction=0.0\); set"
    ):
        run_eval(compose_eval([f"ckpt={run_dir}", "task=val", *data, "data.val_fraction=0.0"]))
