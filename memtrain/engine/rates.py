"""Throughput, model FLOP/s, MFU and memory of the steps between two log lines of a training run.

One window is the steps since the previous logged step. Its time is wall-clock time on rank 0 minus the time
spent in held-out evaluation and checkpoint writes (:meth:`Rates.paused`), measured after the host has read
the window's losses back, so a GPU's queued work is inside the window it belongs to. The FLOP count is
:func:`memtrain.flops.flops_per_token` of the curriculum stage (the one count of ``bench`` and ``sweep
collect``); MFU divides by the dense datasheet peak of the device (``train.peak_tflops`` overrides it).
"""

from __future__ import annotations

import contextlib
import resource
import time

import torch

from memtrain.config import Config
from memtrain.devices import device_name, resolve_precision
from memtrain.engine.distributed import DistInfo
from memtrain.flops import device_peak_tflops, matmul_precision, mfu, stage_flops_per_token


class Rates:
    """Counts the steps of the current window (``rates.steps += 1`` per step); :meth:`window` returns its
    numbers and starts the next one."""

    def __init__(self, cfg: Config, vocab: int, info: DistInfo, tokens_per_step: int):
        self.world = info.world_size
        self.device = info.device
        self.tokens_per_step = tokens_per_step
        self.total_steps = cfg.train.steps
        #: model FLOPs per token of each curriculum stage (None: not counted, e.g. an HF decoder)
        self.flops_per_token = stage_flops_per_token(cfg, vocab)
        self.device_name = device_name(self.device)
        #: {"tflops": per-device dense peak, "source": where it came from}, or None (no MFU)
        self.peak: dict | None = None
        if cfg.train.peak_tflops:
            self.peak = {"tflops": cfg.train.peak_tflops, "source": "train.peak_tflops"}
        elif self.device.type == "cuda":
            precision = matmul_precision(resolve_precision(cfg.train.precision, self.device))
            found = device_peak_tflops(self.device_name, precision)
            if found is not None:
                self.peak = {"tflops": found[0], "source": f"datasheet {found[1]}"}
        self.start()

    def start(self) -> None:
        """Start the first window (after start-up, which is not a training step)."""
        self.steps, self._t0, self._paused = 0, time.perf_counter(), 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def paused(self):
        """Time inside this block (evaluation, checkpointing) is not part of the window."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t

    def window(self, step: int, stage: int) -> dict[str, float]:
        """The numbers of the window that ends after ``step`` (in curriculum stage ``stage``); keys are those of
        docs/observability.md: tokens_per_s (all ranks), tokens_per_s_per_rank, step_time_s, eta_s,
        model_tflops_per_rank, mfu, memory/peak_alloc_gib (CUDA), memory/peak_rss_gib."""
        now = time.perf_counter()
        elapsed = max(now - self._t0 - self._paused, 1e-9)
        steps = max(self.steps, 1)
        tok_s = self.tokens_per_step * steps / elapsed
        out = {
            "tokens_per_s": tok_s,
            "tokens_per_s_per_rank": tok_s / self.world,
            "step_time_s": elapsed / steps,
            "eta_s": (self.total_steps - step) * elapsed / steps,
        }
        if self.flops_per_token is not None:
            flops_s = self.flops_per_token[min(stage, len(self.flops_per_token) - 1)] * tok_s
            out["model_tflops_per_rank"] = flops_s / self.world / 1e12
            util = mfu(flops_s, self.peak["tflops"] if self.peak else None, self.world)
            if util is not None:
                out["mfu"] = util
        if self.device.type == "cuda":
            out["memory/peak_alloc_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        # ru_maxrss is in KiB on Linux: the largest resident set of this process so far
        out["memory/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.steps, self._t0, self._paused = 0, now, 0.0
        return out
