"""Fused GPU kernels for the mixer layers, imported as ``memtrain.kernels``.

The code lives in the repository's top-level ``kernels/`` folder (the layout of docs/DESIGN): this file only
adds that folder to the package path, so ``memtrain.kernels.mix`` is ``kernels/mix.py``. ``kernels`` itself is
never a top-level package (transformers probes for an unrelated package of that name).

``memtrain.kernels.dispatch`` is the one entry point the models use; it imports Triton only when a Triton
kernel is actually chosen.
"""
from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))  # noqa: F821 (package __path__)
