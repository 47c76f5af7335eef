"""Fused GPU kernels for the mixer layers, imported as ``memtrain.kernels``.

This folder installs as the package ``memtrain.kernels`` (``pyproject.toml`` maps it), in a wheel as in an
editable install; it is never a top-level package of its own. ``memtrain.kernels.dispatch`` is the one entry
point the models use; it imports Triton only when a Triton kernel is actually chosen.
"""

if __name__ != "memtrain.kernels":
    # Run from the repository root, this folder shadows the unrelated `kernels` package on PyPI, which other
    # libraries probe for with `import kernels`: refuse, so that such a probe sees "not installed".
    raise ImportError(f"{__file__}: memtrain's kernels import as memtrain.kernels, not as {__name__}")
