"""The chunked training loss (``gptmini/model/loss.py``, called as ``GPT.loss``): an LM head and
cross-entropy in row chunks that never hold the full logits. It must give the same loss and gradients as
``forward``, with and without gradients and under bf16 autocast.
"""

import copy

import pytest
import torch

from gptmini import GPT, GPTConfig


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32))


@pytest.mark.parametrize("chunk_rows", [7, 48, 1024])  # uneven chunks, exact, one chunk
def test_chunked_loss_matches_forward_loss_and_gradients(chunk_rows):
    model = tiny_gpt()
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (3, 16), generator=gen)
    targets = torch.randint(0, 300, (3, 16), generator=gen)
    targets[0, :5] = -1  # ignored positions must not count, in the loss or in its mean

    _, expected = model(idx, targets)
    expected.backward()
    loss = twin.loss(idx, targets, chunk_rows=chunk_rows)
    loss.backward()

    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_chunked_loss_without_grad_and_under_bf16_autocast():
    model = tiny_gpt()
    idx = torch.randint(0, 300, (2, 16))
    targets = torch.randint(0, 300, (2, 16))
    _, expected = model(idx, targets)
    with torch.no_grad():
        torch.testing.assert_close(model.loss(idx, targets), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, expected_bf16 = model(idx, targets)
        loss = model.loss(idx, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_bf16.float(), atol=2e-2, rtol=1e-2)
    loss.backward()
    assert model.wte.weight.grad.dtype == torch.float32


def test_chunked_loss_with_logit_softcap_matches_forward():
    """The cap c·tanh(z/c) is applied inside the chunks too, with its derivative in the gradients."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32, logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits large enough that the cap bends them
    twin = copy.deepcopy(model)
    idx, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    logits, expected = model(idx, targets)
    assert logits.abs().max() <= 2.0
    expected.backward()
    loss = twin.loss(idx, targets, chunk_rows=5)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    uncapped = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32))
    uncapped.load_state_dict(model.state_dict())
    assert not torch.allclose(uncapped(idx, targets)[1], expected)  # the cap changed the loss
