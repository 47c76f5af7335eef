"""What the Triton kernels share: interpreter detection, compute dtypes, tuning configs, op dispatch.

Nothing here imports Triton at module level, so ``memtrain.kernels`` imports on machines without it.
The kernel modules (``mix``, ``layernorm``, ``ffn``) import Triton themselves and are imported lazily by
:mod:`memtrain.kernels.dispatch`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    """Whether Triton is installed here (it is optional on CPU machines); checked once, without importing it."""
    return _TRITON_FOUND


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device``: CUDA with Triton installed, or any device under
    the interpreter (which copies CPU tensors through numpy)."""
    if not triton_importable():
        return False
    return device.type == "cuda" or interpreting()


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul on ``device`` with inputs of ``dtype`` computes in: the autocast dtype when autocast
    is on for that device type (as torch's own matmuls would), else ``dtype``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def upcast_dots() -> bool:
    """The interpreter computes ``tl.dot`` on bf16/fp16 operands wrongly: kernels then cast operands to fp32
    before the dot (exact, since bf16 -> fp32 is exact)."""
    return interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE fp32 for fp32 operands (no TF32: the fp32 path must match the torch
    reference to 1e-5), the native tensor-core path otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 1 for the interpreter (it runs one program at a time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def autotune_enabled() -> bool:
    """Autotuning is on for CUDA unless ``MEMTRAIN_TRITON_AUTOTUNE=0`` (then the first config is used)."""
    return not interpreting() and os.environ.get("MEMTRAIN_TRITON_AUTOTUNE", "1") != "0"


class Kernel:
    """A ``@triton.jit`` kernel plus its candidate configs.

    ``launch(grid, *args, config=None, **kwargs)``: with ``config`` (a dict of constexpr block sizes, plus
    optional ``num_warps`` / ``num_stages``), that config; else under the interpreter ``interp_config``; else
    (CUDA) the kernel autotuned over ``configs`` and keyed on ``key``, or the first config when autotuning is
    off. ``grid`` is a callable of the chosen meta-parameters, as in Triton. Every config must give the same
    result: the kernels overwrite their outputs, so autotuning may rerun them; ``reset`` names the arguments
    that must be zeroed before each run instead (partial sums only some configs write).
    """

    def __init__(
        self, jitted: Any, configs: list[dict], key: list[str], interp_config: dict, reset: list[str] | None = None
    ):
        self.jitted, self.configs, self.key, self.interp_config = jitted, configs, key, interp_config
        self.reset = reset
        self._tuned = None

    def _autotuned(self) -> Any:
        if self._tuned is None:
            import triton

            cfgs = [
                triton.Config(
                    {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                    num_warps=c.get("num_warps", 4),
                    num_stages=c.get("num_stages", 3),
                )
                for c in self.configs
            ]
            self._tuned = triton.autotune(cfgs, key=self.key, reset_to_zero=self.reset)(self.jitted)
        return self._tuned

    def launch(self, grid: Callable[[dict], tuple], *args: Any, config: dict | None = None, **kwargs: Any) -> None:
        if config is None and interpreting():
            config = self.interp_config
        if config is None and not autotune_enabled():
            config = self.configs[0]
        if config is None:
            self._autotuned()[grid](*args, **kwargs)
        else:
            self.jitted[grid](*args, **config, **kwargs)


@dataclass
class Launch:
    """One planned kernel launch: the kernel, its grid (a function of the meta-parameters), the positional
    arguments and the compile-time flags. ``run(config)`` launches it (see :meth:`Kernel.launch`);
    ``kernels/aot_check.py`` compiles the same plans ahead of time instead."""

    kernel: Kernel
    grid: Callable[[dict], tuple]
    args: tuple
    flags: dict = field(default_factory=dict)

    def run(self, config: dict | None = None) -> None:
        self.kernel.launch(self.grid, *self.args, config=config, **self.flags)


def call_op(op: Callable, impl: Callable, *args: Any) -> Any:
    """The registered operator ``op`` while torch.compile traces (the graph then holds one opaque node), the
    plain Python ``impl`` in eager mode (no dispatcher overhead)."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())
