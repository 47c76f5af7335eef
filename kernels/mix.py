"""Triton kernels for causal token mixing, forward and backward, with bias and residual fused.

The maths is :func:`memtrain.kernels.reference.causal_mix` (the pure-torch reference): for every batch row b and
head h, with k taps along the feature axis (pad p = (k-1)//2, x zero outside 0..F-1),

    y[b, t, h, f] = res[b, t, h, f] + bias[h, t] + sum_{s <= t} sum_j W[h, t, s, j] * x[b, s, h, f + j - p]

Tensors here are *token-major*: x, y, res are [B, L, H, F] (any strides for x), so a single mixing matrix is
H = 1, F = d, and the multi-head layer feeds the [B, L, H, d/H] view of its projection without a transpose.
The weight is read as wk = [H, k, L, L] (tap-major, contiguous); its upper triangle (s > t) is never read.

Kernels
-------
``_tri_mm_kernel``   Y = tri(A) X (+ bias + residual): the forward (A = W, lower) and dX = tril(W)^T dY
                     (A = W^T, upper, taps shifted the other way). Tiles entirely above (forward) or below
                     (dX) the diagonal are skipped: each row block loops only over the reduction blocks it
                     needs, the diagonal blocks masked, so a row block costs in proportion to its triangle.
``_mix_dw_kernel``   dW[h, j, t, s] = sum_b sum_f dY[b, t, h, f] X[b, s, h, f + j - p] on the lower tiles
                     only, split over the batch into fp32 partials (deterministic, no atomics); the diagonal
                     tiles of tap 0 also sum dY over (b, f): the bias gradient.
``_dw_reduce_kernel`` sums the partials of the lower triangle and writes the whole dW (zeros above the
                     diagonal), so no element of the result is left unwritten.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memtrain.kernels.common import (
    Kernel,
    Launch,
    call_op,
    compute_dtype,
    dot_precision,
    interpreting,
    sm_count,
    upcast_dots,
)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PREC)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _tri_tap(
    acc,
    a_j,
    x_base,
    a_mask,
    offs_m,
    offs_n,
    offs_r,
    r_end,
    j,
    F,
    s_am,
    s_ar,
    s_xl,
    s_xf,
    PAD: tl.constexpr,
    SHIFT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """acc += A_j[offs_m, offs_r] @ X[offs_r, offs_n + SHIFT * (j - PAD)] (zero outside 0..F-1 and for
    r >= r_end); ``a_j`` points at tap j of A."""
    a = tl.load(a_j + offs_m[:, None] * s_am + offs_r[None, :] * s_ar, mask=a_mask, other=0.0)
    cols = offs_n + SHIFT * (j - PAD)
    x_mask = (offs_r[:, None] < r_end) & (cols[None, :] >= 0) & (cols[None, :] < F)
    x = tl.load(x_base + offs_r[:, None] * s_xl + cols[None, :] * s_xf, mask=x_mask, other=0.0)
    return _dot(a, x.to(a.dtype), acc, UPCAST, DOT_PREC)


@triton.jit
def _tri_block(
    acc,
    a_base,
    x_base,
    offs_m,
    offs_n,
    r0,
    r_end,
    L,
    F,
    s_aj,
    s_am,
    s_ar,
    s_xl,
    s_xf,
    KT: tl.constexpr,
    PAD: tl.constexpr,
    SHIFT: tl.constexpr,
    UPPER: tl.constexpr,
    TRI: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """acc += A[offs_m, r0:min(r0+BLOCK_R, r_end)] @ X[same rows, shifted offs_n], over all k taps.

    Reduction indices at or past ``r_end`` (the end of the range the caller's loop covers) are masked, so a
    block that overhangs its range never adds indices another range covers (or, below the diagonal, future
    ones): the result is exact for any BLOCK_R, whether or not it divides BLOCK_M.
    TRI masks A to the triangle (r <= m lower, r >= m upper); only the diagonal blocks need it. One tap is a
    compile-time shift of zero (aligned, vectorised loads); k > 1 taps loop at run time (unrolling them
    multiplies the live registers). Taps advance the pointer (64-bit); offsets inside one tap are int32."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    a_mask = (offs_m[:, None] < L) & (offs_r[None, :] < r_end)
    if TRI:
        if UPPER:
            a_mask = a_mask & (offs_r[None, :] >= offs_m[:, None])
        else:
            a_mask = a_mask & (offs_r[None, :] <= offs_m[:, None])
    if KT == 1:
        acc = _tri_tap(
            acc,
            a_base,
            x_base,
            a_mask,
            offs_m,
            offs_n,
            offs_r,
            r_end,
            0,
            F,
            s_am,
            s_ar,
            s_xl,
            s_xf,
            PAD,
            SHIFT,
            UPCAST,
            DOT_PREC,
        )
    else:
        a_j = a_base
        for j in range(KT):
            acc = _tri_tap(
                acc,
                a_j,
                x_base,
                a_mask,
                offs_m,
                offs_n,
                offs_r,
                r_end,
                j,
                F,
                s_am,
                s_ar,
                s_xl,
                s_xf,
                PAD,
                SHIFT,
                UPCAST,
                DOT_PREC,
            )
            a_j += s_aj
    return acc


@triton.jit
def _tri_mm_kernel(
    A,
    X,
    BIAS,
    RES,
    Y,
    L,
    F,
    H,
    s_ah,
    s_aj,
    s_am,
    s_ar,
    s_xb,
    s_xl,
    s_xh,
    s_xf,
    s_bh,
    s_bl,
    s_rb,
    s_rl,
    s_rh,
    s_rf,
    s_yb,
    s_yl,
    s_yh,
    s_yf,
    KT: tl.constexpr,
    PAD: tl.constexpr,
    SHIFT: tl.constexpr,
    UPPER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One [BLOCK_M rows, BLOCK_N features] tile of Y for one (batch, head). Grid: (F blocks, B*H, L blocks),
    the row block slowest so that the heaviest row blocks (most reduction blocks) are scheduled first.
    64-bit offsets: the (batch, head) offsets are int64 scalars added to the base pointers (tensors of >= 2^31
    elements); offsets inside one (batch, head) slice stay int32 (``plan_tri`` checks that they fit)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_mb = tl.cdiv(L, BLOCK_M)
    if UPPER:
        mb = tl.program_id(2)
    else:
        mb = n_mb - 1 - tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m_lo = mb * BLOCK_M
    m_hi = tl.minimum(m_lo + BLOCK_M, L)
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_base = A + h * s_ah
    x_base = X + b * s_xb + h * s_xh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the diagonal blocks: reduction indices inside this row block (m_lo .. m_hi-1), triangle-masked
    for r0 in range(m_lo, m_hi, BLOCK_R):
        acc = _tri_block(
            acc,
            a_base,
            x_base,
            offs_m,
            offs_n,
            r0,
            m_hi,
            L,
            F,
            s_aj,
            s_am,
            s_ar,
            s_xl,
            s_xf,
            KT,
            PAD,
            SHIFT,
            UPPER,
            True,
            UPCAST,
            DOT_PREC,
            BLOCK_R,
        )
    # the full blocks: before the row block (lower) or after it (upper); never the other side
    if UPPER:
        r_lo = m_hi
        r_hi = L
    else:
        r_lo = 0
        r_hi = m_lo
    for r0 in range(r_lo, r_hi, BLOCK_R):
        acc = _tri_block(
            acc,
            a_base,
            x_base,
            offs_m,
            offs_n,
            r0,
            r_hi,
            L,
            F,
            s_aj,
            s_am,
            s_ar,
            s_xl,
            s_xf,
            KT,
            PAD,
            SHIFT,
            UPPER,
            False,
            UPCAST,
            DOT_PREC,
            BLOCK_R,
        )
    m_ok = offs_m < L
    mask = m_ok[:, None] & (offs_n[None, :] < F)
    if HAS_BIAS:
        acc += tl.load(BIAS + h * s_bh + offs_m * s_bl, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_RES:
        acc += tl.load(
            RES + b * s_rb + h * s_rh + (offs_m[:, None] * s_rl + offs_n[None, :] * s_rf), mask=mask, other=0.0
        ).to(tl.float32)
    tl.store(
        Y + b * s_yb + h * s_yh + (offs_m[:, None] * s_yl + offs_n[None, :] * s_yf),
        acc.to(Y.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _mix_dw_kernel(
    DY,
    X,
    P,
    DB,
    L,
    F,
    B,
    H,
    B_PER_SPLIT,
    s_yb,
    s_yl,
    s_yh,
    s_yf,
    s_xb,
    s_xl,
    s_xh,
    s_xf,
    s_ps,
    s_pq,
    s_pm,
    s_pn,
    s_ds,
    s_dh,
    s_dl,
    KT: tl.constexpr,
    PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Partial dW of one lower tile (t block >= s block), one (head, tap) and one batch split.
    Grid: (lower tiles, H*KT, splits). Tile p = tm (tm + 1) / 2 + tn with tn <= tm. The batch, split and
    (head, tap) offsets are int64 (tensors of >= 2^31 elements); offsets inside one slice are int32."""
    tile = tl.program_id(0)
    hj = tl.program_id(1)
    split = tl.program_id(2)
    if KT == 1:
        h = hj
        j = 0
    else:
        h = hj // KT
        j = hj % KT
    tm = ((tl.sqrt(8.0 * tile.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tm = tl.where((tm + 1) * (tm + 2) // 2 <= tile, tm + 1, tm)
    tm = tl.where(tm * (tm + 1) // 2 > tile, tm - 1, tm)
    tn = tile - tm * (tm + 1) // 2
    offs_m = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tn * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    do_db = (tm == tn) & (j == 0)
    b0 = split * B_PER_SPLIT
    dy_h = DY + h * s_yh
    x_h = X + h * s_xh
    for b in range(b0, tl.minimum(b0 + B_PER_SPLIT, B)):
        b64 = tl.cast(b, tl.int64)  # (b is a Python int under the interpreter)
        dy_base = dy_h + b64 * s_yb
        x_base = x_h + b64 * s_xb
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            dy = tl.load(
                dy_base + offs_m[:, None] * s_yl + offs_f[None, :] * s_yf,
                mask=m_ok[:, None] & (offs_f[None, :] < F),
                other=0.0,
            )
            cols = offs_f + (j - PAD)
            xt = tl.load(
                x_base + offs_n[None, :] * s_xl + cols[:, None] * s_xf,
                mask=(offs_n[None, :] < L) & (cols[:, None] >= 0) & (cols[:, None] < F),
                other=0.0,
            )
            if do_db:
                row_sum += tl.sum(dy.to(tl.float32), axis=1)
            acc = _dot(dy.to(xt.dtype), xt, acc, UPCAST, DOT_PREC)
    keep = m_ok[:, None] & (offs_n[None, :] <= offs_m[:, None])
    split64 = split.to(tl.int64)
    tl.store(
        P + split64 * s_ps + hj.to(tl.int64) * s_pq + offs_m[:, None] * s_pm + offs_n[None, :] * s_pn, acc, mask=keep
    )
    if do_db:
        tl.store(DB + split64 * s_ds + h * s_dh + offs_m * s_dl, row_sum, mask=m_ok)


@triton.jit
def _dw_reduce_kernel(P, OUT, S, L, s_ps, s_pq, s_pm, s_pn, s_oq, s_om, s_on, BLOCK: tl.constexpr):
    """OUT[q, t, s] = sum over splits of P[:, q, t, s] for s <= t, 0 above the diagonal. Reads only what
    ``_mix_dw_kernel`` wrote. Grid: (L blocks, L blocks, H*KT). The split and q offsets are 64-bit (pointer
    increments, int64 scalars); offsets inside one [L, L] slice are int32."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    q = tl.program_id(2).to(tl.int64)
    offs_m = pm * BLOCK + tl.arange(0, BLOCK)
    offs_n = pn * BLOCK + tl.arange(0, BLOCK)
    inside = (offs_m[:, None] < L) & (offs_n[None, :] < L)
    lower = inside & (offs_n[None, :] <= offs_m[:, None])
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    if pn <= pm:
        p_s = P + q * s_pq + (offs_m[:, None] * s_pm + offs_n[None, :] * s_pn)
        for _s in range(0, S):
            acc += tl.load(p_s, mask=lower, other=0.0)
            p_s += s_ps
    tl.store(
        OUT + q * s_oq + (offs_m[:, None] * s_om + offs_n[None, :] * s_on), acc.to(OUT.dtype.element_ty), mask=inside
    )


def _cfg(bm, bn, br, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br, "num_warps": warps, "num_stages": stages}


_TRI_KEY = ["L", "F", "KT", "UPPER"]
# bf16 candidates; the first is also the untuned default. ``python -m memtrain.kernels.aot_check`` (sm_90):
# 128x128 and 64x128 compile without register spills, 128x256 spills ~100 bytes, 64x256 with 4 warps ~300.
TRI_16 = Kernel(
    _tri_mm_kernel,
    [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3)],
    _TRI_KEY,
    _cfg(32, 64, 32, 4, 1),
)
TRI_32 = Kernel(
    _tri_mm_kernel,
    [_cfg(64, 64, 32, 4, 3), _cfg(128, 64, 32, 8, 3), _cfg(64, 128, 32, 4, 3)],
    _TRI_KEY,
    _cfg(32, 64, 32, 4, 1),
)
_DW_KEY = ["L", "F", "KT"]
DW_16 = Kernel(
    _mix_dw_kernel,
    [
        {"BLOCK_M": 128, "BLOCK_F": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_F": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_F": 32, "num_warps": 8, "num_stages": 4},
    ],
    _DW_KEY,
    {"BLOCK_M": 32, "BLOCK_F": 32},
)
DW_32 = Kernel(
    _mix_dw_kernel,
    [
        {"BLOCK_M": 64, "BLOCK_F": 32, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 32, "BLOCK_F": 64, "num_warps": 4, "num_stages": 3},
    ],
    _DW_KEY,
    {"BLOCK_M": 32, "BLOCK_F": 32},
)
REDUCE = Kernel(_dw_reduce_kernel, [{"BLOCK": 64, "num_warps": 4}], ["L"], {"BLOCK": 16})


def _alloc(shape, dtype, device, poison: bool) -> torch.Tensor:
    """torch.empty, or NaN-filled when ``poison`` (tests: any element a kernel should write but does not, or
    reads without having written, shows up as NaN)."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


#: indices a tile may form past the end of a dimension (masked lanes: the largest block, plus the tap shift)
_OVERHANG = 512


def check_slice_offsets(what: str, t: torch.Tensor | None, dims: tuple[int, ...]) -> None:
    """The kernels add the batch / head / split / tap offsets to their base pointers in 64 bits, and index
    inside one such slice (dimensions ``dims`` of ``t``) with int32 offsets (int64 offset tiles cost registers
    and spill in the large configs). ValueError when a slice of ``t`` spans 2^31 elements or more, where those would wrap."""
    if t is None:
        return
    extent = sum((t.shape[d] + _OVERHANG) * abs(t.stride(d)) for d in dims)
    if extent >= 2**31:
        raise ValueError(
            f"{what} {tuple(t.shape)} with strides {t.stride()}: one slice over dimensions {dims} "
            f"spans {extent} elements, past the mixing kernels' 32-bit in-slice offsets (2^31); "
            "use kernels: torch for this shape"
        )


def plan_tri(
    a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, res: torch.Tensor | None, upper: bool
) -> Launch:
    """y = tri(a) x (+ bias + res); a = wk [H, KT, L, L]; upper: use a's transpose and the reverse tap shift.

    Any BLOCK_M / BLOCK_R pair is exact (each reduction block is masked to its range), so the configs need no
    divisibility between them."""
    B, L, H, F = x.shape
    check_slice_offsets("mixing weight", a, (2, 3))
    for what, t in (("mixing input", x), ("mixing output", y), ("mixing residual", res)):
        check_slice_offsets(what, t, (1, 3))
    check_slice_offsets("mixing bias", bias, (1,))
    KT = a.shape[1]
    s_am, s_ar = (a.stride(3), a.stride(2)) if upper else (a.stride(2), a.stride(3))
    s_b = bias.stride() if bias is not None else (0, 0)
    s_r = res.stride() if res is not None else (0, 0, 0, 0)

    def grid(meta):
        return (triton.cdiv(F, meta["BLOCK_N"]), B * H, triton.cdiv(L, meta["BLOCK_M"]))

    args = (
        a,
        x,
        bias if bias is not None else a,
        res if res is not None else y,
        y,
        L,
        F,
        H,
        a.stride(0),
        a.stride(1),
        s_am,
        s_ar,
        *x.stride(),
        *s_b,
        *s_r,
        *y.stride(),
    )
    flags = dict(
        KT=KT,
        PAD=(KT - 1) // 2,
        SHIFT=-1 if upper else 1,
        UPPER=upper,
        HAS_BIAS=bias is not None,
        HAS_RES=res is not None,
        UPCAST=upcast_dots(),
        DOT_PREC=dot_precision(a.dtype),
    )
    return Launch(TRI_32 if a.dtype == torch.float32 else TRI_16, grid, args, flags)


def mix_forward(
    x: torch.Tensor,
    wk: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Causal mixing forward (no autograd).

    x [B, L, H, F] (any strides), wk [H, k, L, L] (same dtype as x), bias [H, L] or None, residual
    [B, L, H, F] or None -> y [B, L, H, F] (contiguous; dtype of x, promoted with the residual's). ``out``:
    write there instead (tests poison it); ``config``: the kernel's block sizes instead of the tuned ones.
    """
    B, L, H, F = x.shape
    if wk.dtype != x.dtype or tuple(wk.shape[::2]) != (H, L) or wk.shape[3] != L:
        raise ValueError(f"mixing weight {tuple(wk.shape)} {wk.dtype} does not fit x {tuple(x.shape)} {x.dtype}")
    dtype = torch.result_type(x, residual) if residual is not None else x.dtype
    y = out if out is not None else torch.empty((B, L, H, F), dtype=dtype, device=x.device)
    plan_tri(wk, x, y, bias, residual, upper=False).run(config)
    return y


def default_split(batch: int, n_lower_tiles: int, heads_taps: int, device: torch.device) -> int:
    """Batch splits for dW: enough programs for about two waves on the device, each split >= 1 batch row."""
    programs = max(1, n_lower_tiles * heads_taps)
    return max(1, min(batch, math.ceil(2 * sm_count(device) / programs)))


def plan_dw(
    dy: torch.Tensor, x: torch.Tensor, wk: torch.Tensor, split: int | None, poison: bool
) -> tuple[Launch, Launch, torch.Tensor, torch.Tensor]:
    """The dW + dbias partials and their reduction: (dW launch, reduce launch, dwk [H, KT, L, L] and the
    dbias partials [S, H, L] they write)."""
    B, L, H, F = x.shape
    KT = wk.shape[1]
    check_slice_offsets("mixing input", x, (1, 2, 3))  # the dW kernel's head offset is int32 too
    check_slice_offsets("mixing output gradient", dy, (1, 2, 3))
    check_slice_offsets("mixing weight", wk, (2, 3))  # the [L, L] partials and dW share its extent
    dw_kernel = DW_32 if x.dtype == torch.float32 else DW_16
    ref_block = (dw_kernel.interp_config if interpreting() else dw_kernel.configs[0])["BLOCK_M"]
    n_ref = triton.cdiv(L, ref_block)
    S = split or default_split(B, n_ref * (n_ref + 1) // 2, H * KT, x.device)
    b_per_split = triton.cdiv(B, max(1, min(S, B)))
    S = triton.cdiv(B, b_per_split)
    partial = _alloc((S, H * KT, L, L), torch.float32, x.device, poison)
    db_partial = _alloc((S, H, L), torch.float32, x.device, poison)

    def dw_grid(meta):
        n = triton.cdiv(L, meta["BLOCK_M"])
        return (n * (n + 1) // 2, H * KT, S)

    dw = Launch(
        dw_kernel,
        dw_grid,
        (
            dy,
            x,
            partial,
            db_partial,
            L,
            F,
            B,
            H,
            b_per_split,
            *dy.stride(),
            *x.stride(),
            *partial.stride(),
            *db_partial.stride(),
        ),
        dict(KT=KT, PAD=(KT - 1) // 2, UPCAST=upcast_dots(), DOT_PREC=dot_precision(x.dtype)),
    )
    dwk = _alloc((H, KT, L, L), wk.dtype, x.device, poison)
    flat = dwk.view(H * KT, L, L)

    def reduce_grid(meta):
        n = triton.cdiv(L, meta["BLOCK"])
        return (n, n, H * KT)

    reduce = Launch(REDUCE, reduce_grid, (partial, flat, S, L, *partial.stride(), *flat.stride()))
    return dw, reduce, dwk, db_partial


def mix_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    wk: torch.Tensor,
    *,
    split: int | None = None,
    tri_config: dict | None = None,
    dw_config: dict | None = None,
    reduce_config: dict | None = None,
    poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal mixing backward (no autograd): dy, x [B, L, H, F], wk [H, k, L, L] ->
    (dx [B, L, H, F] in x's dtype, dwk [H, k, L, L] in wk's dtype, lower triangle only, dbias [H, L] fp32).

    ``split``: batch splits of the dW partials (default: :func:`default_split`); ``poison``: NaN-fill every
    output and scratch buffer first (tests).
    """
    B, L, H, F = x.shape
    dy = dy.to(x.dtype)  # one pass; the fp32 gradient of the residual stream would double the tiles' bytes
    dx = _alloc((B, L, H, F), x.dtype, x.device, poison)
    plan_tri(wk, dy, dx, None, None, upper=True).run(tri_config)
    dw_plan, reduce_plan, dwk, db_partial = plan_dw(dy, x, wk, split, poison)
    dw_plan.run(dw_config)
    reduce_plan.run(reduce_config)
    return dx, dwk, db_partial.sum(0)


# ---------------------------------------------------------------------------------------------------------
# Operators (opaque to torch.compile) and autograd


@torch.library.custom_op("memtrain::causal_mix_fwd", mutates_args=())
def _mix_fwd_op(
    x: torch.Tensor, wk: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
) -> torch.Tensor:
    return mix_forward(x, wk, bias, residual)


@_mix_fwd_op.register_fake
def _(x, wk, bias, residual):
    dtype = torch.result_type(x, residual) if residual is not None else x.dtype
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("memtrain::causal_mix_bwd", mutates_args=())
def _mix_bwd_op(dy: torch.Tensor, x: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mix_backward(dy, x, wk)


@_mix_bwd_op.register_fake
def _(dy, x, wk):
    return (x.new_empty(x.shape), wk.new_empty(wk.shape), x.new_empty((wk.shape[0], wk.shape[2]), dtype=torch.float32))


class CausalMixFunction(torch.autograd.Function):
    """y = residual + bias + causal_mix(x, w) in token-major layout; see :func:`causal_mix_tm`."""

    @staticmethod
    def forward(ctx, x, w, bias, residual):
        wk = w.movedim(-1, 1).contiguous()  # [H, k, L, L]: each tap a contiguous L x L matrix
        y = call_op(_mix_fwd_op, mix_forward, x, wk, bias, residual)
        ctx.save_for_backward(x, wk)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wk = ctx.saved_tensors
        dx, dwk, db = call_op(_mix_bwd_op, mix_backward, dy, x, wk)
        db = None if ctx.bias_dtype is None else db.to(ctx.bias_dtype)
        dres = None if ctx.res_dtype is None else dy.to(ctx.res_dtype)
        return dx, dwk.movedim(1, -1), db, dres


def causal_mix_tm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal mixing with Triton, token-major: x [B, L, H, F], weight [H, L, L, k], bias [H, L] or None,
    residual [B, L, H, F] or None -> [B, L, H, F]. Differentiable in all four.

    Computes in the autocast dtype when autocast is on (as torch's matmul would), else in x's dtype; the
    output has the residual's dtype when one is given (the residual stream keeps its precision).
    """
    cd = compute_dtype(x.device, x.dtype)
    return CausalMixFunction.apply(x.to(cd), weight.to(cd), bias, residual)


def causal_mix(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton version of :func:`memtrain.kernels.reference.causal_mix` (same shapes), plus a fused residual.

    One matrix: x [B, L, d], weight [L, L, k], bias [L], residual [B, L, d] -> [B, L, d].
    H heads: x [B, H, L, d_h], weight [H, L, L, k], bias [H, L], residual [B, H, L, d_h] -> [B, H, L, d_h].
    """
    if weight.dim() == 3:
        res = None if residual is None else residual.unsqueeze(2)
        b = None if bias is None else bias.unsqueeze(0)
        return causal_mix_tm(x.unsqueeze(2), weight.unsqueeze(0), b, res).squeeze(2)
    res = None if residual is None else residual.transpose(1, 2)
    return causal_mix_tm(x.transpose(1, 2), weight, bias, res).transpose(1, 2)
