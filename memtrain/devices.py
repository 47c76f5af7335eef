"""Which device a process runs on and which precision its matmuls use: one rule for every command.

``pick_device`` serves ``train.device``, ``--device`` of the measurement commands and ``precompute``;
``resolve_precision`` / ``autocast_for`` serve the engines, ``bench``, ``precompute`` and the throughput log.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable

import torch

from memtrain.errors import UserError


def pick_device(requested: str, local_rank: int | None = None, what: str = "train.device") -> torch.device:
    """``auto`` (CUDA when available), ``cuda`` or ``cpu`` -> a device; the GPU is the rank's ``LOCAL_RANK``
    on its node (``local_rank``, else the environment variable). UserError naming ``what`` when CUDA is
    asked for and there is none."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"{what}: cuda was requested but no CUDA device is available")
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` when asked for, or ``auto`` on a CUDA device that supports it; otherwise ``fp32``."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return "bf16"
    return "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the forward passes run in: bf16 autocast for :func:`resolve_precision` bf16,
    else nothing."""
    if resolve_precision(precision, device) == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3``, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
