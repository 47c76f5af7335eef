"""Timed training steps of one model config on one batch: the measurement ``memtrain bench`` makes for each
kernel variant and ``memtrain repro`` makes for each model it compares (tokens per second, peak memory, the
losses, optionally the kernels with the most self time).
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from memtrain.devices import autocast_for


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_memory_gib(dev: torch.device) -> float | None:
    if dev.type == "cuda":
        return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    return None


def run_variant(
    cfg: Any,
    variant: str,
    ids: torch.Tensor,
    vocab: int,
    steps: int,
    warmup: int,
    precision: str,
    dev: torch.device,
    profile_rows: int = 0,
) -> dict:
    """Train ``steps`` timed steps of ``variant``; returns its timings, memory and losses."""
    from memtrain.engine.optim import build_optimizer
    from memtrain.kernels.dispatch import set_kernels  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)
    from memtrain.models import build_model
    from memtrain.objectives import SpecialTokens, compute_losses

    impl, compiled = variant.split("+")[0], variant.endswith("+compile")
    torch.manual_seed(cfg.run.seed)
    model = set_kernels(build_model(cfg.model, vocab), impl).to(dev)
    if cfg.model.frozen_encoder is not None:
        model.freeze(["encoder"])
    opt = build_optimizer(model, cfg.optim, dev)
    runner = torch.compile(model) if compiled else model
    weights = cfg.stages()[0].weights.active()
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=cfg.objective.n_delimiters, filler_id=5)
    autocast = autocast_for(precision, dev)
    losses: list[float] = []

    def step() -> torch.Tensor:
        with autocast():
            total, _ = compute_losses(model, ids, weights, special, forward=runner)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total.detach()

    t0 = time.perf_counter()
    for _ in range(warmup):
        losses.append(float(step()))
    sync(dev)
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = []
    t0 = time.perf_counter()
    for _ in range(steps):
        done.append(step())
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    losses += [float(x) for x in done]
    row = {
        "variant": variant,
        "ms_per_step": round(dt * 1e3, 3),
        "tokens_per_s": round(ids.numel() / dt, 1),
        "warmup_s": round(warmup_s, 2),
        "peak_mem_GiB": peak_memory_gib(dev),
        "loss_first": round(losses[0], 5),
        "loss_last": round(losses[-1], 5),
    }
    if dev.type != "cuda":
        row["max_rss_growth_MiB"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    if profile_rows:
        row["profile"] = profile_steps(step, dev, profile_rows)
    return row


def profile_steps(step, dev: torch.device, rows: int) -> list[dict]:
    """The ``rows`` kernels (or CPU ops) with the most self time over two profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [
        {
            "name": e.key[:90],
            "calls": e.count // 2,
            "ms_per_step": round(getattr(e, key) / 2e3, 3),
            "share": round(getattr(e, key) / total, 4),
        }
        for e in events[:rows]
    ]
