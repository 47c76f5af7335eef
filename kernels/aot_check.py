"""Compile every Triton kernel for a Hopper GPU without one, and report what the compiler says.

    python -m memtrain.kernels.aot_check [--arch 90] [--all-configs] [--json runs/aot.json]

For each kernel, dtype and compile-time variant the models use (forward / backward, k = 1 or 4 taps,
each FFN epilogue), Triton compiles the kernel ahead of time for ``sm_<arch>`` (no device needed: Triton
ships ``ptxas``), then ``ptxas -v`` reports registers, spills and shared memory. The table also says whether
the matrix products became Hopper warpgroup MMAs (``wgmma``) or older ``mma.sync`` / FMA code. A kernel
that does not compile fails here, before any GPU time is spent. The launches are planned by the same code
that runs them (``plan_*`` in each kernel module), on CPU tensors of the benchmark shapes, and specialised as
Triton's launcher would (16-byte alignment, unit strides). The first config of each kernel (the one used
when autotuning is off) is compiled; ``--all-configs`` compiles every autotuning candidate.
Run it without ``TRITON_INTERPRET`` (the interpreter does not compile).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from memtrain.fileio import write_json


def _variants() -> list[tuple[str, object]]:
    """(label, launch plan) for every kernel variant the models use, built by the same code that launches
    them, on CPU tensors of the benchmark shapes (batch 2: strides and sizes otherwise real)."""
    from memtrain.kernels import ffn, layernorm, mix

    bf, f32 = torch.bfloat16, torch.float32
    out = []

    def mixing(label, B, L, H, F, k, dt):
        x = torch.randn(B, L, H, F).to(dt)
        wk = torch.randn(H, k, L, L).to(dt)
        out.append(
            (
                f"mix forward {label}",
                mix.plan_tri(wk, x, torch.empty(B, L, H, F), torch.zeros(H, L), torch.zeros(B, L, H, F), upper=False),
            )
        )
        out.append((f"mix dX {label}", mix.plan_tri(wk, x, torch.empty_like(x), None, None, upper=True)))
        dw, reduce, _, _ = mix.plan_dw(x, x, wk, None, False)
        out.append((f"mix dW {label}", dw))
        if dt == bf and k == 1 and H == 1:
            out.append((f"mix dW reduce {label}", reduce))

    mixing("L512 d1024 k1 bf16", 2, 512, 1, 1024, 1, bf)
    mixing("L256 d512 k4 bf16", 2, 256, 1, 512, 4, bf)
    mixing("L260 4 heads x 128 bf16", 2, 260, 4, 128, 1, bf)
    mixing("L512 d1024 k1 fp32", 2, 512, 1, 1024, 1, f32)
    M, d = 1024, 1024
    for dt in (bf, f32):
        x, w1, w2 = torch.randn(M, d).to(dt), torch.randn(4 * d, d).to(dt), torch.randn(d, 4 * d).to(dt)
        h, g = torch.empty(M, 4 * d).to(dt), torch.empty(M, 4 * d).to(dt)
        b1, b2, res = torch.zeros(4 * d), torch.zeros(d), torch.zeros(M, d)
        name = "bf16" if dt == bf else "fp32"
        out.append((f"matmul bias+GELU (FFN in) {name}", ffn.plan_mm(x, w1.t(), g, h, b1, None, None, 1, False)[0]))
        out.append(
            (
                f"matmul bias+residual (FFN out) {name}",
                ffn.plan_mm(g, w2.t(), torch.empty(M, d), None, b2, res, None, 0, False)[0],
            )
        )
        out.append(
            (f"matmul dGELU+colsum {name}", ffn.plan_mm(x, w2, torch.empty_like(h), None, None, None, h, 2, True)[0])
        )
    for D in (512, 1024):
        x, w = torch.randn(M, D), torch.ones(D)
        mean, rstd = torch.empty(M), torch.empty(M)
        out.append(
            (f"layernorm forward d={D}", layernorm.plan_ln_forward(x, w, w, 1e-5, torch.empty(M, D).to(bf), mean, rstd))
        )
        out.append(
            (
                f"layernorm backward d={D}",
                layernorm.plan_ln_backward(torch.randn(M, D).to(bf), x, w, mean, rstd, torch.empty_like(x))[0],
            )
        )
    return out


def compile_plan(plan, config: dict, arch: int) -> dict:
    """Compile ``plan`` with ``config`` for sm_<arch> through Triton's own argument specialisation (the
    alignment and the unit strides its launcher would see), without a device. Uses Triton internals
    (``create_function_from_signature``, ``JITFunction._pack_args``) of Triton 3.6 / 3.7."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = plan.kernel.jitted
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**plan.flags, **config, "debug": False}
    bound_args, specialization, options = binder(*plan.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    return {
        "compile_s": round(seconds, 1),
        "shared_bytes": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        **_ptxas_report(ptx, arch),
    }


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack frame from ``ptxas -v`` (the ptxas that Triton ships)."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spill.group(1)) if spill else None,
        "spill_load_bytes": int(spill.group(2)) if spill else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--all-configs", action="store_true", help="every autotuning candidate, not just the first")
    ap.add_argument("--only", help="comma-separated substrings: compile only the variants whose label has one")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    only = [w for w in (args.only or "").split(",") if w]
    from memtrain.kernels.common import interpreting

    if interpreting():
        raise SystemExit("aot_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    import triton

    rows, failed = [], 0
    print(f"# Triton {triton.__version__}, sm_{args.arch}: ahead-of-time compile of every kernel variant")
    print("| kernel | config | regs | spills (st/ld B) | shared KiB | wgmma | mma.sync | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, plan in _variants():
        if only and not any(w in label for w in only):
            continue
        for cfg in plan.kernel.configs if args.all_configs else plan.kernel.configs[:1]:
            cfg_text = " ".join(f"{k}={v}" for k, v in cfg.items())
            try:
                r = compile_plan(plan, cfg, args.arch)
            except Exception as err:  # noqa: BLE001  (report every failing variant, then fail)
                failed += 1
                rows.append({"kernel": label, "config": cfg, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                print(f"| {label} | {cfg_text} | FAILED: {type(err).__name__}: {str(err)[:150]} | | | | | |")
                continue
            rows.append({"kernel": label, "config": cfg, **r})
            print(
                f"| {label} | {cfg_text} | {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | "
                f"{r['shared_bytes'] / 1024:.0f} | {r['wgmma']} | {r['mma_sync']} | {r['compile_s']} |",
                flush=True,
            )
    if args.json:
        write_json(args.json, {"triton": triton.__version__, "arch": args.arch, "rows": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
