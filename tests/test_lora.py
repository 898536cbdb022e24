"""LoRA: the layer, the frozen base, and a LoRA fine-tune that trains, resumes, exports and generates."""

import csv
import shutil

import pytest
import torch
from torch import nn

from gptmini.common import GptMiniError
from gptmini.model.config import GPTConfig
from gptmini.model.gpt import GPT
from gptmini.model.lora import FinetuneConfig, LoRALinear, add_lora, merge_adapters, trainable_fraction
from gptmini.weights import load_checkpoint, read_checkpoint


def test_lora_linear_starts_at_its_base_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    x = torch.randn(3, 5, 12)
    expected = base(x)
    lora = LoRALinear(base, rank=4, alpha=8.0)
    assert torch.equal(lora(x), expected)  # B = 0: exactly the base
    with torch.no_grad():
        lora.lora_b.normal_()
    state = merge_adapters(lora.state_dict(), scale=lora.scale)
    assert set(state) == {"weight", "bias"}
    merged = nn.Linear(12, 20)
    merged.load_state_dict(state)
    assert torch.allclose(merged(x), lora(x), atol=1e-5)
    assert not torch.allclose(merged(x), expected, atol=1e-3)


def test_only_the_adapters_train_and_gpt2_small_at_rank_8_is_under_one_percent():
    with torch.device("meta"):  # GPT-2 small's shapes, no memory
        model = GPT(GPTConfig(pad_vocab_multiple=1))
        names = add_lora(model, FinetuneConfig(method="lora", rank=8))
    assert len(names) == 12 * 4  # qkv, proj, fc, proj in each of 12 blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    n_trainable, n_all = trainable_fraction(model)
    assert n_trainable / n_all < 0.01


def test_adapters_leave_the_model_unchanged_until_trained():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 100, (2, 16))
    before = model(idx)[0]
    add_lora(model.train(False), FinetuneConfig(method="lora", targets=["qkv", "mlp"]))
    assert torch.equal(model(idx)[0], before)
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear) and not isinstance(
        model.blocks[0].attn.proj, LoRALinear
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rank": 0}, r"finetune.rank=0 must be an integer in 1..4096; try finetune.rank=8"),
        ({"rank": 10**8}, r"finetune.rank=100000000 must be an integer in 1..4096"),
        ({"rank": 2.5}, r"finetune.rank=2.5 must be an integer"),
        ({"targets": ["ffn"]}, r"finetune.targets=\['ffn'\] must be a non-empty list of: qkv, proj, mlp"),
        ({"targets": "qkv"}, r"finetune.targets='qkv' must be a non-empty list of"),
        ({"method": "qlora"}, r"finetune.method='qlora' is unknown; use one of: full, lora"),
        ({"alpha": float("inf")}, r"finetune.alpha=inf must be a finite number > 0; try finetune.alpha=16"),
        ({"alpha": float("nan")}, r"finetune.alpha=nan must be a finite number > 0"),
        ({"alpha": 0}, r"finetune.alpha=0 must be a finite number > 0"),
        ({"alpha": "16"}, r"finetune.alpha='16' must be a finite number > 0"),
        ({"dropout": float("nan")}, r"finetune.dropout=nan must be in \[0, 1\)"),
        ({"dropout": 1.0}, r"finetune.dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_finetune_settings(values, message):
    with pytest.raises(GptMiniError, match=message):
        FinetuneConfig(**values)


def test_a_rank_past_the_layers_width_is_refused():
    model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(
        GptMiniError, match=r"finetune.rank=32 is larger than the layers it adapts \(16 x 48\), so"
    ):
        add_lora(model, FinetuneConfig(method="lora", rank=32))


def test_lora_without_weights_to_adapt_is_refused(tiny_train_overrides, compose_train, tmp_path):
    from gptmini.training.run import train

    with pytest.raises(
        GptMiniError, match=r"finetune=lora adapts pretrained weights, but no init_from is set"
    ):
        train(compose_train(tiny_train_overrides + ["finetune=lora"]), out_dir=tmp_path / "run")


def train_losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def test_lora_fine_tune_trains_resumes_exports_and_generates(
    signal_at_step, tmp_path, tiny_train_overrides, compose_train, capsys, gpt2_available
):
    transformers = pytest.importorskip("transformers")
    from gptmini.generation.text import GenerateTextConfig, generate_text
    from gptmini.hf.export import export
    from gptmini.training.run import train

    torch.manual_seed(0)
    # Large random embeddings: the frozen (tied) head can then score tokens apart, so adapters can learn.
    hf_config = transformers.GPT2Config(
        vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2
    )
    base = tmp_path / "base"
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(base)
    run = tmp_path / "run"
    overrides = tiny_train_overrides + [
        f"init_from={base}",
        "finetune=lora",
        "optim.lr=1e-2",
        "optim.min_lr=1e-2",
        "optim.warmup_steps=0",
        "trainer.max_steps=10",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=2",
        "sample.max_new_tokens=0",
    ]
    with pytest.raises(SystemExit):  # Ctrl-C at step 4: a resumable checkpoint
        train(compose_train(overrides), out_dir=run, extra_callbacks=[signal_at_step(4)])
    saved = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 4
    assert saved["state_dict"] and all(k.endswith((".lora_a", ".lora_b")) for k in saved["state_dict"])
    assert saved["gptmini"]["lora"]["base"] == str(base) and saved["gptmini"]["lora"]["rank"] == 8
    assert (run / "checkpoints" / "last.ckpt").stat().st_size < (
        base / "model.safetensors"
    ).stat().st_size / 10

    with pytest.raises(GptMiniError, match=r"is a LoRA run's \(adapters only\) checkpoint, but this run has"):
        train(compose_train(overrides + [f"ckpt_path={run}", "finetune=none"]), out_dir=run)
    assert saved["gptmini"]["lora"]["base_fingerprint"].startswith("sha256:")
    with pytest.raises(
        GptMiniError, match=r"was trained with finetune.alpha=16.0, this run has finetune.alpha=32"
    ):
        train(compose_train(overrides + [f"ckpt_path={run}", "finetune.alpha=32"]), out_dir=run)
    # The base replaced by another model of the same shape: the adapters would land on other weights.
    base.rename(tmp_path / "original")
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(base)
    with pytest.raises(GptMiniError, match=r"whose base .*base now holds other weights than the adapters"):
        train(compose_train(overrides + [f"ckpt_path={run}"]), out_dir=run)
    with pytest.raises(GptMiniError, match=r"whose base .*base now holds other weights than the adapters"):
        load_checkpoint(run)
    shutil.rmtree(base)
    (tmp_path / "original").rename(base)
    # The same command plus ckpt_path resumes it (init_from names the base the checkpoint was started from).
    summary = train(compose_train(overrides + [f"ckpt_path={run}"]), out_dir=run)
    assert summary["steps"] == 10
    losses = train_losses(run)
    assert max(losses[-3:]) < min(losses[:3]) - 0.1  # it learns (from 10.8 nats, a random base)

    loaded = load_checkpoint(run)  # merged into the base
    adapters = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_b"))
    idx = torch.randint(0, 50257, (1, 16))
    export(str(run), tmp_path / "hf_out")
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf_out").eval()
    with torch.no_grad():
        assert (exported(idx).logits - loaded.model(idx)[0]).abs().max() <= 1e-4
    texts = generate_text(GenerateTextConfig(ckpt=str(run), prompt="alpha", max_new_tokens=5, device="cpu"))
    assert texts and capsys.readouterr().out

    base.rename(tmp_path / "moved")
    with pytest.raises(
        GptMiniError, match=r"is a LoRA checkpoint that holds only adapters, and its base .*base"
    ):
        load_checkpoint(run)


def test_a_lora_step_gives_frozen_weights_no_gradient_and_leaves_them_bitwise_unchanged():
    from gptmini.training.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert model.lm_head.weight is model.wte.weight  # the head is tied to the embedding: frozen with it
    add_lora(model, FinetuneConfig(method="lora", rank=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1), "cpu")  # decay would move them
    idx = torch.randint(0, 100, (4, 16))
    loss = model.loss(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    assert loss.grad_fn.saved_tensors[1] is None  # the chunked loss made no (V, C) gradient for the head
    loss.backward()
    opt.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None, name
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)


@pytest.mark.parametrize("value", ["finetune.alpha=inf", "finetune.alpha=nan", "finetune.dropout=nan"])
def test_nonsense_finetune_values_are_refused_before_any_data(
    value, tiny_train_overrides, compose_train, tmp_path
):
    from gptmini.training.run import train

    key = value.split("=")[0]
    with pytest.raises(GptMiniError, match=rf"{key}=(inf|nan) must be"):
        train(compose_train(tiny_train_overrides + ["finetune=lora", value]), out_dir=tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_lora_with_muon_is_refused_before_any_data(tiny_train_overrides, compose_train, tmp_path):
    from gptmini.training.run import train

    overrides = tiny_train_overrides + ["finetune=lora", "optim=muon", f"init_from={tmp_path / 'base'}"]
    with pytest.raises(GptMiniError, match="optim=muon trains a GPT's hidden matrices, but finetune=lora"):
        train(compose_train(overrides), out_dir=tmp_path / "run")
    assert not (tmp_path / "cache").exists()
