"""Triton kernels against their pure-torch references: mixing (forward, dX, dW, bias; k taps; heads), LayerNorm,
the fused-epilogue matmuls of the FFN, and the chunked linear + cross-entropy.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before anything
imports Triton), on small shapes; with CUDA the same tests run on the GPU (``tools/gpu_check.sh``), and the
tests marked ``cuda`` add larger random shapes. Every test draws fresh random inputs (the seed is in the
failure message), poisons outputs and scratch buffers with NaN before the kernels write them, and compares
against a float64 reference: relative error (norm-wise) <= 1e-5 in fp32 and <= 1e-2 in bf16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of a Triton kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from memtrain.kernels import dispatch  # noqa: E402
from memtrain.kernels import reference as ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed every run (failures report it: ``gen.initial_seed()``)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def rand(gen: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """||out - expected|| / ||expected|| in float64; NaN anywhere in out gives inf."""
    out, expected = out.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check(name: str, out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, gen) -> None:
    assert out.shape == expected.shape, f"{name}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    err = rel_err(out, expected)
    assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype}, seed {gen.initial_seed()})"


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def check_autograd(what: str, fast, reference, leaves: list, names: tuple, dy: torch.Tensor, gen) -> None:
    """``fast(*leaves)`` (fp32) against ``reference`` on float64 copies: the output and the gradient of every
    leaf that is not None (``names`` name them), for the upstream gradient ``dy``."""
    got = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    out = fast(*got)
    out.backward(dy)
    want = [t.double().requires_grad_() if t is not None else None for t in leaves]
    expected = reference(*want)
    expected.backward(dy.double())
    check(f"{what} output", out, expected, torch.float32, gen)
    for name, g, e in zip(names, got, want):
        if g is not None:
            check(f"{what} {name}", g.grad, e.grad, torch.float32, gen)  # the reference's dW is 0 above the diagonal


# ---------------------------------------------------------------------------------------------------------
# Causal mixing: the low-level kernels (token-major [B, L, H, F], weight [H, k, L, L])


def mix_reference(x, w, bias, residual):
    """float64 reference of the token-major op via models.mixing.causal_mix: x [B, L, H, F], w [H, L, L, k]."""
    y = ref.causal_mix(x.double().transpose(1, 2), w.double(), None if bias is None else bias.double())
    y = y.transpose(1, 2)
    return y if residual is None else y + residual.double()


MIX_SHAPES = [  # (B, L, H, F, k): ragged L and F (not multiples of any block), one to several tiles
    (2, 37, 1, 20, 1),
    (2, 70, 1, 40, 1),
    (3, 33, 2, 12, 3),
    (2, 45, 1, 24, 4),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MIX_SHAPES)
def test_mix_forward_matches_reference(shape, dtype, gen):
    from memtrain.kernels.mix import mix_forward

    B, L, H, F, k = shape
    x, w = rand(gen, B, L, H, F, dtype=dtype), rand(gen, H, L, L, k, dtype=dtype, scale=L**-0.5)
    bias, res = rand(gen, H, L), rand(gen, B, L, H, F)
    wk = w.movedim(-1, 1).contiguous()
    for b, r in ((bias, res), (None, None)):
        out_dtype = torch.float32 if r is not None else dtype
        y = mix_forward(x, wk, b, r, out=poisoned((B, L, H, F), out_dtype))
        check(f"mix forward bias={b is not None}", y, mix_reference(x, w, b, r), dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MIX_SHAPES)
def test_mix_backward_matches_autograd(shape, dtype, gen):
    from memtrain.kernels.mix import mix_backward

    B, L, H, F, k = shape
    x, w, dy = rand(gen, B, L, H, F, dtype=dtype), rand(gen, H, L, L, k, dtype=dtype), rand(gen, B, L, H, F)
    xd, wd, bd = (
        x.double().requires_grad_(),
        w.double().requires_grad_(),
        torch.zeros(H, L, dtype=torch.float64, device=DEVICE, requires_grad=True),
    )
    mix_reference(xd, wd, bd, None).backward(dy.double())
    for split in (1, B):
        dx, dwk, db = mix_backward(dy, x, w.movedim(-1, 1).contiguous(), split=split, poison=True)
        check(f"dx split={split}", dx, xd.grad, dtype, gen)
        check(f"dW split={split}", dwk.movedim(1, -1), wd.grad, dtype, gen)
        check(f"dbias split={split}", db, bd.grad, dtype, gen)
        upper = torch.ones(L, L, dtype=torch.bool, device=DEVICE).triu(1)
        assert (dwk[..., upper] == 0).all(), "dW above the diagonal must be exactly zero"


def test_mix_explicit_block_configs_skip_and_split(gen):
    """Several row blocks per matrix with BLOCK_R < BLOCK_M, several dW tiles and batch splits."""
    from memtrain.kernels.mix import mix_backward, mix_forward

    B, L, H, F, k = 3, 70, 1, 40, 1
    x, w, dy = rand(gen, B, L, H, F), rand(gen, H, L, L, k), rand(gen, B, L, H, F)
    bias = rand(gen, H, L)
    wk = w.movedim(-1, 1).contiguous()
    tri = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_R": 16}
    y = mix_forward(x, wk, bias, None, out=poisoned((B, L, H, F), torch.float32), config=tri)
    check("forward, 3 row blocks", y, mix_reference(x, w, bias, None), torch.float32, gen)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    mix_reference(xd, wd, None, None).backward(dy.double())
    dx, dwk, db = mix_backward(
        dy,
        x,
        wk,
        split=2,
        tri_config=tri,
        dw_config={"BLOCK_M": 16, "BLOCK_F": 16},
        reduce_config={"BLOCK": 32},
        poison=True,
    )
    check("dx, 3 row blocks", dx, xd.grad, torch.float32, gen)
    check("dW, 15 lower tiles x 2 splits", dwk.movedim(1, -1), wd.grad, torch.float32, gen)
    check("dbias", db, dy.double().sum((0, 3)).T, torch.float32, gen)


def test_mix_never_reads_the_upper_triangle(gen):
    """NaN above the diagonal of the weight must not reach the output or the gradients."""
    from memtrain.kernels.mix import mix_backward, mix_forward

    B, L, H, F, k = 2, 37, 1, 20, 3
    x, w, dy = rand(gen, B, L, H, F), rand(gen, H, L, L, k), rand(gen, B, L, H, F)
    upper = torch.ones(L, L, dtype=torch.bool, device=DEVICE).triu(1)
    w_nan = w.clone()
    w_nan[:, upper] = float("nan")
    wk = w_nan.movedim(-1, 1).contiguous()
    check("forward", mix_forward(x, wk), mix_reference(x, w, None, None), torch.float32, gen)
    xd = x.double().requires_grad_()
    mix_reference(xd, w, None, None).backward(dy.double())
    check("dx", mix_backward(dy, x, wk, poison=True)[0], xd.grad, torch.float32, gen)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("block_m,block_r", [(16, 32), (32, 64)])
def test_mix_is_causal_when_block_r_does_not_divide_block_m(block_m, block_r, k, gen):
    """BLOCK_R > BLOCK_M (BLOCK_R does not divide BLOCK_M): the reduction blocks before a row block overhang
    into it; they must not add the row block's own (future) tokens, nor count the diagonal twice (forward
    and dX). A future token changed must leave every earlier output unchanged."""
    from memtrain.kernels.mix import mix_backward, mix_forward

    B, L, H, F = 2, 40, 1, 16
    x, w, dy = rand(gen, B, L, H, F), rand(gen, H, L, L, k), rand(gen, B, L, H, F)
    bias = rand(gen, H, L)
    wk = w.movedim(-1, 1).contiguous()
    tri = {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_R": block_r}
    y = mix_forward(x, wk, bias, None, out=poisoned((B, L, H, F), torch.float32), config=tri)
    check(f"forward BLOCK_M={block_m} BLOCK_R={block_r}", y, mix_reference(x, w, bias, None), torch.float32, gen)
    x2 = x.clone()
    x2[:, 30:] += 100.0  # the future of positions 0..29
    y2 = mix_forward(x2, wk, bias, None, config=tri)
    assert torch.allclose(y2[:, :30], y[:, :30], rtol=1e-5, atol=1e-5), "future tokens leak into the past"
    xd = x.double().requires_grad_()
    mix_reference(xd, w, None, None).backward(dy.double())
    dx = mix_backward(dy, x, wk, tri_config=tri, poison=True)[0]
    check(f"dx BLOCK_M={block_m} BLOCK_R={block_r}", dx, xd.grad, torch.float32, gen)


def _big_storage(n: int) -> torch.Tensor:
    """A bf16 tensor of n elements: virtual memory on CPU (only the pages written are ever touched)."""
    try:
        return torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"cannot reserve {2 * n / 2**30:.1f} GiB of address space here ({err})")


@pytest.fixture
def int32_overflow_traps(monkeypatch):
    """Under the interpreter: Triton's integer-overflow sanitizer on (``debug``), so any int32 offset product
    or sum that wraps raises instead of reading the wrong address. On CUDA a wrapped offset shows up as wrong
    values (or an illegal address)."""
    from memtrain.kernels.common import interpreting

    if interpreting():
        import dataclasses

        from triton.runtime import interpreter

        opts = interpreter.interpreter_builder.options
        monkeypatch.setattr(interpreter.interpreter_builder, "options", dataclasses.replace(opts, debug=True))


BIG = 2**30  # a row / batch stride: index 2 x BIG = 2^31 elements, past int32


def test_kernels_address_tensors_of_2_31_elements(int32_overflow_traps, gen):
    """Views whose element offsets pass 2^31 (a stride of 2^30 elements, index 2) into one bf16 storage of
    2^31 + a little elements: LayerNorm forward/backward, mixing forward, dX, dW and its reduction, and the
    three matmul epilogues read and write the right elements (64-bit offsets), equal to the references."""
    from memtrain.kernels import ffn, layernorm, mix

    bf = torch.bfloat16
    big = _big_storage(2 * BIG + 65536)

    def view(shape, strides, offset, values):
        v = big.as_strided(shape, strides, offset)
        v.copy_(values)
        return v

    # LayerNorm: 3 rows, row stride 2^30
    D = 16
    x = view((3, D), (BIG, 1), 0, rand(gen, 3, D).to(bf))
    dy = view((3, D), (BIG, 1), 32, rand(gen, 3, D).to(bf))
    w, b = rand(gen, D), rand(gen, D)
    y, mean, rstd = layernorm.layer_norm_forward(x, w, b, 1e-5, torch.float32)
    xd, wd, bd = x.double().requires_grad_(), w.double().requires_grad_(), b.double().requires_grad_()
    ref_y = torch.nn.functional.layer_norm(xd, (D,), wd, bd, 1e-5)
    check("layernorm forward", y, ref_y, bf, gen)
    ref_y.backward(dy.double())
    dx, dw, db = layernorm.layer_norm_backward(dy, x, w, mean, rstd)
    check("layernorm dx", dx, xd.grad, bf, gen)
    check("layernorm dweight", dw, wd.grad, bf, gen)

    # mixing: batch stride 2^30 (b = 2 starts at element 2^31), k = 3 taps
    B, L, H, F, k = 3, 20, 1, 16, 3
    mx = view((B, L, H, F), (BIG, F, F, 1), 64, rand(gen, B, L, H, F).to(bf))
    mdy = view((B, L, H, F), (BIG, F, F, 1), 64 + L * F, rand(gen, B, L, H, F).to(bf))
    mw = rand(gen, H, L, L, k).to(bf)
    wk = mw.movedim(-1, 1).contiguous()
    check("mix forward", mix.mix_forward(mx, wk), mix_reference(mx, mw, None, None), bf, gen)
    xd, wd = mx.double().requires_grad_(), mw.double().requires_grad_()
    mix_reference(xd, wd, None, None).backward(mdy.double())
    mdx, mdwk, mdb = mix.mix_backward(mdy, mx, wk, split=3, poison=True)
    check("mix dx", mdx, xd.grad, bf, gen)
    check("mix dW", mdwk.movedim(1, -1), wd.grad, bf, gen)
    # the dW reduction over partials [S, Q, L, L] whose split stride is 2^30
    S, Q = 3, 2
    part = big.as_strided((S, Q, L, L), (BIG, L * L, L, 1), 8192)
    part.copy_(rand(gen, S, Q, L, L).to(bf))
    out = poisoned((Q, L, L), torch.float32)
    block = mix.REDUCE.interp_config["BLOCK"]
    mix.REDUCE.launch(
        lambda meta: (triton_cdiv(L, block), triton_cdiv(L, block), Q),
        part,
        out,
        S,
        L,
        *part.stride(),
        *out.stride(),
        config={"BLOCK": block},
    )
    check("mix dW reduce", out, part.double().sum(0).tril(), bf, gen)

    # matmuls: rows of a / residual / aux / out at stride 2^30
    M, K, N = 3, 32, 16
    a = view((M, K), (BIG, 1), 16384, rand(gen, M, K).to(bf))
    bm = rand(gen, K, N).to(bf)
    bias = rand(gen, N)
    res = view((M, N), (BIG, 1), 16384 + K, rand(gen, M, N).to(bf))
    aux = view((M, N), (BIG, 1), 16384 + K + N, rand(gen, M, N).to(bf))
    c_out = big.as_strided((M, N), (BIG, 1), 16384 + K + 2 * N)
    pre = a.double() @ bm.double() + bias.double()
    c, c2, _ = ffn.matmul_epilogue(a, bm, bias=bias, epilogue="gelu")
    check("matmul gelu", c, torch.nn.functional.gelu(pre), bf, gen)
    check("matmul gelu pre-activation", c2, pre, bf, gen)
    ffn.matmul_epilogue(a, bm, bias=bias, residual=res, out=c_out)
    check("matmul bias+residual (strided out)", c_out, pre + res.double(), bf, gen)
    c, _, cs = ffn.matmul_epilogue(a, bm, aux=aux, epilogue="dgelu", colsum=True)
    h = aux.double().requires_grad_()
    torch.nn.functional.gelu(h).backward(torch.ones_like(h))
    expect = (a.double() @ bm.double()) * h.grad
    check("matmul dgelu", c, expect, bf, gen)
    check("matmul dgelu colsum", cs, expect.sum(0), bf, gen)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("heads,k", [(0, 1), (0, 3), (2, 1), (3, 2)])
def test_dispatch_causal_mix_autograd_matches_reference(heads, k, gen):
    """The differentiable op in the reference layout ([B, L, d] or [B, H, L, d_h]) with bias and residual."""
    B, L, d = 2, 29, 24
    shape_x = (B, L, d) if heads == 0 else (B, heads, L, d // heads)
    shape_w = (L, L, k) if heads == 0 else (heads, L, L, k)
    leaves = [rand(gen, *shape_x), rand(gen, *shape_w), rand(gen, *shape_w[:-2]), rand(gen, *shape_x)]
    check_autograd(
        "mixing",
        lambda *t: dispatch.causal_mix(*t, impl="triton"),
        lambda x, w, b, r: ref.causal_mix(x, w, b) + r,
        leaves,
        ("dx", "dW", "dbias", "dresidual"),
        rand(gen, *shape_x),
        gen,
    )


def test_dispatch_causal_mix_under_autocast_bf16(gen):
    """Under bf16 autocast the op computes in bf16 like torch's matmul, and keeps the fp32 residual's dtype."""
    B, L, d = 2, 21, 16
    x, w, b, r = rand(gen, B, L, d), rand(gen, L, L, 1, scale=L**-0.5), rand(gen, L), rand(gen, B, L, d)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = dispatch.causal_mix(x, w, b, r, impl="triton")
    assert y.dtype == torch.float32
    check("autocast output", y, ref.causal_mix(x.double(), w.double(), b.double()) + r.double(), torch.bfloat16, gen)


# ---------------------------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(37, 40), (50, 100), (9, 16)])
def test_layer_norm_forward_backward(rows, d, dtype, gen):
    from memtrain.kernels.layernorm import layer_norm_backward, layer_norm_forward

    x, w, b, dy = rand(gen, rows, d, scale=3.0) + 1.5, rand(gen, d), rand(gen, d), rand(gen, rows, d)
    y, mean, rstd = layer_norm_forward(x, w, b, 1e-5, dtype, out=poisoned((rows, d), dtype))
    xe, we, be = (t.double().requires_grad_() for t in (x, w, b))
    expected = ref.layer_norm_reference(xe, we, be, 1e-5)
    check("LayerNorm forward", y, expected, dtype, gen)
    dyq = dy.to(dtype)  # the upstream gradient arrives in the compute dtype; the reference gets the same values
    expected.backward(dyq.double())
    dx, dw, db = layer_norm_backward(dyq, x, w, mean, rstd, out=poisoned((rows, d), torch.float32))
    for name, g, e in (("dx", dx, xe.grad), ("dweight", dw, we.grad), ("dbias", db, be.grad)):
        check(f"LayerNorm {name}", g, e, torch.float32, gen)


def test_dispatch_layer_norm_autograd(gen):
    check_autograd(
        "LayerNorm",
        lambda x, w, b: dispatch.layer_norm(x, w, b, 1e-5, impl="triton"),
        lambda x, w, b: ref.layer_norm_reference(x, w, b, 1e-5),
        [rand(gen, 3, 11, 48), rand(gen, 48), rand(gen, 48)],
        ("dx", "dweight", "dbias"),
        rand(gen, 3, 11, 48),
        gen,
    )


# ---------------------------------------------------------------------------------------------------------
# Matmul with fused epilogues, FFN and Linear


def gelu64(h):
    return torch.nn.functional.gelu(h.double())


def gelu_grad64(h):
    h = h.double()
    return 0.5 * (1 + torch.erf(h / 2**0.5)) + h * torch.exp(-0.5 * h * h) / (2 * torch.pi) ** 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(37, 70, 24), (100, 40, 72)])
def test_matmul_epilogues(M, N, K, dtype, gen):
    from memtrain.kernels.ffn import matmul_epilogue

    a, w = rand(gen, M, K, dtype=dtype), rand(gen, N, K, dtype=dtype, scale=K**-0.5)
    bias, res, _aux = rand(gen, N), rand(gen, M, N), rand(gen, M, N, dtype=dtype)
    b = w.t()  # a transposed (strided) view, as the FFN passes its weights
    lin = a.double() @ b.double()
    c, c2, cs = matmul_epilogue(
        a, b, bias=bias, residual=res, out_dtype=torch.float32, out=poisoned((M, N), torch.float32)
    )
    assert c2 is None and cs is None
    check("bias + residual", c, lin + bias.double() + res.double(), dtype, gen)
    c, c2, _ = matmul_epilogue(a, b, bias=bias, epilogue="gelu", out=poisoned((M, N), dtype))
    check("GELU pre-activation", c2, lin + bias.double(), dtype, gen)
    check("GELU", c, gelu64(lin + bias.double()), dtype, gen)
    g, haux = rand(gen, M, N), rand(gen, M, K, dtype=dtype)  # backward into fc1: [M, N] @ w [N, K], x GELU'(h)
    c, _, cs = matmul_epilogue(g, w, aux=haux, epilogue="dgelu", colsum=True, out=poisoned((M, K), dtype))
    expected = (g.to(dtype).double() @ w.double()) * gelu_grad64(haux)
    check("dGELU", c, expected, dtype, gen)
    check("dGELU column sums", cs, expected.sum(0), dtype, gen)


@pytest.mark.parametrize("with_residual", [True, False])
def test_dispatch_ffn_and_linear_autograd(with_residual, gen):
    M, d, m = 29, 24, 96
    leaves = [
        rand(gen, 2, M, d),
        rand(gen, m, d, scale=d**-0.5),
        rand(gen, m),
        rand(gen, d, m, scale=m**-0.5),
        rand(gen, d),
        rand(gen, 2, M, d),
    ]
    if not with_residual:
        leaves[-1] = None
    dy = rand(gen, 2, M, d)
    check_autograd(
        "FFN",
        lambda *t: dispatch.ffn(*t, impl="triton"),
        ref.ffn_reference,
        leaves,
        ("dx", "dw1", "db1", "dw2", "db2", "dresidual"),
        dy,
        gen,
    )
    lin = [leaves[0], leaves[3].t().contiguous()[:d], leaves[4][:d].clone(), leaves[5]]  # Linear(d, d)
    check_autograd(
        "Linear",
        lambda *t: dispatch.linear(*t, impl="triton"),
        ref.linear_reference,
        lin,
        ("dx", "dw", "db", "dresidual"),
        dy,
        gen,
    )


# ---------------------------------------------------------------------------------------------------------
# Chunked linear + cross-entropy (torch; runs the same on CPU and CUDA)


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_linear_cross_entropy_equals_plain_head(chunk_rows, gen):
    from memtrain.kernels.linear_ce import linear_cross_entropy

    N, d, V = 50, 16, 37
    h, w = rand(gen, N, d), rand(gen, V, d)
    y = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    got = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    loss, pred = linear_cross_entropy(*got, y, chunk_rows=chunk_rows)
    (loss * 3.0).backward()
    want = [h.double().requires_grad_(), w.double().requires_grad_()]
    ref_loss, ref_pred = ref.linear_cross_entropy_reference(*want, y)
    (ref_loss * 3.0).backward()
    check("loss", loss, ref_loss, torch.float32, gen)
    assert torch.equal(pred, ref_pred)
    check("dh", got[0].grad, want[0].grad, torch.float32, gen)
    check("dW", got[1].grad, want[1].grad, torch.float32, gen)


def test_linear_cross_entropy_computes_no_gradient_without_grad(gen, monkeypatch):
    from memtrain.kernels import linear_ce

    h, w = rand(gen, 9, 8).requires_grad_(), rand(gen, 11, 8).requires_grad_()
    y = torch.randint(0, 11, (9,), generator=gen).to(DEVICE)
    calls = []
    real_exp = torch.exp_
    monkeypatch.setattr(torch, "exp_", lambda t: calls.append(1) or real_exp(t))
    with torch.no_grad():
        loss, _ = linear_ce.linear_cross_entropy(h, w, y)
    assert calls == [] and not loss.requires_grad
    linear_ce.linear_cross_entropy(h, w, y)
    assert calls, "with grad enabled the forward computes the gradient"


# ---------------------------------------------------------------------------------------------------------
# Compilation for Hopper without a GPU


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """The AE-shape mixing kernels, the dGELU matmul and the LayerNorm backward compile for sm_90 (Triton's
    own compiler and ptxas, no device), use warpgroup MMAs where they multiply, and spill no registers.
    A separate process: this one runs Triton's interpreter, which compiles nothing."""
    import json
    import subprocess
    import sys

    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memtrain.kernels.aot_check",
            "--only",
            "L512 d1024 k1 bf16,dGELU+colsum bf16,layernorm backward d=1024",
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 6, sorted(rows)
    for name, r in rows.items():
        assert r["spill_store_bytes"] == 0 and r["registers"] <= 255, (name, r)
        if "reduce" not in name and "layernorm" not in name:
            assert r["wgmma"] > 0, f"{name}: no warpgroup MMA in the PTX"


# ---------------------------------------------------------------------------------------------------------
# Larger random shapes, bf16 and fp32: CUDA only (run by tools/gpu_check.sh)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trial", range(4))
@pytest.mark.gpu
def test_cuda_mix_random_shapes(trial, dtype, gen):
    from memtrain.kernels.mix import mix_backward, mix_forward

    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    B, L, H, k = pick(1, 8), pick(17, 600), (1, 1, 2, 4)[pick(0, 3)], (1, 1, 2, 4)[pick(0, 3)]
    F = pick(8, 160) if H > 1 else pick(16, 1100)
    x, w = rand(gen, B, L, H, F, dtype=dtype), rand(gen, H, L, L, k, dtype=dtype, scale=L**-0.5)
    bias, res, dy = rand(gen, H, L), rand(gen, B, L, H, F), rand(gen, B, L, H, F)
    wk = w.movedim(-1, 1).contiguous()
    where = f"B={B} L={L} H={H} F={F} k={k}"
    y = mix_forward(x, wk, bias, res, out=poisoned((B, L, H, F), torch.float32))
    check(f"forward {where}", y, mix_reference(x, w, bias, res), dtype, gen)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    mix_reference(xd, wd, None, None).backward(dy.double())
    dx, dwk, db = mix_backward(dy, x, wk, poison=True)
    check(f"dx {where}", dx, xd.grad, dtype, gen)
    check(f"dW {where}", dwk.movedim(1, -1), wd.grad, dtype, gen)
    check(f"dbias {where}", db, dy.double().sum((0, 3)).T, dtype, gen)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.gpu
def test_cuda_benchmark_shapes(dtype, gen):
    """The shapes of the throughput benchmarks: mixer AE (L 512, d 1024) and memory decoder (L 260, d 512)."""
    from memtrain.kernels.ffn import matmul_epilogue
    from memtrain.kernels.layernorm import layer_norm_forward
    from memtrain.kernels.mix import mix_forward

    for B, L, F in ((8, 512, 1024), (16, 260, 512)):
        x, w = rand(gen, B, L, 1, F, dtype=dtype), rand(gen, 1, L, L, 1, dtype=dtype, scale=L**-0.5)
        y = mix_forward(x, w.movedim(-1, 1).contiguous(), out=poisoned((B, L, 1, F), dtype))
        check(f"mix L={L} F={F}", y, mix_reference(x, w, None, None), dtype, gen)
        a, wt = rand(gen, B * L, F, dtype=dtype), rand(gen, 4 * F, F, dtype=dtype, scale=F**-0.5)
        c, c2, _ = matmul_epilogue(a, wt.t(), epilogue="gelu", out=poisoned((B * L, 4 * F), dtype))
        check(f"fc1 M={B * L}", c, gelu64(a.double() @ wt.double().t()), dtype, gen)
        xn = rand(gen, B * L, F)
        yn, _, _ = layer_norm_forward(xn, torch.ones(F, device=DEVICE), torch.zeros(F, device=DEVICE), 1e-5, dtype)
        check(f"LayerNorm d={F}", yn, ref.layer_norm_reference(xn.double(), None, None, 1e-5), dtype, gen)
