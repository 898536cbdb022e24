"""Optimizers and schedules (gptmini/training/optim.py): Muon + AdamW, the WSD and time-based schedules."""

import copy
import re

import pytest
import torch

from gptmini import GPT, GPTConfig
from gptmini.common import GptMiniError
from gptmini.training.optim import (
    Float32Muon,
    MuonWithAdamW,
    OptimConfig,
    adamw_fused,
    build_lr_schedule,
    build_optimizer,
    lr_at,
    muon_parameters,
    orthogonalize,
)


def tiny_gpt(**switches) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **switches)
    return GPT(config)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (4, 16), generator=gen), torch.randint(0, 64, (4, 16), generator=gen)


def test_wsd_is_constant_then_decays_linearly_to_the_floor():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, optim, 110) == pytest.approx(1e-4)  # warmup as before
    assert [lr_at(s, optim, 110) for s in (10, 50, 90)] == [1e-3] * 3  # stable until 80% of 100 steps
    assert lr_at(100, optim, 110) == pytest.approx(1e-3 - 0.5 * 9e-4)  # halfway down the decay
    assert lr_at(110, optim, 110) == pytest.approx(1e-4) and lr_at(500, optim, 110) == pytest.approx(1e-4)
    lrs = [lr_at(s, optim, 110) for s in range(90, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize(("schedule", "halfway"), [("cosine", 5.5e-4), ("wsd", 1e-3)])
def test_time_progress_replaces_the_step_count_after_warmup(schedule, halfway):
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5, schedule=schedule)
    assert lr_at(2, optim, 1, progress=0.1) == pytest.approx(6e-4)  # warmup counts steps: 3 of 5
    assert lr_at(2, optim, 1, progress=1.0) == pytest.approx(1e-4)  # time is up even inside warmup
    assert lr_at(1000, optim, 1, progress=0.0) == pytest.approx(1e-3)
    assert lr_at(7, optim, 1, progress=0.5) == pytest.approx(halfway)
    assert 1e-4 < lr_at(7, optim, 1, progress=0.9) < 1e-3
    assert lr_at(7, optim, 1, progress=1.0) == pytest.approx(1e-4)  # the budget is used: the floor


def test_lr_schedule_reads_the_clock():
    model = tiny_gpt()
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, schedule="wsd")
    optimizer = build_optimizer(model, optim, "cpu")
    clock = {"fraction": 0.0}
    schedule = build_lr_schedule(optimizer, optim, 1, progress=lambda: clock["fraction"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    clock["fraction"] = 1.0
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_muon_gets_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_gpt(tie_embeddings=False)
    optim = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02)
    optimizer = build_optimizer(model, optim, "cpu")
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer.muon, torch.optim.Muon)
    muon = [p for g in optimizer.muon.param_groups for p in g["params"]]
    adamw = [p for g in optimizer.adamw.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon) == sorted(
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    )
    assert {"wte.weight", "wpe.weight", "lm_head.weight", "ln_f.weight", "ln_f.bias"} <= {
        names[id(p)] for p in adamw
    }
    assert len({id(p) for p in muon + adamw}) == len(muon + adamw) == len(list(model.parameters()))
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 3e-3, 3e-3]
    assert muon_parameters(model) == muon


def test_one_schedule_scales_both_optimizers():
    model = tiny_gpt()
    optim = OptimConfig(name="muon", lr=1e-3, min_lr=1e-4, muon_lr=0.02, warmup_steps=4)
    optimizer = build_optimizer(model, optim, "cpu")
    build_lr_schedule(optimizer, optim, 100)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02 / 4, 1e-3 / 4, 1e-3 / 4])


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_embeddings_and_an_untied_head_take_their_own_rates_under_one_schedule(name):
    model = tiny_gpt(tie_embeddings=False, value_embeds=True)
    optim = OptimConfig(name=name, lr=1e-3, min_lr=1e-4, embed_lr=0.05, head_lr=2e-3, warmup_steps=4)
    optimizer = build_optimizer(model, optim, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(rates) == len(names)  # every parameter in exactly one group
    assert rates["wte.weight"] == rates["wpe.weight"] == 0.05 and rates["lm_head.weight"] == 2e-3
    assert rates["value_embeds.0.weight"] == rates["value_embeds.1.weight"] == 0.05  # tables, never Muon's
    assert rates["ln_f.weight"] == 1e-3
    assert rates["blocks.0.mlp.fc.weight"] == (0.02 if name == "muon" else 1e-3)
    build_lr_schedule(optimizer, optim, 100)  # warmup step 1 of 4: every group at a quarter of its peak
    assert {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}["wte.weight"] == (
        pytest.approx(0.05 / 4)
    )
    assert train_steps(model, optimizer, build_lr_schedule(optimizer, optim, 100), [0] * 3)[-1] < 4.2


def test_a_tied_head_is_the_embedding_and_takes_embed_lr():
    model = tiny_gpt(tie_embeddings=True)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, embed_lr=0.01, head_lr=0.5), "cpu")
    (shared,) = [g for g in optimizer.param_groups if any(p is model.wte.weight for p in g["params"])]
    assert shared["lr"] == 0.01 and 0.5 not in [g["lr"] for g in optimizer.param_groups]
    unset = build_optimizer(model, OptimConfig(lr=1e-3), "cpu")  # no rates of their own: two groups as before
    assert [g["lr"] for g in unset.param_groups] == [1e-3, 1e-3]


@pytest.mark.parametrize(("name", "embed_lr"), [("adamw", 0.05), ("muon", 0.05), ("muon", None)])
def test_embeddings_take_their_own_weight_decay(name, embed_lr):
    model = tiny_gpt(tie_embeddings=False, value_embeds=True)
    optim = OptimConfig(name=name, lr=1e-3, embed_lr=embed_lr, weight_decay=0.3, embed_weight_decay=0.0)
    optimizer = build_optimizer(model, optim, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    rates = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == len(names)  # every parameter in exactly one group
    assert decay["wte.weight"] == decay["wpe.weight"] == decay["value_embeds.1.weight"] == 0.0
    assert decay["lm_head.weight"] == decay["blocks.0.mlp.fc.weight"] == 0.3 and decay["ln_f.weight"] == 0.0
    assert rates["wte.weight"] == (embed_lr or 1e-3)  # no rate of their own: AdamW's
    unset = build_optimizer(model, OptimConfig(name=name, weight_decay=0.3, embed_lr=0.05), "cpu")
    (embedding_group,) = [g for g in unset.param_groups if any(p is model.wte.weight for p in g["params"])]
    assert embedding_group["weight_decay"] == 0.3  # unset: optim.weight_decay


def train_steps(model, optimizer, schedule, seeds) -> list[float]:
    losses = []
    for seed in seeds:
        loss = model.loss(*batch(seed))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def test_muon_trains_and_resumes_bitwise_from_its_state_dict():
    optim = OptimConfig(name="muon", lr=3e-3, min_lr=3e-4, muon_lr=0.02, warmup_steps=2, schedule="wsd")
    model = tiny_gpt()
    optimizer = build_optimizer(model, optim, "cpu")
    schedule = build_lr_schedule(optimizer, optim, 12)
    losses = train_steps(model, optimizer, schedule, [0] * 6)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), schedule.state_dict()))
    straight = losses + train_steps(model, optimizer, schedule, [0] * 6)
    assert straight[-1] < straight[0] - 0.5

    resumed_model = tiny_gpt()
    resumed_model.load_state_dict(saved[0])
    resumed_opt = build_optimizer(resumed_model, optim, "cpu")
    resumed_schedule = build_lr_schedule(resumed_opt, optim, 12)
    resumed_opt.load_state_dict(saved[1])
    resumed_schedule.load_state_dict(saved[2])
    assert losses + train_steps(resumed_model, resumed_opt, resumed_schedule, [0] * 6) == straight
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "sgd"}, "optim.name='sgd' is not known; valid: adamw, muon"),
        ({"schedule": "linear"}, "optim.schedule='linear' is not known; valid: cosine, wsd"),
        ({"schedule_by": "tokens"}, "optim.schedule_by='tokens' is not known; valid: steps, time"),
        ({"decay_fraction": 0.0}, r"optim.decay_fraction must be in \(0, 1\], got 0.0"),
        ({"decay_fraction": 1.5}, r"optim.decay_fraction must be in \(0, 1\], got 1.5"),
        ({"muon_lr": 0.0}, "optim.muon_lr must be > 0, got 0.0"),
        ({"muon_momentum": 1.0}, r"optim.muon_momentum must be in \[0, 1\), got 1.0"),
        ({"embed_lr": 0.0}, r"optim.embed_lr must be > 0 or null \(= optim.lr\), got 0.0"),
        ({"head_lr": -1.0}, r"optim.head_lr must be > 0 or null \(= optim.lr\), got -1.0"),
        (
            {"embed_weight_decay": -0.1},
            r"optim.embed_weight_decay must be >= 0 or null \(= optim.weight_decay\), got -0.1",
        ),
        ({"embed_lr": float("nan")}, "optim.embed_lr=nan must be a finite number"),
        ({"eps": -1e-8}, r"optim.eps must be >= 0, got -1e-08; try optim.eps=1e-8\.$"),
        # NaN passed every "< 0" check and inf every "> 0": runs failed later, blaming optim.lr.
        ({"lr": float("inf")}, "^optim.lr=inf must be a finite number, not nan or inf; the default is 0.003"),
        ({"weight_decay": float("nan")}, "optim.weight_decay=nan must be a finite number"),
        ({"beta2": float("nan")}, "optim.beta2=nan must be a finite number"),
        ({"muon_lr": float("inf")}, "optim.muon_lr=inf must be a finite number"),
        ({"eps": float("nan")}, "optim.eps=nan must be a finite number"),
    ],
)  # fmt: skip
def test_bad_optimizer_values(values, message):
    with pytest.raises(GptMiniError, match=message):
        OptimConfig(**values)


def test_without_torch_optim_muon_only_optim_muon_is_refused(monkeypatch):
    """torch.optim.Muon is torch 2.9's; the module subclassed it at import, so every run failed on 2.6-2.8."""
    import importlib.util
    import sys

    import gptmini.training.optim as optim_module

    muon = OptimConfig(name="muon")  # made while torch still has Muon
    monkeypatch.delattr(torch.optim, "Muon")  # an older torch
    spec = importlib.util.spec_from_file_location("optim_on_old_torch", optim_module.__file__)
    old = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, old)
    spec.loader.exec_module(old)  # the import itself works
    assert isinstance(old.build_optimizer(tiny_gpt(), old.OptimConfig(), "cpu"), torch.optim.AdamW)
    message = "^" + re.escape(
        f"optim=muon needs torch.optim.Muon, added in torch 2.9, but this is torch {torch.__version__}; "
        "upgrade it (pip install 'torch>=2.9') or use optim=adamw."
    )
    with pytest.raises(GptMiniError, match=message):
        old.OptimConfig(name="muon")  # with the settings, before any data is read
    with pytest.raises(GptMiniError, match=message):
        old.build_optimizer(tiny_gpt(), muon, "cpu")


def test_muon_needs_a_gpt():
    with pytest.raises(GptMiniError, match="optim.name=muon needs a GPT"):
        build_optimizer(torch.nn.Linear(4, 4), OptimConfig(name="muon"), "cpu")


def test_float32_muon_is_torchs_muon_without_bfloat16_rounding():
    """The CPU variant computes torch's update; only torch's bfloat16 rounding separates the two."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape) * 0.02) for shape in [(48, 16), (16, 48), (16, 16)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    reference, ours = torch.optim.Muon(params, lr=0.02), Float32Muon(twins, lr=0.02)
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        reference.step()
        ours.step()
    for p, q, b in zip(params, twins, before, strict=True):
        step = (p.detach() - b).abs().max()
        assert (p.detach() - q.detach()).abs().max() < 0.02 * step  # within bf16's ~0.4% per element
    assert ours.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    assert ours.state_dict()["state"][0].keys() == {"momentum_buffer"}


def test_orthogonalize_of_a_stack_is_each_matrix_orthogonalized_alone():
    torch.manual_seed(0)
    coefficients = (3.4445, -4.7750, 2.0315)
    for shape in [(3, 48, 16), (2, 16, 48), (2, 16, 16)]:
        stack = torch.randn(*shape)
        one_by_one = torch.stack([orthogonalize(m, coefficients, 5, 1e-7) for m in stack])
        assert torch.allclose(orthogonalize(stack, coefficients, 5, 1e-7), one_by_one, atol=1e-5)
        # Roughly orthogonal: the singular values land near 1 (Newton-Schulz's band is about 0.7 to 1.2).
        singular = torch.linalg.svdvals(one_by_one)
        assert singular.min() > 0.6 and singular.max() < 1.3


def test_float32_muon_steps_matrices_of_one_shape_together_as_if_alone():
    """The batched step (matrices grouped by shape) moves every parameter as its own optimizer would."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (48, 16), (16, 16), (16, 48), (48, 16)]
    params = [torch.nn.Parameter(torch.randn(*shape) * 0.02) for shape in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    together = Float32Muon(params, lr=0.02, weight_decay=0.1)
    singles = [Float32Muon([q], lr=0.02, weight_decay=0.1) for q in alone]
    for _ in range(3):
        for p, q in zip(params, alone, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        together.step()
        for single in singles:
            single.step()
    for p, q in zip(params, alone, strict=True):
        assert torch.allclose(p, q, atol=1e-6)


# ----- fused AdamW and gradient clipping ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "clipping", "fused"),
    [
        (None, True, True),  # a plain loop (bench/) clips itself
        ("32-true", True, True),  # refused at step 1 before: its message even recommended 32-true
        ("bf16-mixed", True, True),  # clipped by GPTTrainingModule.configure_gradient_clipping
        ("bf16-true", True, True),
        ("16-true", True, True),
        ("64-true", True, True),
        ("16-mixed", True, False),  # the GradScaler's gradients are unscaled only inside a fused step
        ("16", True, False),  # 16-mixed's old name
        ("16-mixed", False, True),  # no clipping: fused unscales inside its step, as the scaler expects
    ],
)
def test_adamw_is_fused_on_cuda_and_cpus_wherever_its_gradients_can_be_clipped(precision, clipping, fused):
    assert adamw_fused("cuda", precision, clipping) is fused
    assert adamw_fused("cpu", precision, clipping) is fused
    assert adamw_fused("mps", precision, clipping) is False
    # build_optimizer follows it (CPU parameters: torch's fused AdamW runs on CPUs too).
    optimizer = build_optimizer(tiny_gpt(), OptimConfig(), torch.device("cuda"), precision, clipping)
    assert all(group["fused"] is fused for group in optimizer.param_groups)


@pytest.mark.parametrize(
    ("precision", "on_cuda"),
    [
        ("32-true", "32-true"),
        ("bf16-mixed", "bf16-mixed"),
        # A CPU turns 16-mixed into bf16-mixed; this runs 16-mixed's choice (foreach) under the same plugin.
        ("bf16-mixed", "16-mixed"),
    ],
)
def test_every_precision_trains_with_clipping_and_the_adamw_chosen_for_cuda(
    precision, on_cuda, tmp_path, tiny_train_overrides, compose_train, monkeypatch
):
    """The optimizer a CUDA device would get (fused or not), on the CPU: the run clips and trains with it."""
    import gptmini.training.module as module_file
    import gptmini.training.optim as optim_module
    from gptmini.training.run import train

    chosen = []

    def as_on_cuda(device, precision, clipping):
        chosen.append(adamw_fused("cuda", on_cuda, clipping))
        return chosen[-1]

    for file in (optim_module, module_file):  # the one rule, read by the optimizer and the clipping
        monkeypatch.setattr(file, "adamw_fused", as_on_cuda)
    overrides = [*tiny_train_overrides, f"trainer.precision={precision}", "trainer.gradient_clip_val=0.5"]
    summary = train(compose_train(overrides + ["trainer.max_steps=4"]), out_dir=tmp_path / "run")
    assert chosen and set(chosen) == {on_cuda != "16-mixed"}  # built and clipped by the same answer
    assert summary["steps"] == 4
    assert summary["val_loss"] == pytest.approx(summary["val_loss"])  # finite: NaN != NaN
