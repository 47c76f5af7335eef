"""The pure-torch references of the kernels in this folder (no Triton needed): what each kernel must equal.

The mixing reference is the model's own :func:`memtrain.models.mixing.causal_mix`, re-exported here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from memtrain.models.mixing import causal_mix  # noqa: F401  (the mixing kernels' reference)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """torch LayerNorm over the last axis: x [..., d] -> [..., d]."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def ffn_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """residual + Linear(w2, b2)(GELU(Linear(w1, b1)(x))) with exact-erf GELU: x [..., d] -> [..., d]."""
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return y if residual is None else residual + y


def linear_reference(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """residual + Linear(w, b)(x): x [..., k], w [n, k] -> [..., n]."""
    y = F.linear(x, w, b)
    return y if residual is None else residual + y


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain head: (mean CE of ``(h @ weight^T).float()`` against labels, argmax per row).
    h [N, d], weight [V, d], labels [N] (every row scored) -> (loss [], argmax [N])."""
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, labels), logits.argmax(-1)
