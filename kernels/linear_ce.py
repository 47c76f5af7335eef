"""Chunked linear + cross-entropy for the output head: the [N, V] logits are never held whole.

The plain head computes ``logits = h @ W^T`` for all N scored rows ([N, V] in the compute dtype, then a fp32
copy for the loss, then a fp32 gradient of the same size), which for a large vocabulary (an LLM decoder's V =
128,256) is most of a step's activation memory. Here rows go in chunks of ``chunk_rows``; for each chunk the
forward computes the logits, their log-sum-exp, the loss terms and the argmax, and, when a gradient will be
needed, the gradient at once: dlogits = softmax - onehot, dh = dlogits W, dW += dlogits^T h (fp32). The
backward only scales those by the incoming gradient. Same matmul FLOPs as the plain head, no recompute, peak
extra memory one chunk of logits. A pure-torch implementation: every matmul is a cuBLAS call already.
"""

from __future__ import annotations

import torch

from memtrain.kernels.common import compute_dtype
from memtrain.kernels.reference import linear_cross_entropy_reference  # noqa: F401  (what this must equal)

#: logits elements per chunk: 2^26 fp32 values = 256 MiB (2^22 on CPU)
CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Sum over rows of CE(h W^T, labels), computed chunk by chunk; returns (loss_sum, argmax)."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_rows, dtype, grad_enabled):
        need_h = grad_enabled and ctx.needs_input_grad[0]  # needs_input_grad is also set under no_grad
        need_w = grad_enabled and ctx.needs_input_grad[1]
        hc, wc = h.to(dtype), weight.to(dtype)
        n = h.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        argmax = torch.empty(n, dtype=torch.long, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for i in range(0, n, chunk_rows):
            rows = slice(i, min(i + chunk_rows, n))
            y = labels[rows]
            logits = (hc[rows] @ wc.t()).float()  # [n_c, V]
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
            argmax[rows] = logits.argmax(-1)
            if need_h or need_w:
                grad = torch.exp_(logits.sub_(lse.unsqueeze(1)))  # softmax, in place of the logits
                grad[torch.arange(grad.shape[0], device=grad.device), y] -= 1.0
                grad = grad.to(dtype)
                if need_h:
                    dh[rows] = (grad @ wc).to(h.dtype)
                if need_w:
                    dw.add_(grad.t() @ hc[rows])
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.need = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        ctx.mark_non_differentiable(argmax)
        return loss, argmax

    @staticmethod
    def backward(ctx, d_loss, d_argmax):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        dh = dw = None
        if need_h:
            dh = saved.pop(0)
            dh = dh * d_loss.to(dh.dtype)
        if need_w:
            dw = (saved.pop(0) * d_loss).to(ctx.w_dtype)
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the logits ``h @ weight^T`` against ``labels``, and the argmax of every row,
    without materialising the [N, V] logits.

    h [N, d], weight [V, d] (the head, no bias), labels [N] (every row scored, N >= 1) ->
    (loss [] fp32, differentiable in h and weight; argmax [N] long). The logits are computed in the autocast
    dtype when autocast is on (as the plain head's Linear would), the softmax and loss in fp32.
    """
    if h.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one scored row")
    if chunk_rows is None:
        budget = CHUNK_ELEMENTS.get(h.device.type, CHUNK_ELEMENTS["cpu"])
        chunk_rows = max(1, budget // weight.shape[0])
    dtype = compute_dtype(h.device, h.dtype)
    loss_sum, argmax = LinearCrossEntropyFunction.apply(
        h, weight, labels, int(chunk_rows), dtype, torch.is_grad_enabled()
    )
    return loss_sum / h.shape[0], argmax
