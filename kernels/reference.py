"""The pure-torch references of the kernels in this folder (no Triton needed): what each kernel must equal.

:func:`causal_mix` is also the model's own mixing on the torch path (``memtrain.models.mixing`` imports it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """torch LayerNorm over the last axis: x [..., d] -> [..., d]."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def ffn_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + Linear(w2, b2)(GELU(Linear(w1, b1)(x))) with exact-erf GELU: x [..., d] -> [..., d]."""
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return y if residual is None else residual + y


def linear_reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """residual + Linear(w, b)(x): x [..., k], w [n, k] -> [..., n]."""
    y = F.linear(x, w, b)
    return y if residual is None else residual + y


def linear_cross_entropy_reference(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain head: (mean CE of ``(h @ weight^T).float()`` against labels, argmax per row).
    h [N, d], weight [V, d], labels [N] (every row scored) -> (loss [], argmax [N])."""
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, labels), logits.argmax(-1)
