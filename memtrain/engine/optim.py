"""AdamW and the learning-rate schedule.

AdamW is apex's ``FusedAdam`` when apex imports (CUDA only), else torch's fused AdamW where the device
supports it, else the foreach implementation. The schedule is transformers' warmup + cosine / linear /
constant schedule; it is not re-implemented here.
"""

from __future__ import annotations

from typing import Any, cast

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
    return make_adamw(param_groups(model, cfg.weight_decay), cfg, device)


def make_adamw(groups: list[dict], cfg: OptimConfig, device: torch.device, allow_apex: bool = True):
    """AdamW over ``groups`` (see the module docstring for which implementation)."""
    if device.type == "cuda" and allow_apex:
        try:
            from apex.optimizers import FusedAdam  # type: ignore

            return FusedAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
        except ImportError:
            pass
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_scheduler

    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    sched = get_scheduler(
        _SCHEDULES[cfg.schedule], optimizer=opt, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    return cast(torch.optim.lr_scheduler.LambdaLR, sched)  # every schedule of _SCHEDULES is a LambdaLR


def staged_param_groups(
    model, weight_decay: float, stages: list, always_frozen: list[str], params: list[nn.Parameter] | None = None
) -> tuple[list[dict], list[tuple[bool, ...]]]:
    """Parameter groups for an engine whose optimizer cannot skip a parameter without a gradient (ZeRO
    flattens each group): one group per (frozen-in-which-curriculum-stages, weight decay or not).

    Returns ``(groups, frozen)``: ``frozen[g][s]`` is True when group g is frozen in curriculum stage s, and
    :func:`staged_scheduler` gives it learning rate 0 there, so it stays exactly as it was. Parameters of
    ``always_frozen`` groups are left out (they never train); ``params`` restricts the groups to those
    parameters (a pipeline stage's own); groups that end up empty are dropped.
    """
    groups_of = {g: {id(p) for p in ps} for g, ps in model.module_groups().items()}
    never = {i for g in always_frozen for i in groups_of.get(g, ())}
    keep = None if params is None else {id(p) for p in params}
    by_key: dict[tuple, list] = {}
    for p in model.parameters():
        if id(p) in never or (keep is not None and id(p) not in keep):
            continue
        frozen = tuple(any(id(p) in groups_of.get(g, ()) for g in stage.freeze) for stage in stages)
        by_key.setdefault((frozen, p.ndim >= 2), []).append(p)
    groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0} for (_, decay), ps in by_key.items()]
    return groups, [frozen for frozen, _ in by_key]


def staged_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, stages: list, frozen: list[tuple[bool, ...]]
):
    """:func:`build_scheduler`'s schedule for every group, times 0 at the steps where the group is frozen."""
    from memtrain.objectives import stage_at

    base = build_scheduler(opt, cfg, total_steps).lr_lambdas[0]
    stage_of = [stage_at(stages, s)[0] for s in range(total_steps + 1)]

    def masked(flags: tuple[bool, ...]):
        def lr_lambda(step: int) -> float:
            idx = stage_of[min(step, total_steps)]
            return 0.0 if flags[idx] else base(step)

        return lr_lambda

    sched = torch.optim.lr_scheduler.LambdaLR(opt, [masked(f) for f in frozen])
    extra: Any = sched  # attributes LambdaLR does not declare
    extra.peak_lr, extra.base_lambda = cfg.lr, base  # for unmasked_lr (both pickle with the state dict)
    return sched


def unmasked_lr(sched) -> float:
    """The learning rate of a :func:`staged_scheduler` schedule now, whatever its frozen groups have."""
    return sched.peak_lr * sched.base_lambda(sched.last_epoch)
