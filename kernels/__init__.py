"""Fused GPU kernels for the mixer layers, imported as ``memtrain.kernels``.

This folder installs as the package ``memtrain.kernels`` (``pyproject.toml`` maps it), in a wheel as in an
editable install; it is never a top-level package of its own. ``memtrain.kernels.dispatch`` is the one entry
point the models use; it imports Triton only when a Triton kernel is actually chosen.

Run from the repository root (``python -m memtrain``, ``python -m pytest``), this folder is also reachable as a
top-level ``kernels``, the name of an unrelated package on PyPI that other libraries probe for: transformers 5
imports ``kernels`` when it finds one without package metadata and reads its ``__version__``. Imported under
that name, this module is therefore empty and has no version, which such a probe reads as "not usable", and it
must not raise: an error here would break the probing library's own import.
"""
