"""Causal token mixing: the masked mixer's learned, position-specific mixing over the sequence.

Reference maths (docs/reference.md §1.1, §1.4): the sequence positions are the channels of a Conv1d
and the feature axis is its spatial axis, so with one tap it is a dense L x L mixing matrix shared by all
features, and with k taps it also reaches k neighbouring features (PyTorch 'same' padding, asymmetric for even k):

    y[b, t, f] = sum_{s <= t} sum_j W[t, s, j] * x[b, s, f + j - (k - 1) // 2] + bias[t]     (x zero outside 0..d-1)

Causality is functional: every forward uses ``tril`` of the weight (per tap), so the upper triangle is never
read, gets exactly zero gradient and is never written. Shapes: B batch, L positions (fixed at construction),
d features, H heads, d_h = d / H, k taps.

:func:`causal_mix` here is the pure-torch reference. :class:`CausalMix` runs it or the fused Triton kernels
(``kernels/mix.py``) through :mod:`memtrain.kernels.dispatch`, as its ``kernels`` attribute says
(``model.kernels``: auto | triton | torch).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from memtrain.kernels import dispatch


def causal_weight(weight: torch.Tensor) -> torch.Tensor:
    """Lower-triangular part over (out_pos t, in_pos s) of every tap, diagonal kept.

    weight [..., L, L, k] -> [..., L, L, k] with entries s > t set to zero.
    """
    return torch.tril(weight.movedim(-1, -3)).movedim(-3, -1)


def causal_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal token mixing (the pure-torch reference that a fused kernel may replace).

    One matrix: x [B, L, d],      weight [L, L, k],    bias [L]    -> [B, L, d]
    H heads:    x [B, H, L, d_h], weight [H, L, L, k], bias [H, L] -> [B, H, L, d_h] (head h uses weight[h])

    Only the causal part of ``weight`` (s <= t, every tap) is used. k = 1 is a batched matmul; k > 1 is a
    (grouped, one group per head) ``F.conv1d`` with the positions as channels and 'same' padding.
    """
    seq_len, k = weight.shape[-2], weight.shape[-1]
    if k == 1:
        y = torch.matmul(torch.tril(weight[..., 0]), x)
        return y if bias is None else y + bias.unsqueeze(-1).to(y.dtype)
    groups = weight.shape[0] if weight.dim() == 4 else 1
    w = causal_weight(weight).reshape(groups * seq_len, seq_len, k)
    b = None if bias is None else bias.reshape(groups * seq_len)
    xs = x.reshape(-1, groups * seq_len, x.shape[-1])  # [B', G*L, features]: positions are the channels
    if k % 2 == 0:  # 'same' for even k: (k-1)//2 left, k//2 right; padded here, as PyTorch would (with a warning)
        xs = F.pad(xs, ((k - 1) // 2, k // 2))
    y = F.conv1d(xs, w, b, padding="same" if k % 2 else 0, groups=groups)
    return y.view(x.shape)


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
