"""Triton LayerNorm over the last axis, forward and backward, beside its torch reference.

One program normalises BLOCK_M rows held whole in registers (the feature width d <= 16384), in fp32, and
writes the output directly in the dtype the next matmul computes in (bf16 under autocast), so the pre-norm
mixer block reads the fp32 residual stream once and writes half the bytes a torch LayerNorm (fp32 output
under autocast) plus the matmul's cast would. The residual adds of the block are fused into the epilogues of
the kernels that produce them (mixing, second FFN matmul, multi-head out projection), so this kernel takes
no residual input.

Backward: dx per row; dweight and dbias as per-program fp32 partial sums, added by torch (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memtrain.kernels.common import Kernel, Launch, call_op, compute_dtype, next_pow2, sm_count
from memtrain.kernels.reference import layer_norm_reference  # noqa: F401  (what this must equal)


@triton.jit
def _ln_fwd_kernel(X, W, Bv, Y, MEAN, RSTD, M, D, eps, s_xm, s_ym, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit: M * d may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * s_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(Bv + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * s_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(
    X,
    W,
    DY,
    MEAN,
    RSTD,
    DX,
    DWP,
    DBP,
    M,
    D,
    rows_per_prog,
    s_xm,
    s_dym,
    s_dxm,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: M * d may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row0 = pid * rows_per_prog
    for r in range(row0, tl.minimum(row0 + rows_per_prog, M), BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = (rows < M) & (rows < row0 + rows_per_prog)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * s_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * s_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * s_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(DWP + pid * D + cols, dw_acc, mask=col_ok)
    tl.store(DBP + pid * D + cols, db_acc, mask=col_ok)


def _rows_block(d: int) -> int:
    """Rows per program so that a tile holds about 4096 fp32 values."""
    return max(1, min(16, 4096 // next_pow2(d)))


LN_FWD = Kernel(_ln_fwd_kernel, [{"num_warps": 8}], ["D"], {})
LN_BWD = Kernel(_ln_bwd_kernel, [{"num_warps": 8}], ["D"], {})


def plan_ln_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    y: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> Launch:
    M, D = x.shape
    bm, bd = _rows_block(D), next_pow2(D)
    return Launch(
        LN_FWD,
        lambda meta: (triton.cdiv(M, bm),),
        (x, weight, bias, y, mean, rstd, M, D, eps, x.stride(0), y.stride(0)),
        dict(BLOCK_M=bm, BLOCK_D=bd),
    )


def plan_ln_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dx: torch.Tensor
) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """The launch, and the [programs, d] partial sums of dweight and dbias it writes."""
    M, D = x.shape
    bm, bd = _rows_block(D), next_pow2(D)
    programs = max(1, min(triton.cdiv(M, bm), 4 * sm_count(x.device)))
    rows_per_prog = triton.cdiv(triton.cdiv(M, programs), bm) * bm
    programs = triton.cdiv(M, rows_per_prog)
    dwp = torch.empty((programs, D), dtype=torch.float32, device=x.device)
    dbp = torch.empty((programs, D), dtype=torch.float32, device=x.device)
    plan = Launch(
        LN_BWD,
        lambda meta: (programs,),
        (x, weight, dy, mean, rstd, dx, dwp, dbp, M, D, rows_per_prog, x.stride(0), dy.stride(0), dx.stride(0)),
        dict(BLOCK_M=bm, BLOCK_D=bd),
    )
    return plan, dwp, dbp


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, d] (unit stride along d) -> (y [M, d] in out_dtype, mean [M] fp32, rstd [M] fp32). No autograd."""
    M, D = x.shape
    if D > 16384:
        raise ValueError(f"the Triton LayerNorm holds a row in registers; d = {D} > 16384")
    y = out if out is not None else torch.empty((M, D), dtype=out_dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    plan_ln_forward(x, weight, bias, eps, y, mean, rstd).run()
    return y, mean, rstd


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x [M, d], weight [d], mean/rstd [M] -> (dx [M, d] in x's dtype, dweight [d] fp32, dbias [d] fp32)."""
    dx = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    plan, dwp, dbp = plan_ln_backward(dy, x, weight, mean, rstd, dx)
    plan.run()
    return dx, dwp.sum(0), dbp.sum(0)


@torch.library.custom_op("memtrain::layer_norm_fwd", mutates_args=())
def _ln_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_forward(x, weight, bias, eps, out_dtype)


@_ln_fwd_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    M = x.shape[0]
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(M, dtype=torch.float32),
        x.new_empty(M, dtype=torch.float32),
    )


@torch.library.custom_op("memtrain::layer_norm_bwd", mutates_args=())
def _ln_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_backward(dy, x, weight, mean, rstd)


@_ln_bwd_op.register_fake
def _(dy, x, weight, mean, rstd):
    D = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty(D, dtype=torch.float32), x.new_empty(D, dtype=torch.float32))


class LayerNormFunction(torch.autograd.Function):
    """y = LayerNorm(x) over the last axis, output in ``out_dtype``; see :func:`layer_norm`."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, mean, rstd = call_op(_ln_fwd_op, layer_norm_forward, x2, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape, ctx.w_dtype, ctx.b_dtype = shape, weight.dtype, bias.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx, dw, db = call_op(_ln_bwd_op, layer_norm_backward, dy2, x2, weight, mean, rstd)
        return dx.view(ctx.shape), dw.to(ctx.w_dtype), db.to(ctx.b_dtype), None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis with Triton: x [..., d], weight/bias [d] -> [..., d].

    The output is in the dtype the following matmul computes in: the autocast dtype when autocast is on,
    else x's dtype (torch's LayerNorm returns fp32 under autocast and the matmul then casts it).
    """
    return LayerNormFunction.apply(x, weight, bias, float(eps), compute_dtype(x.device, x.dtype))
