"""The one switch between the Triton kernels and the pure-torch reference: ``model.kernels``.

``auto``    the implementation measured fastest on the device: today the torch reference everywhere (below)
``triton``  Triton; on CPU only under the interpreter (``TRITON_INTERPRET=1``, slow: for tests), else an error
``torch``   the torch reference everywhere

On an H200 (bf16, docs/performance.md) every fused operator lost to the same operator in torch eager, forward +
backward at the mixer autoencoder's shapes: mixing 0.97x, layer norm 0.55x, FFN 0.78x, linear + cross-entropy
0.75x (V 8000) and 0.63x (V 128256); whole training steps ran at 0.83-0.88x (autoencoder) and 0.44-0.63x
(memory model) of torch eager, and torch.compile over the torch reference ran at 1.27-1.31x. So ``auto`` picks
the torch reference, which ``train.compile`` fuses; ``triton`` stays selectable, for instance for the chunked
linear + cross-entropy's memory (1.0 GiB instead of 11.5 GiB of logits and their gradient at V 128256).

Models hold the setting as a ``kernels`` attribute on the modules that dispatch (mixer blocks, mixing layers
and the model itself, for the output head); :func:`set_kernels` sets it on all of them. Each function below
takes ``impl`` (one of the three) and the same tensors as its torch reference, and returns the same result
up to rounding. Triton modules are imported on first use, so nothing here needs Triton on a CPU machine.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memtrain.errors import UserError
from memtrain.kernels.common import triton_importable, triton_runs_on

IMPLS = ("auto", "triton", "torch")


def resolve(impl: str, device: torch.device) -> str:
    """``impl`` (auto | triton | torch) for tensors on ``device`` -> "triton" or "torch".

    Raises UserError for ``triton`` where Triton cannot run (no CUDA and no interpreter, or no Triton)."""
    if impl == "torch":
        return "torch"
    if impl == "auto":  # the measured choice (module docstring)
        return "torch"
    if impl == "triton":
        if not triton_runs_on(device):
            why = "Triton is not installed" if not triton_importable() else f"the tensors are on {device.type}"
            raise UserError(
                f"model.kernels: triton needs a CUDA device with Triton installed ({why}); use "
                "kernels: auto or torch (the torch reference), or set TRITON_INTERPRET=1 "
                "to run the Triton kernels in the (slow) CPU interpreter"
            )
        return "triton"
    raise UserError(f"model.kernels: expected one of {', '.join(IMPLS)}, got {impl!r}")


def partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are partitioned by DeepSpeed ZeRO-3 (they carry ``ds_id``). ZeRO-3
    gathers a parameter in the forward hook of the module that owns it; the fused paths read submodules'
    parameters without calling those submodules, so such modules keep the torch path."""
    for p in module.parameters():
        return hasattr(p, "ds_id")
    return False


def set_kernels(model: nn.Module, impl: str) -> nn.Module:
    """Set ``kernels = impl`` on ``model`` and on every submodule that dispatches (has a ``kernels``
    attribute). Returns ``model``."""
    if impl not in IMPLS:
        raise UserError(f"model.kernels: expected one of {', '.join(IMPLS)}, got {impl!r}")
    model.kernels = impl
    for m in model.modules():
        if hasattr(m, "kernels"):
            m.kernels = impl
    return model


def causal_mix(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal token mixing plus an optional residual: ``residual + reference.causal_mix(x, weight, bias)``.

    One matrix: x [B, L, d], weight [L, L, k], bias [L], residual [B, L, d] -> [B, L, d];
    H heads: x [B, H, L, d_h], weight [H, L, L, k], bias [H, L], residual like x -> [B, H, L, d_h].
    """
    if resolve(impl, x.device) == "triton":
        from memtrain.kernels import mix

        return mix.causal_mix(x, weight, bias, residual)
    from memtrain.kernels.reference import causal_mix as reference

    y = reference(x, weight, bias)
    return y if residual is None else residual + y


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, impl: str = "auto"
) -> torch.Tensor:
    """LayerNorm over the last axis: x [..., d], weight/bias [d] -> [..., d]. The Triton version returns the
    matmul compute dtype (bf16 under autocast) instead of torch's fp32."""
    if resolve(impl, x.device) == "triton":
        from memtrain.kernels import layernorm

        return layernorm.layer_norm(x, weight, bias, eps)
    from memtrain.kernels.reference import layer_norm_reference

    return layer_norm_reference(x, weight, bias, eps)


def ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """residual + Linear(w2, b2)(GELU(Linear(w1, b1)(x))): x [..., d] -> [..., d] (exact-erf GELU)."""
    if resolve(impl, x.device) == "triton":
        from memtrain.kernels import ffn as triton_ffn

        return triton_ffn.ffn(x, w1, b1, w2, b2, residual)
    from memtrain.kernels.reference import ffn_reference

    return ffn_reference(x, w1, b1, w2, b2, residual)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """residual + Linear(w, b)(x): x [..., k], w [n, k] -> [..., n]."""
    if resolve(impl, x.device) == "triton":
        from memtrain.kernels import ffn as triton_ffn

        return triton_ffn.linear(x, w, b, residual)
    from memtrain.kernels.reference import linear_reference

    return linear_reference(x, w, b, residual)


def fused_head(model: object, device: torch.device) -> bool:
    """Whether the output head of ``model`` uses the chunked linear + cross-entropy: when the model's
    ``kernels`` setting resolves to Triton here (so CPU training keeps the plain head unless asked) and its
    ``logits`` is the standard ``lm_head(norm(h))`` with a bias-free ``lm_head`` (a model class with its own
    head keeps the plain path)."""
    impl = getattr(model, "kernels", None) or getattr(getattr(model, "cfg", None), "kernels", "torch")
    standard = getattr(model, "standard_head", None)
    if impl == "torch" or standard is None or not standard():
        return False
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or partitioned(head):
        return False
    return resolve(impl, device) == "triton"


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE of ``h @ weight^T`` against labels, argmax per row): h [N, d], weight [V, d], labels [N].
    The fast version never materialises the [N, V] logits (see ``kernels/linear_ce.py``)."""
    if resolve(impl, h.device) == "triton":
        from memtrain.kernels import linear_ce

        return linear_ce.linear_cross_entropy(h, weight, labels)
    from memtrain.kernels.reference import linear_cross_entropy_reference

    return linear_cross_entropy_reference(h, weight, labels)


__all__ = [
    "IMPLS",
    "resolve",
    "set_kernels",
    "partitioned",
    "causal_mix",
    "layer_norm",
    "ffn",
    "linear",
    "fused_head",
    "linear_cross_entropy",
]
