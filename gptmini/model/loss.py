"""The training loss without the full logits tensor: the LM head and cross-entropy in row chunks."""

import torch
from torch import Tensor


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` without ever holding the full (N, V) logits.

    With GPT-2's 50k vocabulary the logits of a 32 x 1024 batch take 6.6 GB in fp32, and the standard path
    keeps several such tensors alive (logits, their fp32 copy, log-softmax for backward). Here the rows go
    through in chunks: each chunk's logits are made, reduced to its loss, turned into their gradient
    (softmax - one_hot) and multiplied back into the gradients of ``x`` and ``weight`` right away, in the
    forward pass. Backward then only scales the two stored gradients. Same FLOPs as the standard path.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_rows: int,
        grads: bool,
        softcap: float | None = None,
    ) -> Tensor:
        """x (N, C), weight (V, C), targets (N,) with -1 = ignore; returns the mean loss over kept rows.

        ``softcap`` c makes the logits c·tanh(x·W / c) (as ``GPT._logits``); None leaves them as they are.
        """
        device = x.device.type
        # Under autocast do the matmuls in its dtype (as nn.Linear would) and the softmax in fp32.
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        # Only the gradients autograd asks for: a frozen head (LoRA freezes it, and the embedding it is tied
        # to) must cost no (V, C) matmul per chunk and no (V, C) buffer.
        need_x, need_w = (grads and needed for needed in ctx.needs_input_grad[:2])
        with torch.autocast(device, enabled=False):
            xs, w = x.to(dtype), weight.to(dtype)
            keep = targets != -1  # (N,)
            safe_targets = targets.clamp(min=0)  # -1 would be an invalid index; those rows are masked
            total = torch.zeros((), device=x.device, dtype=torch.float32)
            grad_x = torch.empty_like(xs) if need_x else None  # (N, C)
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, C)
            for start in range(0, x.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                x_c, t_c, keep_c = xs[rows], safe_targets[rows, None], keep[rows, None]  # (n, C), (n, 1)
                logits = (x_c @ w.t()).float()  # (n, V)
                if softcap is not None:
                    capped = torch.tanh(logits / softcap)  # (n, V), kept for the chain rule below
                    logits = capped * softcap
                # log-sum-exp spelled out, so its exponentials are the softmax's too: one exp over (n, V)
                # instead of two, and the row mask rides on the normalisation (7-10 ms of the 80 ms loss path
                # in a 2-core CPU's Shakespeare step).
                target_logits = logits.gather(1, t_c)  # (n, 1), before logits is overwritten
                row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                exps = logits.sub_(row_max).exp_()  # (n, V), in place
                sums = exps.sum(dim=-1, keepdim=True)  # (n, 1)
                total += ((row_max + sums.log() - target_logits) * keep_c).sum()
                if need_x or need_w:
                    grad = exps.mul_(keep_c / sums)  # softmax of the kept rows, zeros elsewhere: (n, V)
                    grad.scatter_add_(1, t_c, -keep_c.to(grad.dtype))  # softmax - one_hot
                    if softcap is not None:
                        grad.mul_(1.0 - capped.square())  # d(c·tanh(z/c))/dz = 1 - tanh(z/c)²
                    grad = grad.to(dtype)
                    if need_x:
                        grad_x[rows] = grad @ w  # (n, C)
                    if need_w:
                        grad_w.add_(grad.t() @ x_c)  # (V, C), accumulated in fp32
            count = keep.sum().clamp(min=1)  # a tensor: no host sync
        ctx.save_for_backward(grad_x, grad_w, count)
        ctx.x_dtype = x.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_out / count  # the gradients above are of the summed loss
        dx = None if grad_x is None else (grad_x * scale).to(ctx.x_dtype)
        dw = None if grad_w is None else grad_w * scale
        return dx, dw, None, None, None, None
