"""AdamW and the learning-rate schedule.

AdamW is apex's ``FusedAdam`` when apex imports (CUDA only), else torch's fused AdamW where the device
supports it, else the foreach implementation. The schedule is transformers' warmup + cosine / linear /
constant schedule; it is not re-implemented here.
"""
from __future__ import annotations

import torch
from torch import nn

from memtrain.config import OptimConfig

_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (>= 2-D) only; norms, biases and per-position mixing biases are not decayed.
    Every parameter is included, frozen or not, so the optimizer state keeps one layout across curriculum
    stages (a parameter without a gradient is skipped by AdamW)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore

            return FusedAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
        except ImportError:
            pass
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return get_scheduler(_SCHEDULES[cfg.schedule], optimizer=opt, num_warmup_steps=warmup,
                         num_training_steps=total_steps)
