"""The GPT model: shapes, initial loss, causality, one trunk (KV cache, decoding step, maps), tying, counts,
config."""

import dataclasses
import math

import pytest
import torch

from gptmini.common import GptMiniError
from gptmini.model.config import MODEL_SIZES, GPTConfig, swiglu_hidden
from gptmini.model.gpt import GPT, relu_squared
from gptmini.training.optim import decay_groups
from gptmini.training.perf import flops_per_token


def small_config(**overrides) -> GPTConfig:
    values = {"vocab_size": 100, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32, "dropout": 0.0}
    return GPTConfig(**{**values, **overrides})


def small_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(small_config(**overrides)).eval()


def random_tokens(batch: int = 2, length: int = 16, vocab: int = 100, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_real_vocab():
    model = small_model()
    assert model.config.padded_vocab_size == 128
    assert model.wte.weight.shape == (128, 32)
    logits, loss = model(random_tokens())
    assert logits.shape == (2, 16, 100)  # the real vocabulary, not the padded one
    assert loss is None


def test_loss_at_init_is_uniform_guess():
    model = small_model(vocab_size=128, pad_vocab_multiple=1)
    idx = random_tokens(4, 16, 128)
    _, loss = model(idx, targets=random_tokens(4, 16, 128, seed=2))
    assert abs(loss.item() - math.log(128)) < 0.15


def test_targets_of_minus_one_are_ignored():
    model = small_model(pad_vocab_multiple=1)  # no padding, so the loss can be recomputed from the logits
    idx, targets = random_tokens(), random_tokens(seed=2)
    targets[:, 8:] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 100), targets[:, :8].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_model_is_causal():
    model = small_model()
    idx = random_tokens()
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 100
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_cached_decode_matches_full_forward():
    model = small_model()
    idx = random_tokens(2, 16)
    cache = model.new_kv_cache(batch_size=2)
    with torch.no_grad():
        expected, _ = model(idx)
        steps = [model(idx[:, :6], kv_cache=cache)[0]]  # prefill the prompt
        assert cache.length == 6
        for t in range(6, 16):  # then one token at a time
            steps.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-5)
    cache.reset()
    assert cache.length == 0


def test_kv_cache_overflow():
    model = small_model()
    cache = model.new_kv_cache(batch_size=1)
    with torch.no_grad():
        model(random_tokens(1, 12), kv_cache=cache)
        with pytest.raises(GptMiniError, match="12 cached \\+ 5 new tokens exceeds block_size=16"):
            model(random_tokens(1, 5), kv_cache=cache)
        with pytest.raises(GptMiniError, match="sequence length 17 exceeds block_size=16"):
            model(random_tokens(1, 17))


def test_prefill_steps_decoding_step_and_maps_walk_one_trunk():
    """Prefill, eager steps, the fixed-shape step that compile=true runs, and the maps pass give the logits
    of one full forward pass."""
    model = small_model()
    idx = random_tokens(2, 16)
    cache, fixed_shape = model.new_kv_cache(batch_size=2), model.new_kv_cache(batch_size=2)
    with torch.no_grad():
        expected, _ = model(idx)
        steps = [model(idx[:, :6], kv_cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(6, 16)]
        model(idx[:, :6], kv_cache=fixed_shape)
        step = model.decode_step(idx[:, 6:7], fixed_shape.positions[6], fixed_shape)
        maps: list[torch.Tensor] = []
        with_maps = model.lm_head(model._hidden(idx, None, maps))[..., :100]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, expected[:, 6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_maps, expected, rtol=1e-5, atol=1e-5)
    assert len(maps) == model.config.n_layer  # one pass: each layer's weights once


def test_weight_tying_shares_storage():
    model = small_model()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_init_statistics():
    model = GPT(small_config(n_embd=256, n_head=4, n_layer=8))
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / 4) < 0.001  # 1/sqrt(2·8) = 1/4
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


def test_gpt2_small_param_count():
    config = GPTConfig(pad_vocab_multiple=1)  # the defaults are GPT-2 small
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(config)
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768


def test_flops_per_token():
    model = small_model()
    n = model.num_params(non_embedding=True)  # the position table is a lookup, not a matmul
    assert flops_per_token(model) == 6 * n + 12 * 2 * 4 * 8 * 16
    assert flops_per_token(model, seq_len=4) == 6 * n + 12 * 2 * 4 * 8 * 4


def test_flops_per_token_counts_an_untied_head_once_and_frozen_weights_at_two_thirds():
    tied = small_model()
    untied = GPT(dataclasses.replace(tied.config, tie_embeddings=False))
    table = untied.wte.weight.numel()
    assert untied.num_params() == tied.num_params() + table
    assert flops_per_token(untied) == flops_per_token(tied)  # the token table is a lookup: no FLOPs
    with_values = GPT(dataclasses.replace(tied.config, value_embeds=True))
    assert flops_per_token(with_values) == flops_per_token(tied)  # value embeddings are lookups too
    for p in tied.parameters():
        p.requires_grad_(False)  # LoRA's frozen base: no weight gradient, 4 FLOPs per weight instead of 6
    n = tied.num_params(non_embedding=True)
    assert flops_per_token(tied) == 4 * n + 12 * 2 * 4 * 8 * 16


def test_optimizer_groups_cover_every_parameter_once():
    model = small_model()
    decay, no_decay = decay_groups(model.parameters(), weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    counted = sum(p.numel() for group in (decay, no_decay) for p in group["params"])
    assert counted == model.num_params()


def test_attention_maps():
    model = small_model()
    maps = model.attention_maps(random_tokens(2, 9))
    assert maps.shape == (2, 2, 4, 9, 9)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 4, 9))
    assert torch.all(maps.triu(diagonal=1) == 0)
    assert not maps.requires_grad


def test_training_steps_reduce_loss():
    model = small_model()
    model.train()
    idx, targets = random_tokens(4, 16), random_tokens(4, 16, seed=2)
    optimizer = torch.optim.AdamW(decay_groups(model.parameters(), 0.1), lr=1e-2)
    losses = []
    for _ in range(5):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_named_sizes_are_one_table_and_explicit_fields_win():
    assert list(MODEL_SIZES) == ["tiny", "mini", "small-cpu", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    config = GPTConfig.from_name("mini", vocab_size=65)
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (4, 4, 128, 64)
    assert GPTConfig.from_name("tiny", n_layer=6).n_layer == 6  # an explicit field beats the size
    for name in MODEL_SIZES:
        GPTConfig.from_name(name)  # every size is valid
    with pytest.raises(GptMiniError, match="unknown model size 'gpt3'; valid: tiny, mini, small-cpu, gpt2"):
        GPTConfig.from_name("gpt3")
    with pytest.raises(GptMiniError, match="unknown GPTConfig field"):
        GPTConfig.from_name("tiny", n_embed=64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd=30 is not divisible by n_head=4"),
        ({"n_layer": 0}, "n_layer=0 must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size=-5 must be a positive integer"),
        ({"block_size": 0}, "block_size=0 must be a positive integer"),
        ({"pad_vocab_multiple": 0}, "pad_vocab_multiple=0 must be a positive integer"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
        ({"attention": "flash"}, "GPTConfig.attention='flash': the GPT has one attention now.*gptmini/book"),
        ({"n_kv_head": 3}, "n_head=4 is not divisible by n_kv_head=3"),
        ({"n_kv_head": 0}, "n_kv_head=0 must be a positive integer"),
        ({"pos_emb": "rope", "n_embd": 36, "n_head": 4}, "pos_emb='rope' needs an even head size.*= 9"),
        ({"pos_emb": "alibi"}, "pos_emb='alibi' is not known; valid: learned, rope"),
        ({"norm": "batchnorm"}, "norm='batchnorm' is not known; valid: layernorm, rmsnorm"),
        ({"mlp": "geglu"}, "mlp='geglu' is not known; valid: gelu, relu2, swiglu"),
        ({"logit_softcap": 0.0}, "logit_softcap=0.0 must be > 0, or null"),
        ({"rope_base": -1.0}, "rope_base=-1.0 must be > 0"),
        # NaN passed every range check and inf every "> 0": runs then failed later, blaming optim.lr.
        ({"rope_base": float("inf")}, r"GPTConfig.rope_base=inf must be a finite number, not nan or inf; "
         r"the default is 10000.0\.$"),
        ({"rope_base": float("nan")}, "GPTConfig.rope_base=nan must be a finite number"),
        ({"logit_softcap": float("inf")}, "GPTConfig.logit_softcap=inf must be a finite number, not nan or "
         "inf; the default is null"),
        ({"logit_softcap": float("nan")}, "GPTConfig.logit_softcap=nan must be a finite number"),
        ({"dropout": float("nan")}, "GPTConfig.dropout=nan must be a finite number"),
    ],
)  # fmt: skip
def test_bad_config_values(overrides, message):
    with pytest.raises(GptMiniError, match=message):
        small_config(**overrides)


# ---------------------------------------------------------------------------------------------------------
# The switches beyond GPT-2
# ---------------------------------------------------------------------------------------------------------

MODERN = {
    "pos_emb": "rope",
    "norm": "rmsnorm",
    "qk_norm": True,
    "mlp": "swiglu",
    "n_kv_head": 2,
    "tie_embeddings": False,
    "logit_softcap": 10.0,
    "unet_skips": True,
    "value_embeds": True,
    "zero_init_proj": True,
}
ONE_SWITCH = [{key: value} for key, value in MODERN.items()] + [{"mlp": "relu2"}, {"n_kv_head": 1}, MODERN]


@pytest.mark.parametrize("switches", ONE_SWITCH, ids=str)
def test_every_switch_is_causal_caches_and_maps(switches):
    model = small_model(**switches)
    idx = random_tokens()
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 100
    cache = model.new_kv_cache(batch_size=2)
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
        steps = [model(idx[:, :6], kv_cache=cache)[0]] + [
            model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(6, 16)
        ]
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])
    torch.testing.assert_close(torch.cat(steps, dim=1), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.next_token_logits(idx), before[:, -1])
    maps = model.attention_maps(idx[:, :9])
    assert maps.shape == (2, 2, 4, 9, 9)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 4, 9))
    assert torch.all(maps.triu(diagonal=1) == 0)


@pytest.mark.parametrize("switches", ONE_SWITCH, ids=str)
def test_every_switch_trains_and_its_chunked_loss_matches_forward(switches):
    model = small_model(**switches).train()
    idx, targets = random_tokens(4, 16), random_tokens(4, 16, seed=2)
    torch.testing.assert_close(model.loss(idx, targets, chunk_rows=7), model(idx, targets)[1])
    optimizer = torch.optim.AdamW(decay_groups(model.parameters(), 0.1), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model.loss(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_relu_squared_has_autograds_values_and_gradients():
    # The hand-written backward against autograd's own chain, at 0 and on both sides of it.
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0]).repeat(3, 1)
    x = torch.cat([x, torch.randn(3, 64)], dim=1).requires_grad_(True)
    reference = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(x)
    relu_squared(x).backward(grad)
    torch.nn.functional.relu(reference).square().backward(grad)
    assert torch.equal(relu_squared(x), torch.nn.functional.relu(x).square())
    assert torch.equal(x.grad, reference.grad)
    assert torch.equal(x.grad[:, 2], torch.zeros(3))  # no gradient at 0, as ReLU's


def test_switch_layouts():
    default, modern = small_model(), small_model(**MODERN)
    assert modern.wpe is None and "wpe.weight" not in modern.state_dict()  # RoPE: no position table
    assert modern.lm_head.weight is not modern.wte.weight  # untied
    assert isinstance(modern.ln_f, torch.nn.RMSNorm) and isinstance(default.ln_f, torch.nn.LayerNorm)
    assert modern.blocks[0].mlp.fc.weight.shape == (2 * 96, 32)  # [gate | up], swiglu_hidden(32) = 96
    assert modern.blocks[0].mlp.proj.weight.shape == (32, 96)
    assert modern.blocks[0].attn.qkv.weight.shape == (32 + 2 * 2 * 8, 32)  # 4 query heads, 2 key/value
    assert swiglu_hidden(768) == 2048 and swiglu_hidden(128) == 352  # 8·C/3 rounded up to 32
    # GPT-2's names stay as they were, for weight import/export and old checkpoints.
    names = set(default.state_dict())
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "blocks.0.ln_1.weight"} <= names
    assert {"blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.1.mlp.fc.weight"} <= names
    assert {"blocks.1.mlp.proj.weight", "lm_head.weight"} <= names


def test_gqa_shrinks_the_kv_cache():
    full = small_model().new_kv_cache(batch_size=2)
    grouped = small_model(n_kv_head=2).new_kv_cache(batch_size=2)
    multi_query = small_model(n_kv_head=1).new_kv_cache(batch_size=2)
    assert full.nbytes == 2 * grouped.nbytes == 4 * multi_query.nbytes
    assert multi_query.keys[0].shape == (2, 1, 16, 8)


@pytest.mark.parametrize("attention", ["heads", "mha", "sdpa"])
def test_an_old_checkpoint_without_the_new_keys_loads(attention):
    """A config saved before the switches existed has none of their keys: GPT-2's defaults fill them. It
    names one of the attention classes that are gone; all shared today's weights, so the key is dropped."""
    old_keys = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}
    old_config = {k: v for k, v in vars(small_config()).items() if k in old_keys | {"pad_vocab_multiple"}}
    old_config["attention"] = attention
    reference = small_model()
    restored = GPT(GPTConfig(**old_config)).eval()
    restored.load_state_dict(reference.state_dict())  # strict: the same parameters, the same names
    idx = random_tokens()
    torch.testing.assert_close(restored(idx)[0], reference(idx)[0])


@pytest.mark.slow
def test_every_switch_compiles_to_the_same_loss_and_gradients():
    model = small_model(**MODERN).train()
    idx, targets = random_tokens(2, 16), random_tokens(2, 16, seed=2)
    expected = model.loss(idx, targets)
    expected.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # aot_eager: dynamo and AOT autograd trace forward and backward as inductor would, without its C++ codegen
    # (minutes on a busy 2-core CPU); test_train.py compiles a whole training run with inductor.
    loss = torch.compile(model.loss, backend="aot_eager", fullgraph=False)(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_the_decoding_step_takes_a_position_per_row():
    """Rows at different lengths (as a server batches them) step together: each reads only its own past."""
    model = small_model(pos_emb="rope", n_kv_head=2)
    idx = random_tokens(2, 16)
    cache = model.new_kv_cache(batch_size=2)
    with torch.no_grad():
        expected, _ = model(idx)
        model(idx[:, :10], kv_cache=cache)  # row 0 then continues at position 4, row 1 at position 9
        positions = torch.tensor([4, 9])
        got = model.decode_step(torch.stack([idx[0, 4:5], idx[1, 9:10]]), positions, cache)
    torch.testing.assert_close(got, torch.stack([expected[0, 4], expected[1, 9]]), rtol=1e-5, atol=1e-5)


def test_unet_skips_add_the_first_halfs_outputs_to_the_second_halfs_inputs_in_mirror_order():
    model = small_model(n_layer=5, unet_skips=True)
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.5, -2.0]))
    idx = random_tokens()
    positions = torch.arange(idx.size(1)).unsqueeze(0)
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(positions)
        outputs = []
        for i, block in enumerate(model.blocks):  # block 3 takes block 1's output, block 4 block 0's
            if i >= 3:
                x = x + {3: -2.0, 4: 0.5}[i] * outputs[4 - i]
            x = block(x, positions)
            outputs.append(x)
        expected = model.lm_head(model.ln_f(x))
        torch.testing.assert_close(model(idx)[0], expected[..., :100])
        plain = small_model(n_layer=5)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "skip_weights"})
        model.skip_weights.zero_()  # weights of zero: exactly the model without skips
        torch.testing.assert_close(model(idx)[0], plain(idx)[0])


def test_value_embeds_add_each_blocks_own_token_vectors_to_its_values_only():
    model = small_model(n_kv_head=2, value_embeds=True)
    assert [tuple(t.weight.shape) for t in model.value_embeds] == [(128, 16)] * 2  # padded V x nkv·hs (2·8)
    idx = random_tokens()
    plain = small_model(n_kv_head=2)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("value_embeds")})
    with torch.no_grad():
        # The queries and keys do not see them: block 0's attention weights are the plain model's.
        torch.testing.assert_close(model.attention_maps(idx)[0], plain.attention_maps(idx)[0])
        assert not torch.allclose(model(idx)[0], plain(idx)[0])
        # Block 0's values are qkv's value part plus its table's rows for the tokens.
        block, table = model.blocks[0], model.value_embeds[0]
        captured = {}
        hook = block.attn.register_forward_hook(lambda m, args, out: captured.update(out=out))
        model(idx)
        hook.remove()
        h = block.ln_1(model.wte(idx) + model.wpe(torch.arange(16)))
        v = block.attn.qkv(h)[..., 48:] + table(idx)  # (B, T, nkv·hs): after 32 query and 16 key features
        q, k, _ = block.attn._project(h, None)
        v = v.view(2, 16, 2, 8).transpose(1, 2)  # (B, nkv, T, hs)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(captured["out"], block.attn.proj(y.transpose(1, 2).reshape(2, 16, 32)))
        for t in model.value_embeds:  # zero tables: exactly the model without them
            t.weight.zero_()
        torch.testing.assert_close(model(idx)[0], plain(idx)[0])


def test_zero_init_proj_starts_every_block_as_the_identity():
    model = small_model(zero_init_proj=True, bias=False)
    assert all(not b.attn.proj.weight.any() and not b.mlp.proj.weight.any() for b in model.blocks)
    idx = random_tokens()
    with torch.no_grad():
        expected = model.lm_head(model.ln_f(model.wte(idx) + model.wpe(torch.arange(16))))
    torch.testing.assert_close(model(idx)[0], expected[..., :100])
    assert small_model().blocks[0].mlp.proj.weight.std() > 0  # GPT-2's start by default


def test_unet_skips_cannot_be_exported_to_gpt2_but_zero_init_proj_can():
    from gptmini.hf.convert import check_exportable

    check_exportable(small_config(zero_init_proj=True))  # an initialisation: GPT-2's layout all the same
    with pytest.raises(GptMiniError, match="model.unet_skips=True cannot be expressed in GPT-2's"):
        check_exportable(small_config(unet_skips=True))
    with pytest.raises(GptMiniError, match="model.value_embeds=True cannot be expressed in GPT-2's"):
        check_exportable(small_config(value_embeds=True))
