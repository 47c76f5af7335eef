"""Triton matmuls with fused epilogues for the mixer's FFN (GELU) and the residual adds, beside torch references.

One matmul kernel, C = A @ B over [M, K] x [K, N] (any strides, fp32 accumulation), with an epilogue chosen
at compile time:

``none``   C = acc (+ bias[n]) (+ residual[m, n])                  second FFN matmul, multi-head out projection
``gelu``   C2 = acc + bias (pre-activation), C = GELU(C2)           first FFN matmul
``dgelu``  C = acc * GELU'(aux[m, n]) (+ column sums of C)          backward of the second matmul into the first

so the FFN never runs a separate GELU, GELU-backward, bias or residual pass: per layer that is one read and
write of the [tokens, 4d] activation less in the forward and two in the backward. The weight gradients and
the input gradient of the first matmul are plain cuBLAS matmuls (nothing to fuse there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memtrain.kernels.common import Kernel, Launch, call_op, compute_dtype, dot_precision, upcast_dots
from memtrain.kernels.reference import ffn_reference, linear_reference  # noqa: F401  (what these must equal)

EPILOGUES = {"none": 0, "gelu": 1, "dgelu": 2}


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)


@triton.jit
def _mm_kernel(
    A,
    Bm,
    BIAS,
    RES,
    AUX,
    C,
    C2,
    CS,
    M,
    N,
    K,
    s_am,
    s_ak,
    s_bk,
    s_bn,
    s_rm,
    s_rn,
    s_xm,
    s_xn,
    s_cm,
    s_cn,
    s_dm,
    s_dn,
    EPI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    COLSUM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C; tiles ordered in groups of GROUP_M rows for L2 reuse of B.
    The program id is widened to int64 first, so every offset is 64-bit (tensors of >= 2^31 elements)."""
    pid = tl.program_id(0).to(tl.int64)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # wrapped: every load in bounds; the store is masked
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(A + rows[:, None] * s_am + kk[None, :] * s_ak, mask=kk[None, :] < K, other=0.0)
        b = tl.load(Bm + kk[:, None] * s_bk + cols[None, :] * s_bn, mask=kk[:, None] < K, other=0.0)
        a = a.to(b.dtype)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPI == 1:
        tl.store(C2 + offs_m[:, None] * s_dm + offs_n[None, :] * s_dn, acc.to(C2.dtype.element_ty), mask=mask)
        acc = _gelu(acc)
    if EPI == 2:
        h = tl.load(AUX + offs_m[:, None] * s_xm + offs_n[None, :] * s_xn, mask=mask, other=0.0).to(tl.float32)
        acc = acc * _gelu_grad(h)
    if HAS_RES:
        acc += tl.load(RES + offs_m[:, None] * s_rm + offs_n[None, :] * s_rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn, acc.to(C.dtype.element_ty), mask=mask)
    if COLSUM:
        tl.store(CS + pid_m * N + offs_n, tl.sum(tl.where(mask, acc, 0.0), axis=0), mask=n_ok)


def _cfg(bm, bn, bk, warps, stages, group=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages}


_MM_KEY = ["M", "N", "K", "EPI"]
# bf16 candidates, the first also the untuned default. ``python -m memtrain.kernels.aot_check`` (sm_90): the
# 128x128 / 8-warp and 64x128 / 4-warp tiles compile without register spills for all three epilogues; the
# 128x256 tile spills 270-1200 bytes (the fp32 residual / pre-activation tiles of the epilogue).
MM_16 = Kernel(
    _mm_kernel,
    [_cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3)],
    _MM_KEY,
    _cfg(64, 64, 32, 4, 1, group=2),
    reset=["CS"],
)
MM_32 = Kernel(
    _mm_kernel,
    [_cfg(64, 64, 32, 4, 3), _cfg(128, 64, 32, 4, 3), _cfg(64, 128, 32, 4, 3)],
    _MM_KEY,
    _cfg(64, 64, 32, 4, 1, group=2),
    reset=["CS"],
)


def plan_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    c2: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    aux: torch.Tensor | None,
    epi: int,
    colsum: bool,
) -> tuple[Launch, torch.Tensor | None]:
    """The launch of C = epilogue(a @ b), and the column-sum partials it writes (or None)."""
    M, K = a.shape
    N = b.shape[1]
    kernel = MM_32 if b.dtype == torch.float32 else MM_16
    cs = None
    if colsum:  # one partial row per row block, sized for the smallest BLOCK_M; zeroed (autotuning too)
        n_rows = triton.cdiv(M, min(cfg["BLOCK_M"] for cfg in kernel.configs + [kernel.interp_config]))
        cs = torch.zeros((n_rows, N), dtype=torch.float32, device=a.device)
    r_s = residual.stride() if residual is not None else (0, 0)
    x_s = aux.stride() if aux is not None else (0, 0)
    d_s = c2.stride() if c2 is not None else (0, 0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    pick = lambda t: t if t is not None else c  # noqa: E731  (unused pointer arguments)
    args = (
        a,
        b,
        pick(bias),
        pick(residual),
        pick(aux),
        c,
        pick(c2),
        pick(cs),
        M,
        N,
        K,
        *a.stride(),
        *b.stride(),
        *r_s,
        *x_s,
        *c.stride(),
        *d_s,
    )
    flags = dict(
        EPI=epi,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        COLSUM=colsum,
        UPCAST=upcast_dots(),
        DOT_PREC=dot_precision(b.dtype),
    )
    return Launch(kernel, grid, args, flags), cs


def matmul_epilogue(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    aux: torch.Tensor | None = None,
    epilogue: str = "none",
    colsum: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """C = epilogue(a @ b) with Triton (no autograd).

    a [M, K], b [K, N] (any strides; a is cast to b's dtype in the kernel), bias [N], residual [M, N],
    aux [M, N] (the pre-activation, for ``dgelu``). Returns (C [M, N] in ``out_dtype`` (default b's dtype),
    C2 = the pre-activation in b's dtype for ``gelu`` else None, column sums of C [N] fp32 if ``colsum``
    else None). ``out``: write C there (tests poison it); ``config``: block sizes instead of the tuned ones.
    """
    M, K = a.shape
    K2, N = b.shape
    if K2 != K:
        raise ValueError(f"matmul shapes {tuple(a.shape)} x {tuple(b.shape)} do not fit")
    epi = EPILOGUES[epilogue]
    if epi == 2 and aux is None:
        raise ValueError("the dgelu epilogue needs aux (the pre-activation)")
    dev = a.device
    c = out if out is not None else torch.empty((M, N), dtype=out_dtype or b.dtype, device=dev)
    c2 = torch.empty((M, N), dtype=b.dtype, device=dev) if epi == 1 else None
    plan, cs = plan_mm(a, b, c, c2, bias, residual, aux, epi, colsum)
    plan.run(config)
    return c, c2, (cs.sum(0) if cs is not None else None)


@torch.library.custom_op("memtrain::matmul_epilogue", mutates_args=())
def _mm_op(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    aux: torch.Tensor | None,
    epilogue: str,
    colsum: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, c2, cs = matmul_epilogue(
        a, b, bias=bias, residual=residual, aux=aux, epilogue=epilogue, colsum=colsum, out_dtype=out_dtype
    )
    return c, (c2 if c2 is not None else c.new_empty(0)), (cs if cs is not None else c.new_empty(0))


@_mm_op.register_fake
def _(a, b, bias, residual, aux, epilogue, colsum, out_dtype):
    M, N = a.shape[0], b.shape[1]
    c2 = a.new_empty((M, N), dtype=b.dtype) if epilogue == "gelu" else a.new_empty(0, dtype=out_dtype)
    cs = a.new_empty(N, dtype=torch.float32) if colsum else a.new_empty(0, dtype=out_dtype)
    return a.new_empty((M, N), dtype=out_dtype), c2, cs


def _mm(a, b, bias=None, residual=None, aux=None, epilogue="none", colsum=False, out_dtype=None):
    return call_op(_mm_op, _mm_impl, a, b, bias, residual, aux, epilogue, colsum, out_dtype or b.dtype)


def _mm_impl(a, b, bias, residual, aux, epilogue, colsum, out_dtype):
    return matmul_epilogue(
        a, b, bias=bias, residual=residual, aux=aux, epilogue=epilogue, colsum=colsum, out_dtype=out_dtype
    )


class FFNFunction(torch.autograd.Function):
    """out = residual + W2 GELU(W1 x + b1) + b2 on rows x [M, d]; see :func:`ffn`."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual):
        g, h, _ = _mm(x, w1.t(), bias=b1, epilogue="gelu", out_dtype=w1.dtype)
        out_dtype = torch.result_type(g, residual) if residual is not None else g.dtype
        out, _, _ = _mm(g, w2.t(), bias=b2, residual=residual, out_dtype=out_dtype)
        ctx.save_for_backward(x, w1, w2, h, g)
        ctx.dtypes = (b1.dtype, b2.dtype, None if residual is None else residual.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, h, g = ctx.saved_tensors
        b1_dtype, b2_dtype, res_dtype = ctx.dtypes
        dout_c = dout.to(w2.dtype)
        dh, _, db1 = _mm(dout_c, w2, aux=h, epilogue="dgelu", colsum=True, out_dtype=w2.dtype)
        dw2 = dout_c.t() @ g
        db2 = dout.sum(0, dtype=torch.float32)
        dw1 = dh.t() @ x
        dx = dh @ w1
        dres = None if res_dtype is None else dout.to(res_dtype)
        return dx, dw1, db1.to(b1_dtype), dw2, db2.to(b2_dtype), dres


class LinearFunction(torch.autograd.Function):
    """out = residual + x W^T + b on rows x [M, k]; see :func:`linear`."""

    @staticmethod
    def forward(ctx, x, w, b, residual):
        out_dtype = torch.result_type(x, residual) if residual is not None else x.dtype
        out, _, _ = _mm(x, w.t(), bias=b, residual=residual, out_dtype=out_dtype)
        ctx.save_for_backward(x, w)
        ctx.dtypes = (None if b is None else b.dtype, None if residual is None else residual.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        b_dtype, res_dtype = ctx.dtypes
        dout_c = dout.to(w.dtype)
        db = None if b_dtype is None else dout.sum(0, dtype=torch.float32).to(b_dtype)
        dres = None if res_dtype is None else dout.to(res_dtype)
        return dout_c @ w, dout_c.t() @ x, db, dres


def _rows(t: torch.Tensor | None, width: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, width)


def ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton FFN (exact-erf GELU) with the residual fused: x [..., d], w1 [m, d], b1 [m], w2 [d, m], b2 [d],
    residual [..., d] or None -> [..., d]. Computes in the autocast dtype when autocast is on, else in x's
    dtype; the output takes the residual's dtype when one is given."""
    cd = compute_dtype(x.device, x.dtype)
    d = x.shape[-1]
    out = FFNFunction.apply(x.to(cd).reshape(-1, d), w1.to(cd), b1, w2.to(cd), b2, _rows(residual, d))
    return out.view(*x.shape[:-1], w2.shape[0])


def linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton Linear with the residual fused: x [..., k], w [n, k], b [n] or None, residual [..., n] or None
    -> [..., n]; dtypes as :func:`ffn`."""
    cd = compute_dtype(x.device, x.dtype)
    k, n = x.shape[-1], w.shape[0]
    out = LinearFunction.apply(x.to(cd).reshape(-1, k), w.to(cd), b, _rows(residual, n))
    return out.view(*x.shape[:-1], n)
