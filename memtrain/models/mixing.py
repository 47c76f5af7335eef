"""Causal token mixing: the masked mixer's learned, position-specific mixing over the sequence.

Reference maths (docs/reference.md §1.1, §1.4): the sequence positions are the channels of a Conv1d
and the feature axis is its spatial axis, so with one tap it is a dense L x L mixing matrix shared by all
features, and with k taps it also reaches k neighbouring features (PyTorch 'same' padding, asymmetric for even k):

    y[b, t, f] = sum_{s <= t} sum_j W[t, s, j] * x[b, s, f + j - (k - 1) // 2] + bias[t]     (x zero outside 0..d-1)

Causality is functional: every forward uses ``tril`` of the weight (per tap), so the upper triangle is never
read, gets exactly zero gradient and is never written. Shapes: B batch, L positions (fixed at construction),
d features, H heads, d_h = d / H, k taps.

The pure-torch reference :func:`causal_mix` lives with the other kernel references
(:mod:`memtrain.kernels.reference`). :class:`CausalMix` runs it or the fused Triton kernels (``kernels/mix.py``)
through :mod:`memtrain.kernels.dispatch`, as its ``kernels`` attribute says (``model.kernels``: auto | triton |
torch).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from memtrain.kernels import dispatch  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)
from memtrain.kernels.reference import causal_weight  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)


class CausalMix(nn.Module):
    """Token-mixing sublayer of a mixer block: [B, L, d] -> [B, L, d].

    n_heads = 0: one mixing weight ``weight`` [L, L, k] and ``bias`` [L] (the reference ``conv``).
    n_heads = H > 0: ``proj`` = Linear(d, d) (the H per-head projections of width d/H as one matrix),
    per-head mixing ``weight`` [H, L, L, k] and ``bias`` [H, L], then ``out_proj`` = Linear(d, d)
    (the correct multi-head form of docs/reference.md §1.4).
    Mixing parameters start as U(+-1/sqrt(L*k)) like the reference Conv1d, with the upper triangle zeroed.
    ``kernels`` (auto | triton | torch) picks the implementation (see :mod:`memtrain.kernels.dispatch`).
    """

    def __init__(self, d_model: int, seq_len: int, kernel: int = 1, n_heads: int = 0):
        super().__init__()
        if n_heads and d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.seq_len, self.kernel, self.n_heads = seq_len, kernel, n_heads
        shape = (seq_len, seq_len, kernel) if n_heads == 0 else (n_heads, seq_len, seq_len, kernel)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(shape[:-2]))
        if n_heads:
            self.proj = nn.Linear(d_model, d_model)
            self.out_proj = nn.Linear(d_model, d_model)
        self.kernels = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(+-1/sqrt(L*k)) for weight and bias (PyTorch's Conv1d default), then zero the upper triangle."""
        bound = 1.0 / math.sqrt(self.seq_len * self.kernel)
        with torch.no_grad():
            nn.init.uniform_(self.weight, -bound, bound)
            self.weight.copy_(causal_weight(self.weight))
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d] -> [B, L, d] (plus ``residual`` [B, L, d] when given, fused into the last kernel on the
        Triton path); output position t depends on input positions 0..t only."""
        if x.shape[-2] != self.seq_len:
            raise ValueError(f"mixer built for {self.seq_len} positions got {x.shape[-2]}")
        if self.n_heads == 0:
            return dispatch.causal_mix(x, self.weight, self.bias, residual, impl=self.kernels)
        B, L, d = x.shape
        heads = self.proj(x).view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2)  # [B, H, L, d_h]
        y = dispatch.causal_mix(heads, self.weight, self.bias, impl=self.kernels).transpose(1, 2).reshape(B, L, d)
        if dispatch.resolve(self.kernels, x.device) == "torch" or dispatch.partitioned(self.out_proj):
            y = self.out_proj(y)
            return y if residual is None else residual + y
        return dispatch.linear(y, self.out_proj.weight, self.out_proj.bias, residual, impl="triton")

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, kernel={self.kernel}, n_heads={self.n_heads}"
