"""``memtrain bench``: training throughput of one config on this device, Triton kernels against plain torch.

    memtrain bench yaml/paper/mixer_autoencoder_d1024_c512.yaml --steps 10 --json runs/bench/ae.json
    memtrain bench paper/memory_mixer_e512_d512 --variants torch,triton      # names resolve under yaml/

Each *variant* trains the same model (same seed, same random token rows, the config's first-stage objectives,
AdamW step included) for ``--warmup`` untimed and ``--steps`` timed steps:

``torch``            ``model.kernels: torch``, eager (the plain-torch path: the baseline of every ratio)
``torch+compile``    the same under ``torch.compile``
``triton``           ``model.kernels: triton`` (fused kernels; chunked linear + CE head)
``triton+compile``   the same, with torch.compile around the kernels

It prints tokens/s, the model's FLOPs per token (:func:`memtrain.flops.model_flops`, analytic: every matmul, plus the causal
token mixing and attention counted on the lower triangle only, s <= t; x3 for forward + backward, x1 for a
frozen encoder; the same count as ``memtrain sweep collect``), model TFLOP/s, **MFU** = model FLOP/s / this
device's dense datasheet peak for the matmul precision (:data:`memtrain.flops.PEAK_TFLOPS`, or ``--peak-tflops``; none on
CPU unless given), **vs measured matmul** = model FLOP/s / the matmul rate *measured in the same run* (an
n x n x n matmul in the run's precision, random operands, median of timed repeats), peak memory, and each
variant's ratio to ``torch``. docs/performance.md defines every number.
``--json`` writes everything, with device, versions, commit, date and the command line.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memtrain.devices import device_name, pick_device, resolve_precision
from memtrain.engine.timing import run_variant
from memtrain.fileio import write_json
from memtrain.flops import device_peak_tflops, matmul_precision, mfu, run_flops, scored_positions
from memtrain.tables import markdown_table
from memtrain.version import git_commit

VARIANTS = ("torch", "torch+compile", "triton", "triton+compile")


# ---------------------------------------------------------------------------------------------------------
# The matmul rate


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Measured matmul rate in TFLOP/s: median over ``reps`` timed n x n x n products of random operands
    (three input pairs rotated, so repeats do not just hit the cache), after warm-up."""
    gen = torch.Generator(device=dev).manual_seed(0)
    pairs = [
        (torch.randn(n, n, device=dev, generator=gen).to(dtype), torch.randn(n, n, device=dev, generator=gen).to(dtype))
        for _ in range(3)
    ]
    out = torch.empty(n, n, device=dev, dtype=dtype)
    for a, b in pairs:
        torch.matmul(a, b, out=out)
    times = []
    for i in range(reps):
        a, b = pairs[i % 3]
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


# ---------------------------------------------------------------------------------------------------------
# Configs


def resolve_config(name: str) -> Path:
    """A YAML path, or the name of a shipped config (``paper/mixer_autoencoder_d1024_c512``)."""
    from memtrain.errors import UserError
    from memtrain.shipped import resolve_config as shipped

    path = shipped(name)
    if path.is_file():
        return path
    raise UserError(f"bench: no config {name!r} (give a YAML file, or a shipped name: memtrain configs list)")


# ---------------------------------------------------------------------------------------------------------
# The command


def default_variants(dev: torch.device) -> list[str]:
    from memtrain.kernels.common import interpreting, triton_importable  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)

    if dev.type == "cuda":
        return list(VARIANTS) if triton_importable() else ["torch", "torch+compile"]
    return ["torch", "triton"] if interpreting() and triton_importable() else ["torch"]


def bench(
    config: str,
    overrides: list[str],
    variants: list[str] | None,
    steps: int,
    warmup: int,
    batch_size: int | None,
    precision: str | None,
    vocab: int,
    device: str,
    peak_size: int | None,
    profile_rows: int = 0,
    on_progress: Callable[[dict], None] | None = None,
    peak_tflops: float | None = None,
) -> dict:
    """Run the benchmark; returns the JSON-ready result (see the module docstring). ``on_progress`` gets the
    result so far after each variant (``"complete": False`` until the last), so a run that is stopped early
    still leaves the variants it measured. ``peak_tflops`` overrides the datasheet peak of the MFU."""
    from memtrain.config import load_config
    from memtrain.errors import UserError

    path = resolve_config(config)
    cfg = load_config(path, overrides)
    dev = pick_device(device)
    variants = variants or default_variants(dev)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"bench: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    prec = resolve_precision(precision or cfg.train.precision, dev)
    batch = batch_size or cfg.data.batch_size
    vocab = cfg.model.vocab_size or vocab
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, vocab, (batch, cfg.model.seq_len), generator=gen).to(dev)

    scored, n_params = scored_positions(cfg, ids, vocab)
    try:
        flops = run_flops(cfg, vocab, batch, scored=scored)
    except ValueError as err:
        raise UserError(f"bench: {err}") from None
    name = device_name(dev)
    column = matmul_precision(prec, dev.type)
    if peak_tflops:
        datasheet, peak_source = peak_tflops, "--peak-tflops"
    else:
        found = device_peak_tflops(name, column) if dev.type == "cuda" else None
        datasheet, peak_source = (found[0], f"datasheet, {found[1]} dense") if found else (None, None)
    peak_dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    n = peak_size or (8192 if dev.type == "cuda" else 1024)
    peak = matmul_peak(dev, peak_dtype, n)

    header = {
        "device": name,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": git_commit() or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": str(path),
        "overrides": overrides,
        "kind": cfg.model.kind,
        "precision": prec,
        "batch_size": batch,
        "seq_len": cfg.model.seq_len,
        "vocab": vocab,
        "steps": steps,
        "warmup": warmup,
        "scored_positions": scored,
        "params_M": round(n_params / 1e6, 2),
        "flops_per_token": round(flops["per_token"]),
        "flops_split": {k: v for k, v in flops.items() if k not in ("total", "per_token")},
        "matmul_peak_TFLOPs": float(f"{peak:.4g}"),
        "matmul_peak": f"{n}^3 {str(peak_dtype).split('.')[-1]}",
        "matmul_precision": column,
        "peak_TFLOPs": datasheet,
        "peak_source": peak_source,
    }
    rows: list[dict] = []
    for v in variants:
        try:
            rows.append(run_variant(cfg, v, ids, vocab, steps, warmup, prec, dev, profile_rows))
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001  (a variant that fails, e.g. out of memory, is reported)
            rows.append({"variant": v, "error": f"{type(err).__name__}: {str(err)[:500]}"})
        if v.endswith("+compile"):
            torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        _add_ratios(rows, flops["per_token"], peak, datasheet)
        if on_progress is not None:
            on_progress({**header, "complete": len(rows) == len(variants), "results": rows})
    return {**header, "complete": True, "results": rows}


def _add_ratios(rows: list[dict], flops_per_token: float, matmul: float, peak: float | None = None) -> None:
    """Model TFLOP/s, MFU (against the datasheet ``peak``; None without one), the ratio to the ``matmul``
    rate measured in the run (``vs_matmul``), and the ratios to ``torch`` and ``torch+compile`` of every
    measured row."""
    base = {r["variant"]: r["tokens_per_s"] for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        rate = flops_per_token * r["tokens_per_s"]
        r["model_TFLOPs"] = float(f"{rate / 1e12:.4g}")
        util = mfu(rate, peak)
        r["mfu"] = None if util is None else float(f"{util:.4g}")
        r["vs_matmul"] = float(f"{rate / (matmul * 1e12):.4g}")
        if "torch" in base:
            r["ratio_vs_torch"] = round(r["tokens_per_s"] / base["torch"], 3)
        if "torch+compile" in base:
            r["ratio_vs_torch_compile"] = round(r["tokens_per_s"] / base["torch+compile"], 3)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def format_table(result: dict) -> str:
    head = (
        f"# {result['device']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, "
        f"{result['date']}\n# {result['config']} ({result['kind']}, {result['params_M']}M params), batch {result['batch_size']} x "
        f"{result['seq_len']}, {result['precision']}, {result['flops_per_token'] / 1e9:.3f} GFLOP/token, "
        f"measured matmul {result['matmul_peak_TFLOPs']} TFLOP/s ({result['matmul_peak']})\n# MFU peak: "
        + (
            f"{result['peak_TFLOPs']} TFLOP/s ({result['peak_source']})"
            if result.get("peak_TFLOPs")
            else f"none for this device and {result.get('matmul_precision')} (give --peak-tflops)"
        )
        + "\n"
    )
    rows = []
    for r in result["results"]:
        if "error" in r:
            rows.append((r["variant"], f"failed: {r['error'][:200]}", *[""] * 7))
            continue
        rows.append(
            (
                r["variant"],
                r["ms_per_step"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['model_TFLOPs']:.4g}",
                "-" if r.get("mfu") is None else f"{r['mfu']:.1%}",
                f"{r['vs_matmul']:.1%}",
                r["peak_mem_GiB"] if r["peak_mem_GiB"] is not None else "-",
                r.get("ratio_vs_torch", "-"),
                f"{r['loss_first']} -> {r['loss_last']}",
            )
        )
    return head + markdown_table(
        (
            "variant",
            "ms/step",
            "tokens/s",
            "model TFLOP/s",
            "MFU",
            "vs measured matmul",
            "peak GiB",
            "ratio vs torch",
            "loss first -> last",
        ),
        rows,
    )


def _cmd_bench(args) -> int:
    variants = [v for v in (args.variants or "").split(",") if v] or None

    def progress(partial: dict) -> None:
        last = partial["results"][-1]
        print(
            f"bench: {last['variant']}: "
            + (last["error"] if "error" in last else f"{last['tokens_per_s']:,.0f} tokens/s"),
            flush=True,
        )
        if args.json:
            write_json(args.json, partial)

    result = bench(
        args.config,
        args.set,
        variants,
        args.steps,
        args.warmup,
        args.batch_size,
        args.precision,
        args.vocab,
        args.device,
        args.peak_size,
        args.profile,
        on_progress=progress,
        peak_tflops=args.peak_tflops,
    )
    print(format_table(result))
    for r in result["results"]:
        for p in r.get("profile", []):
            print(f"  {r['variant']}: {p['ms_per_step']:9.3f} ms {p['share']:6.1%} x{p['calls']:<4} {p['name']}")
    if args.json:
        write_json(args.json, result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``memtrain bench`` to the CLI's subcommands."""
    b = sub.add_parser("bench", help="training throughput of a config: Triton kernels vs plain torch, MFU")
    b.add_argument("config", help="run config (YAML path, or a name under yaml/, e.g. paper/memory_mixer_e512_d512)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    b.add_argument(
        "--variants",
        help=f"comma-separated, from {','.join(VARIANTS)} "
        "(default: all four on CUDA; torch, plus triton under TRITON_INTERPRET=1, on CPU)",
    )
    b.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    b.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the config's)")
    b.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: the config's")
    b.add_argument("--vocab", type=int, default=8000, help="vocabulary when the config leaves it to the data")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--peak-size", type=int, default=None, help="n of the n^3 matmul peak (8192 CUDA, 1024 CPU)")
    b.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        metavar="T",
        help="per-device dense peak for the MFU in TFLOP/s (default: the datasheet table for the "
        "device and precision; none on CPU)",
    )
    b.add_argument("--profile", type=int, default=0, metavar="N", help="also list the N costliest kernels per variant")
    b.add_argument("--json", help="write the full result here")
    b.set_defaults(func=_cmd_bench)


def main(argv: list[str] | None = None) -> int:
    """``python -m memtrain.bench CONFIG ...``: the same as ``memtrain bench`` without the rest of the CLI
    (whose other subcommands import the data stack; the GPU machine may not have it)."""
    from memtrain.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m memtrain.bench")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as err:
        print(f"memtrain bench: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
