"""GPT-2 between the Hugging Face layout and gptmini's ``GPT``: configs and state dicts, both directions.

The two models compute the same function; only the storage differs:
- HF keeps every projection in a ``Conv1D`` whose weight is (in, out); ``nn.Linear`` keeps (out, in), so
  each of c_attn, c_proj, c_fc is transposed. c_attn's columns are [queries | keys | values], each split
  by head in order, which is exactly the row layout of gptmini's fused ``qkv``.
- The LM head is tied to the token embeddings in both: HF files usually leave ``lm_head.weight`` out.
- gptmini pads the embedding to a multiple of 64 rows. The padding rows of a *trained* model are never
  targets, but an imported GPT-2 has none to give them, and a zero row would score logit 0, far above GPT-2's
  real logits, and swamp the softmax of a fine-tune's loss. So imports use ``pad_vocab_multiple=1`` (nanoGPT
  does the same) and exports drop the padding rows.
- Old HF files carry ``attn.bias`` / ``attn.masked_bias`` (the causal mask as a buffer) and keys without the
  ``transformer.`` prefix; both are accepted.
- A config value of the wrong type (``layer_norm_epsilon: null``) or absurd size (``n_positions: 1e12``) is
  one line naming the key; the weights are then checked against the config by
  ``gptmini.weights.check_weights`` (names, shapes, floating point, finite).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gptmini.common import GptMiniError
from gptmini.model.config import GPTConfig, declared

# config.json's names for GPTConfig's fields, where they differ (for messages).
HF_NAMES = {"block_size": "n_positions"}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which gptmini's blocks use, and GPT-2's
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # HF's names for GELU's tanh approximation
# HF Conv1D modules and the gptmini Linear each becomes (within a block).
BLOCK_LINEARS = {
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}


# ---------------------------------------------------------------------------------------------------------
# Hugging Face → gptmini
# ---------------------------------------------------------------------------------------------------------


def config_from_hf(hf: dict, source: str) -> GPTConfig:
    """The ``GPTConfig`` of an HF GPT-2 config.json; anything gptmini would compute differently is refused."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise GptMiniError(
            f"{source} is a {model_type!r} model; gptmini imports GPT-2 models only (model_type 'gpt2')."
        )
    n_embd = _int(hf, "n_embd", source)
    epsilon = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    is_number = isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)
    checks = [
        ("activation_function", hf.get("activation_function", "gelu_new") in TANH_GELUS, "gelu_new"),
        ("layer_norm_epsilon", is_number and math.isclose(epsilon, LAYER_NORM_EPS), "1e-05"),
        ("n_inner", hf.get("n_inner") in (None, 4 * n_embd), "null (4 x n_embd)"),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", True) is True, "true"),
        ("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "true"),
        ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "false"),
        ("add_cross_attention", not hf.get("add_cross_attention", False), "false"),
    ]
    for key, ok, gpt2_value in checks:
        if not ok:
            raise GptMiniError(
                f"{source}: config.json has {key}={hf.get(key)!r}, which gptmini's GPT cannot reproduce "
                f"exactly (it computes GPT-2's {key}={gpt2_value}); use a standard GPT-2 model."
            )
    try:
        return GPTConfig(
            vocab_size=_int(hf, "vocab_size", source),
            block_size=_int(hf, "n_positions", source, fallback="n_ctx"),
            n_layer=_int(hf, "n_layer", source),
            n_head=_int(hf, "n_head", source),
            n_embd=n_embd,
            bias=True,
            pad_vocab_multiple=1,  # no padding rows: see the module docstring
        )
    except GptMiniError as error:  # e.g. n_embd not divisible by n_head
        raise GptMiniError(
            f"{source}: config.json describes no valid GPT-2 ({error}); save it again."
        ) from None


def _int(hf: dict, key: str, source: str, fallback: str | None = None) -> int:
    value = hf.get(key, hf.get(fallback) if fallback else None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GptMiniError(
            f"{source}: config.json has {key}={value!r}; a GPT-2 config needs a positive integer."
        )
    return value


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or of pytorch_model.bin loaded with ``weights_only=True``; for a
    sharded save (``path`` is its ``*.index.json``), of every shard it names."""
    from gptmini.hf.hub import INDEX_SUFFIX, shard_files

    shards = shard_files(path) if path.name.endswith(INDEX_SUFFIX) else [path]
    return {key: tensor for shard in shards for key, tensor in _read_weights_file(shard).items()}


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One weights file: a mapping of names to tensors, or one line saying what it holds instead."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise GptMiniError(f'reading {path.name} needs safetensors: pip install -e ".[hf]"') from None
    except Exception as exc:  # noqa: BLE001 - every parser error means "damaged file"
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise GptMiniError(
            f"cannot read the weights {path} ({reason}): the file is truncated or corrupt; "
            "download or save it again."
        ) from None
    if not isinstance(state, dict):
        raise GptMiniError(f"{path} holds no state dict of tensors; save the model with save_pretrained.")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise GptMiniError(
                f"{path} holds a {type(value).__name__} under the key {key!r}, where a weights file holds "
                "tensors named by strings; save the model again with save_pretrained."
            )
    return state


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """gptmini ``GPT`` weights from an HF GPT-2 state dict (keys with or without ``transformer.``).

    Unknown or missing names are left for ``gptmini.weights.check_weights`` to list; the causal-mask buffers
    of old files are dropped.
    """
    state = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # mask buffers; the head is tied to wte below
        if key.startswith("h."):  # a block's; wte, wpe and ln_f have the same names in both
            _, layer, rest = key.split(".", 2)
            module, _, param = rest.rpartition(".")
            if module in BLOCK_LINEARS and param == "weight":
                tensor = tensor.t().contiguous()  # Conv1D's (in, out) -> Linear's (out, in)
            key = f"blocks.{layer}.{BLOCK_LINEARS.get(module, module)}.{param}"
        state[key] = tensor
    if "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]  # tied, as GPT's own state dict lists it
    return state


# ---------------------------------------------------------------------------------------------------------
# gptmini → Hugging Face
# ---------------------------------------------------------------------------------------------------------


def check_exportable(config: GPTConfig) -> None:
    """Refuse, naming the option, a model GPT-2's format cannot express exactly (the fields that declare
    ``gpt2``; read with getattr, so configs written before a switch existed still answer)."""
    for name, gpt2_value in declared("gpt2").items():
        value = getattr(config, name, gpt2_value)
        if value == gpt2_value or (name == "n_kv_head" and value == config.n_head):
            continue  # n_kv_head = n_head is plain multi-head attention, as GPT-2's
        if name == "n_kv_head":
            raise GptMiniError(
                f"model.n_kv_head={value} (grouped-query attention) cannot be expressed in GPT-2's "
                "Hugging Face format (one key/value head per query head); export only GPT-2-layout models."
            )
        raise GptMiniError(
            f"model.{name}={value!r} cannot be expressed in GPT-2's Hugging Face format (it needs "
            f"{name}={gpt2_value!r}); export only GPT-2-layout models."
        )


def hf_config_from(config: GPTConfig, eot_id: int) -> dict:
    """An HF ``config.json`` for ``GPT2LMHeadModel`` with this shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def state_dict_to_hf(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel weights (``transformer.`` keys, Conv1D layout, tied head left out).

    The padding rows of the embedding are dropped. A model without biases gets zero biases, which compute
    exactly the same (HF's GPT-2 always has them).
    """
    out = {
        "transformer.wte.weight": state["wte.weight"][: config.vocab_size],
        "transformer.wpe.weight": state["wpe.weight"],
    }
    out.update(_with_bias(state, "ln_f", "transformer.ln_f"))
    for layer in range(config.n_layer):
        ours, theirs = f"blocks.{layer}", f"transformer.h.{layer}"
        for norm in ("ln_1", "ln_2"):
            out.update(_with_bias(state, f"{ours}.{norm}", f"{theirs}.{norm}"))
        for hf_name, name in BLOCK_LINEARS.items():  # Linear's (out, in) -> Conv1D's (in, out)
            out.update(_with_bias(state, f"{ours}.{name}", f"{theirs}.{hf_name}", transpose=True))
    # safetensors wants contiguous tensors that share no memory with one another.
    return {key: tensor.detach().to("cpu", torch.float32).contiguous().clone() for key, tensor in out.items()}


def _with_bias(state: dict, ours: str, theirs: str, transpose: bool = False) -> dict[str, torch.Tensor]:
    """A layer's weight and bias under HF's names; a zero bias (one per output) where gptmini has none."""
    weight, bias = state[f"{ours}.weight"], state.get(f"{ours}.bias")
    bias = weight.new_zeros(weight.size(0)) if bias is None else bias
    return {f"{theirs}.weight": weight.t() if transpose else weight, f"{theirs}.bias": bias}
