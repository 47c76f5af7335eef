"""Per-operator benchmark of the kernels against torch eager and torch.compile (forward + backward).

    python -m memtrain.kernels.bench_ops --json runs/bench/ops.json          # CUDA: the benchmark shapes
    TRITON_INTERPRET=1 python -m memtrain.kernels.bench_ops --tiny          # CPU: a smoke run of the tool

Operators, at the mixer autoencoder's shapes (batch 32 x n_ctx 512, d 1024; bf16 compute on CUDA):

``mix``         causal mixing y = tril(W) x + b: the Triton kernels against the masked dense torch matmul
                (``kernels.reference.causal_mix``: ``torch.matmul(torch.tril(W), x) + b``), eager and compiled
``layernorm``   LayerNorm of the fp32 residual stream into the bf16 matmul input
``ffn``         residual + Linear(GELU(Linear(x))) (d -> 4d -> d)
``linear_ce``   the output head + cross-entropy: chunked (``kernels/linear_ce.py``) against plain, for V = 8000
                and V = 128256 (an LLM decoder's vocabulary); time and peak memory

Times are medians of CUDA-event-timed repeats after warm-up, on random inputs; each operator's ratios are
against its torch eager and torch.compile versions measured in the same run. The Triton kernels' autotuned
configs are listed too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from memtrain.fileio import write_json


def timed(fn: Callable[[], None], dev: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(
    f: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor, autocast: bool, dev: torch.device
) -> Callable[[], None]:
    """A closure running forward + backward of ``f(*inputs)`` (gradients reset first)."""

    def run() -> None:
        for t in inputs:
            t.grad = None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = f(*inputs)
        out.backward(grad.to(out.dtype))

    return run


COMPILE = {"on": True}


def maybe_compile(f: Callable) -> Callable | None:
    """torch.compile(f), or None when compiled baselines are off (``--no-compile``)."""
    return torch.compile(f) if COMPILE["on"] else None


def leaves(gen: torch.Generator, dev: torch.device, *shapes, scale: float = 1.0) -> list[torch.Tensor]:
    return [(torch.randn(*s, generator=gen) * scale).to(dev).requires_grad_() for s in shapes]


def _maybe(f, inputs, grad, autocast, dev):
    compiled = maybe_compile(f)
    return None if compiled is None else fwd_bwd(compiled, inputs, grad, autocast, dev)


def compare(
    name: str,
    impls: dict[str, Callable[[], None]],
    dev: torch.device,
    reps: int,
    warmup: int,
    extra: dict | None = None,
) -> dict:
    """Time every implementation (None: skipped); ratios of ``triton`` against the others."""
    ms = {k: timed(fn, dev, reps, warmup) for k, fn in impls.items() if fn is not None}
    row = {"op": name, "ms": {k: round(v, 4) for k, v in ms.items()}, **(extra or {})}
    for k, v in ms.items():
        if k != "triton" and "triton" in ms:
            row[f"speedup_vs_{k}"] = round(v / ms["triton"], 3)
    return row


def bench_mix(B, L, d, gen, dev, autocast, reps, warmup) -> dict:
    from memtrain.kernels import mix, reference

    x, w, b = leaves(gen, dev, (B, L, d), (L, L), (L,))
    with torch.no_grad():
        w.mul_(L**-0.5)
    grad = torch.randn(B, L, d, generator=gen).to(dev)

    def dense(x, w, b):  # the model's torch path: kernels.reference.causal_mix, a masked dense matmul
        return reference.causal_mix(x, w.unsqueeze(-1), b)

    def triton_mix(x, w, b):
        return mix.causal_mix(x, w.unsqueeze(-1), b)

    impls = {
        "torch": fwd_bwd(dense, [x, w, b], grad, autocast, dev),
        "torch+compile": _maybe(dense, [x, w, b], grad, autocast, dev),
        "triton": fwd_bwd(triton_mix, [x, w, b], grad, autocast, dev),
    }
    dense_flops = 3 * 2 * B * L * L * d
    row = compare(
        "mix",
        impls,
        dev,
        reps,
        warmup,
        {"shape": f"B={B} L={L} d={d}", "dense_flops": dense_flops, "causal_flops": 3 * B * L * (L + 1) * d},
    )
    row["tflops_triton_causal"] = round(row["causal_flops"] / (row["ms"]["triton"] * 1e9), 1)
    row["tflops_torch_dense"] = round(dense_flops / (row["ms"]["torch"] * 1e9), 1)
    return row


def bench_layernorm(M, d, gen, dev, autocast, reps, warmup) -> dict:
    from memtrain.kernels import layernorm

    x, w, b = leaves(gen, dev, (M, d), (d,), (d,))
    grad = torch.randn(M, d, generator=gen).to(dev).to(torch.bfloat16 if autocast else torch.float32)

    def eager(x, w, b):  # what the torch path feeds the next matmul: fp32 LayerNorm, then the autocast cast
        y = F.layer_norm(x, (d,), w, b, 1e-5)
        return y.to(torch.bfloat16) if autocast else y

    impls = {
        "torch": fwd_bwd(eager, [x, w, b], grad, autocast, dev),
        "torch+compile": _maybe(eager, [x, w, b], grad, autocast, dev),
        "triton": fwd_bwd(lambda x, w, b: layernorm.layer_norm(x, w, b, 1e-5), [x, w, b], grad, autocast, dev),
    }
    return compare("layernorm", impls, dev, reps, warmup, {"shape": f"M={M} d={d}"})


def bench_ffn(M, d, gen, dev, autocast, reps, warmup) -> dict:
    from memtrain.kernels import ffn
    from memtrain.kernels.reference import ffn_reference

    x, w1, b1, w2, b2, r = leaves(gen, dev, (M, d), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (M, d), scale=0.05)
    grad = torch.randn(M, d, generator=gen).to(dev)
    args = [x, w1, b1, w2, b2, r]
    impls = {
        "torch": fwd_bwd(ffn_reference, args, grad, autocast, dev),
        "torch+compile": _maybe(ffn_reference, args, grad, autocast, dev),
        "triton": fwd_bwd(ffn.ffn, args, grad, autocast, dev),
    }
    return compare(
        "ffn", impls, dev, reps, warmup, {"shape": f"M={M} d={d} hidden={4 * d}", "flops": 3 * 2 * 2 * M * d * 4 * d}
    )


def bench_linear_ce(N, d, V, gen, dev, autocast, reps, warmup) -> dict:
    from memtrain.kernels import linear_ce
    from memtrain.kernels.reference import linear_cross_entropy_reference

    h, w = leaves(gen, dev, (N, d), (V, d), scale=0.05)
    y = torch.randint(0, V, (N,), generator=gen).to(dev)

    def run(f):
        def go():
            h.grad = w.grad = None
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                loss, _ = f(h, w, y)
            loss.backward()

        return go

    impls = {"torch": run(linear_cross_entropy_reference), "triton": run(linear_ce.linear_cross_entropy)}
    extra = {"shape": f"N={N} d={d} V={V}"}
    if dev.type == "cuda":
        for k, fn in impls.items():
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            extra[f"peak_extra_GiB_{k}"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return compare("linear_ce", impls, dev, reps, warmup, extra)


def tuned_configs() -> dict:
    """The config each autotuned Triton kernel picked, per kernel (CUDA only)."""
    out = {}
    for modname in ("mix", "layernorm", "ffn"):
        mod = __import__(f"memtrain.kernels.{modname}", fromlist=["_"])
        for name, obj in vars(mod).items():
            tuned = getattr(obj, "_tuned", None)
            if tuned is not None and getattr(tuned, "cache", None):
                out[f"{modname}.{name}"] = {str(k): str(v) for k, v in tuned.cache.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="mix,layernorm,ffn,linear_ce")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run under the interpreter)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast also off CUDA (default: on CUDA only)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    COMPILE["on"] = not args.no_compile
    autocast = dev.type == "cuda" or args.bf16
    gen = torch.Generator().manual_seed(0)
    reps = args.reps or (3 if args.tiny else 20)
    warmup = 1 if args.tiny else 5
    B, L, d = (2, 24, 32) if args.tiny else (32, 512, 1024)
    vocabs = (50, 300) if args.tiny else (8000, 128256)
    n_ce = 64 if args.tiny else 16384
    ops = args.ops.split(",")
    jobs = []
    if "mix" in ops:
        jobs.append(("mix", lambda: bench_mix(B, L, d, gen, dev, autocast, reps, warmup)))
    if "layernorm" in ops:
        jobs.append(("layernorm", lambda: bench_layernorm(B * L, d, gen, dev, autocast, reps, warmup)))
    if "ffn" in ops:
        jobs.append(("ffn", lambda: bench_ffn(B * L, d, gen, dev, autocast, reps, warmup)))
    if "linear_ce" in ops:
        for V in vocabs:
            n = n_ce if V < 100000 else n_ce // 2
            jobs.append(("linear_ce", lambda n=n, V=V: bench_linear_ce(n, d, V, gen, dev, autocast, reps, warmup)))
    rows = []
    for name, job in jobs:
        try:
            rows.append(job())
        except Exception as err:  # noqa: BLE001  (one failing operator must not hide the others' numbers)
            rows.append({"op": name, "shape": "-", "ms": {}, "error": f"{type(err).__name__}: {str(err)[:300]}"})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    from memtrain.version import git_commit

    result = {
        "device": device,
        "torch": torch.__version__,
        "commit": git_commit() or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "precision": "bf16 autocast" if autocast else "fp32",
        "results": rows,
        "tuned": tuned_configs(),
    }
    print(
        f"# {device}, torch {torch.__version__}, commit {result['commit']}, {result['date']}, {result['precision']}, "
        "forward + backward, median ms"
    )
    print("| op | shape | torch | torch+compile | triton | triton speedup vs torch | vs compile |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms"]
        if "error" in r:
            print(f"| {r['op']} | failed: {r['error'][:200]} | | | | | |")
            continue
        print(
            f"| {r['op']} | {r['shape']} | {ms.get('torch', '-')} | {ms.get('torch+compile', '-')} | "
            f"{ms.get('triton', '-')} | {r.get('speedup_vs_torch', '-')} | {r.get('speedup_vs_torch+compile', '-')} |"
        )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
