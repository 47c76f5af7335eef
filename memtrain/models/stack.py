"""A stack of blocks built from a :class:`~memtrain.config.StackConfig`, plus the small helpers every model uses.

Mixer stacks are fixed-length (their context is set at construction); transformer stacks accept any length T
and use positions 0..T-1.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from memtrain.config import StackConfig
from memtrain.models.blocks import MixerBlock, TransformerBlock, rotary_cos_sin

_M = TypeVar("_M", bound=nn.Module)


def make_norm(cfg: StackConfig) -> nn.Module:
    """The stack's norm over [..., d]: LayerNorm (with bias) for mixers, RMSNorm for transformers."""
    if cfg.arch == "mixer":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def init_like(module: _M, arch: str) -> _M:
    """Initialise the Linear/Embedding layers of ``module`` as the ``arch`` stack they belong to does.

    transformer: weights N(0, 0.02), biases 0 (HF Llama); mixer: PyTorch defaults are kept (the reference).
    Returns ``module``.
    """
    if arch == "transformer":
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def apply_init(model: nn.Module, init: str) -> None:
    """``model.init``: ``torch`` resets every Linear and Embedding of ``model`` to PyTorch's defaults (Embedding
    N(0, 1), Linear U(±1/sqrt(fan_in)) with its bias); ``arch`` keeps what each layer's architecture chose
    (:func:`init_like`). Mixing weights and norms are not Linear or Embedding layers and keep theirs."""
    if init == "torch":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()


class Stack(nn.Module):
    """``cfg.n_layers`` blocks, then an optional final norm: [B, T, d] -> [B, T, d].

    ``seq_len`` is the mixer context (T must equal it); transformers ignore it and take any T.
    """

    def __init__(self, cfg: StackConfig, seq_len: int, final_norm: bool = False):
        super().__init__()
        self.arch, self.seq_len = cfg.arch, seq_len
        self.head_dim = cfg.d_model // max(cfg.n_heads, 1)
        self.rope_theta = cfg.rope_theta
        if cfg.arch == "mixer":
            blocks = [
                MixerBlock(cfg.d_model, seq_len, cfg.kernel, cfg.n_heads, cfg.ffn_mult, cfg.norm_eps)
                for _ in range(cfg.n_layers)
            ]
        else:
            blocks = [
                TransformerBlock(cfg.d_model, cfg.n_heads, cfg.ffn_mult, cfg.norm_eps) for _ in range(cfg.n_layers)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.norm = make_norm(cfg) if final_norm else nn.Identity()
        #: activation checkpointing: in training, each block recomputes its activations in the backward pass
        #: (``dist.activation_checkpointing``; set by the engine, parameter names unchanged)
        self.recompute = False

    def rope_for(self, x: torch.Tensor):
        """The rotary (cos, sin), each [T, d_h], that the blocks of a transformer stack take for x [B, T, d];
        None for a mixer stack. (A pipeline stage runs blocks one at a time with it.)"""
        if self.arch != "transformer":
            return None
        return rotary_cos_sin(x.shape[1], self.head_dim, self.rope_theta, x.device, x.dtype)

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks ``start``..``stop - 1`` (all by default) on x [B, T, d] -> [B, T, d], without the final norm
        (a pipeline stage runs them one at a time)."""
        rope = self.rope_for(x)
        recompute = self.recompute and torch.is_grad_enabled()
        for block in self.blocks[start:stop]:
            x = checkpoint(block, x, rope, use_reentrant=False) if recompute else block(x, rope)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]: every block, then the final norm."""
        return self.norm(self.run_blocks(x))
