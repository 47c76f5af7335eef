"""``memtrain bench``: training throughput of one config on this device, Triton kernels against plain torch.

    memtrain bench yaml/paper/mixer_autoencoder_d1024_c512.yaml --steps 10 --json runs/bench/ae.json
    memtrain bench paper/memory_mixer_e512_d512 --variants torch,triton      # names resolve under yaml/

Each *variant* trains the same model (same seed, same random token rows, the config's first-stage objectives,
AdamW step included) for ``--warmup`` untimed and ``--steps`` timed steps:

``torch``            ``model.kernels: torch``, eager (the plain-torch path: the baseline of every ratio)
``torch+compile``    the same under ``torch.compile``
``triton``           ``model.kernels: triton`` (fused kernels; chunked linear + CE head)
``triton+compile``   the same, with torch.compile around the kernels

It prints tokens/s, the model's FLOPs per token (:func:`model_flops`, analytic: every matmul, plus the causal
token mixing and attention counted on the lower triangle only, s <= t; x3 for forward + backward, x1 for a
frozen encoder; the same count as ``memtrain sweep collect``), model TFLOP/s, **MFU** = model FLOP/s / this
device's dense datasheet peak for the matmul precision (:data:`PEAK_TFLOPS`, or ``--peak-tflops``; none on
CPU unless given), **vs measured matmul** = model FLOP/s / the matmul rate *measured in the same run* (an
n x n x n matmul in the run's precision, random operands, median of timed repeats), peak memory, and each
variant's ratio to ``torch``. docs/performance.md defines every number.
``--json`` writes everything, with device, versions, commit, date and the command line.
"""
from __future__ import annotations

import argparse
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from memtrain.fileio import write_json

VARIANTS = ("torch", "torch+compile", "triton", "triton+compile")


# ---------------------------------------------------------------------------------------------------------
# FLOPs

def stack_flops(stack: Any, rows: int, length: int) -> float:
    """Forward FLOPs of ``stack`` (a StackConfig) over ``rows`` sequences of ``length`` positions.

    Mixer block: FFN 4·m·d²·T, causal mixing k·T(T+1)·d (lower triangle: T(T+1)/2 (t, s) pairs, 2 FLOPs each,
    per feature and tap), multi-head in/out projections 4·d²·T. Transformer block: q, k, v, o 8·d²·T, causal
    attention 2·T(T+1)·d (scores and values on the lower triangle), SwiGLU 6·m·d²·T.
    """
    d, m, T = stack.d_model, stack.ffn_mult, length
    if stack.arch == "mixer":
        per = 4 * m * d * d * T + stack.kernel * T * (T + 1) * d + (4 * d * d * T if stack.n_heads else 0)
    else:
        per = 8 * d * d * T + 2 * T * (T + 1) * d + 6 * m * d * d * T
    return float(stack.n_layers * per * rows)


def model_flops(cfg: Any, vocab: int, batch: int, scored: dict[str, int], frozen_encoder: bool = False,
                precomputed_memories: bool = False, backward: bool = True) -> dict[str, float]:
    """Analytic training FLOPs of one step of ``cfg`` (a ModelConfig) on ``batch`` rows: the one FLOP count of
    ``memtrain bench``, ``memtrain sweep collect`` and the training log.

    ``scored``: objective -> number of scored positions in the batch (the head runs on those only; the
    training loop has them exactly as ``ObjectiveStats.n_tokens``); each objective is one forward pass of the
    whole model (and one backward). The decoder of a memory model runs on B·C rows of C + L positions, its
    encoder on B·(C-1) chunks of L. Forward + backward is x3 for every matmul whose input and weight both
    need gradients; the encoder (its bottleneck included) is x1 when ``frozen_encoder`` (it runs under
    no_grad) and absent with ``precomputed_memories`` (``data.memories``); a layer that then reads constant
    memories (``decoder_proj``; the unroll projection when e = d) is x2 (its weight gradient only).
    ``backward=False``: the forward pass only (evaluation). Returns {"encoder", "decoder", "head", "other",
    "total"} and "per_token" = total / (batch · seq_len).
    Not covered: ``hf_decoder`` (ValueError), and stage freezes of groups other than the encoder.
    """
    if getattr(cfg, "hf_decoder", None) is not None:
        raise ValueError("analytic FLOPs do not cover model.hf_decoder (a Hugging Face LLM decoder)")
    e, d, L, C = cfg.encoder.d_model, cfg.decoder.d_model, cfg.chunk_len, cfg.n_chunks
    enc_trains = not (frozen_encoder or precomputed_memories)
    # x (forward + backward) / forward: 3 = output, input and weight gradients; 2 = the input is a constant
    enc_x = 0 if precomputed_memories else (3 if enc_trains else 1) if backward else 1
    train_x = 3 if backward else 1
    const_x = (3 if enc_trains else 2) if backward else 1  # a layer reading the memories themselves
    enc = dec = bottleneck = bridge = 0.0  # bridge: forward FLOPs x factor of the layers between the stacks
    if cfg.kind == "autoencoder":
        memories = batch
        enc = stack_flops(cfg.encoder, batch, L)
        dec = stack_flops(cfg.decoder, batch, L)
        bridge = batch * 2 * e * d * (e != d) * const_x  # decoder_proj
        if cfg.injection == "unroll":  # Linear(d/2, d) on L positions; after decoder_proj its input has a gradient
            bridge += batch * d * d * L * (train_x if e != d else const_x)
    elif cfg.kind == "memory":
        memories = 0 if cfg.no_memory else batch * (C - 1)
        enc = stack_flops(cfg.encoder, memories, L) if memories else 0.0
        dec = stack_flops(cfg.decoder, batch * C, C + L)
        bridge = memories * 2 * e * d * (e != d) * const_x  # decoder_proj
    else:
        memories = 0
        dec = stack_flops(cfg.decoder, batch, C * L)
    if memories and cfg.compression > 1:  # down Linear(e, e/c) and up Linear(e/c, e), part of the encoder
        bottleneck = memories * 4 * e * (e // cfg.compression)
    passes = len(scored)
    head = sum(2.0 * d * vocab * n for n in scored.values())
    out = {"encoder": passes * enc * enc_x, "decoder": passes * dec * train_x, "head": head * train_x,
           "other": passes * (bottleneck * enc_x + bridge)}
    out["total"] = sum(out.values())
    out["per_token"] = out["total"] / (batch * cfg.seq_len)
    return out


def run_flops(cfg: Any, vocab: int, batch: Optional[int] = None, stage: int = 0,
              scored: Optional[dict[str, int]] = None) -> dict[str, float]:
    """:func:`model_flops` of one optimizer micro-step of a run config ``cfg`` (a memtrain Config): ``batch``
    rows (default ``data.batch_size``), the objectives of curriculum stage ``stage``, the encoder frozen by
    ``model.frozen_encoder`` or the stage's ``freeze``, skipped with ``data.memories``. ``scored`` defaults to
    the positions each objective scores on rows without padding (:func:`scored_positions`)."""
    if cfg.model.hf_decoder is not None:  # before building anything: the LLM can't be built on the meta device
        raise ValueError("analytic FLOPs do not cover model.hf_decoder (a Hugging Face LLM decoder)")
    batch = batch or cfg.data.batch_size
    st = cfg.stages()[stage]
    if scored is None:
        ids = torch.full((batch, cfg.model.seq_len), 6, dtype=torch.long)
        scored, _ = scored_positions(cfg, ids, vocab, st.weights.active())
    frozen = cfg.model.frozen_encoder is not None or "encoder" in st.freeze
    return model_flops(cfg.model, vocab, batch, scored, frozen_encoder=frozen,
                       precomputed_memories=getattr(cfg.data, "memories", None) is not None)


def flops_per_token(cfg: Any, vocab: int, stage: int = 0) -> float:
    """Model FLOPs per training token of run config ``cfg`` in curriculum stage ``stage`` (see :func:`run_flops`):
    times the logged ``tokens_per_s`` (all ranks) it is the run's model FLOP/s."""
    return run_flops(cfg, vocab, stage=stage)["per_token"]


def stage_flops_per_token(cfg: Any, vocab: int) -> Optional[list[float]]:
    """:func:`flops_per_token` of each curriculum stage of run config ``cfg``, or None where the analytic count
    does not apply (``model.hf_decoder``)."""
    try:
        return [flops_per_token(cfg, vocab, i) for i in range(len(cfg.stages()))]
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Datasheet peaks and MFU

#: Dense (no structured sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, per precision;
#: "fp32" is the non-tensor-core FP32 rate (fp32 matmuls with TF32 off). Vendors print the sparse figure
#: first with a footnote; these are those figures halved, or the dense figure where the datasheet gives it.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16/FP16 1,979*, TF32 989* (*with sparsity), FP32 67
    "H100 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 67.0},
    # NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column: BF16/FP16 1,513*, TF32 756*, FP32 51
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    # NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column: BF16/FP16 1,671*, TF32 835*, FP32 60
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: BF16/FP16 1,979*, TF32 989*, FP32 67
    "H200": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 67.0},
    # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column: BF16/FP16 1,671*, TF32 835*, FP32 60
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # NVIDIA A100 Tensor Core GPU datasheet (the same for SXM4 and PCIe, 40GB and 80GB):
    # BF16/FP16 312 (624*), TF32 156 (312*), FP32 19.5
    "A100 SXM4 80GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100 SXM4 40GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100 PCIe 80GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100 PCIe 40GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    # NVIDIA HGX B200 datasheet, per GPU (8-GPU totals / 8): FP16/BF16 4.5 PF*, TF32 2.2 PF*, FP32 75 TF
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
    # NVIDIA L40S datasheet: BF16/FP16 362.05 (733*), TF32 183 (366*), FP32 91.6
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    # AMD Instinct MI300X datasheet: FP16/BF16 1,307.4 (dense), TF32 653.7, FP32 (matrix) 163.4
    "MI300X": {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4},
}


def peak_device(name: str) -> Optional[str]:
    """The :data:`PEAK_TFLOPS` key of a device name as ``torch.cuda.get_device_name`` spells it
    (``NVIDIA H100 80GB HBM3`` -> ``H100 SXM``, ``NVIDIA A100-PCIE-40GB`` -> ``A100 PCIe 40GB``,
    ``AMD Instinct MI300X`` -> ``MI300X``), or None for a device not in the table (or an ambiguous name, such
    as a bare ``H100``: pass ``--peak-tflops``)."""
    import re

    n = re.sub(r"[^a-z0-9]+", " ", name.lower()).split()
    has = set(n)
    words = " ".join(n)
    if "mi300x" in has:
        return "MI300X"
    if "b200" in has:  # not GB200 (a different part)
        return "B200"
    if "l40s" in has:
        return "L40S"
    if "h200" in has:
        return "H200 NVL" if "nvl" in has else "H200"
    if "h100" in has:
        if "nvl" in has:
            return "H100 NVL"
        if "pcie" in has:
            return "H100 PCIe"
        if "sxm" in words or "sxm5" in has or "hbm3" in has:  # the SXM5 part reports "NVIDIA H100 80GB HBM3"
            return "H100 SXM"
        return None
    if "a100" in has:
        form = "PCIe" if "pcie" in has else "SXM4"  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
        mem = "40GB" if ("40gb" in has or "40" in has) else "80GB"
        return f"A100 {form} {mem}"
    return None


def matmul_precision(precision: str, dev_type: str = "cuda") -> str:
    """The datasheet column a run's matmuls use: ``bf16``/``fp16`` as given; ``fp32`` is ``tf32`` when CUDA
    matmuls may use TF32 (``torch.backends.cuda.matmul.allow_tf32`` or a float32 matmul precision other than
    ``highest``), else ``fp32``."""
    if precision in ("bf16", "fp16", "tf32"):
        return precision
    if dev_type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                               or torch.get_float32_matmul_precision() != "highest"):
        return "tf32"
    return "fp32"


def device_peak_tflops(name: str, precision: str) -> Optional[tuple[float, str]]:
    """(dense datasheet peak in TFLOP/s, "KEY PRECISION") for device ``name`` and a :func:`matmul_precision`
    column, or None when the device is not in :data:`PEAK_TFLOPS`."""
    key = peak_device(name)
    if key is None or precision not in PEAK_TFLOPS[key]:
        return None
    return PEAK_TFLOPS[key][precision], f"{key} {precision}"


def mfu(model_flops_per_s: float, peak_tflops: Optional[float], n_devices: int = 1) -> Optional[float]:
    """Model FLOPs utilisation: model FLOP/s (all ``n_devices`` together) / (``n_devices`` x the per-device
    dense datasheet peak in TFLOP/s); None without a peak."""
    if not peak_tflops:
        return None
    return model_flops_per_s / (peak_tflops * 1e12 * n_devices)


# ---------------------------------------------------------------------------------------------------------
# Device and timing

def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Measured matmul rate in TFLOP/s: median over ``reps`` timed n x n x n products of random operands
    (three input pairs rotated, so repeats do not just hit the cache), after warm-up."""
    gen = torch.Generator(device=dev).manual_seed(0)
    pairs = [(torch.randn(n, n, device=dev, generator=gen).to(dtype), torch.randn(n, n, device=dev, generator=gen)
              .to(dtype)) for _ in range(3)]
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
    return 2 * n ** 3 / statistics.median(times) / 1e12


def peak_memory_gib(dev: torch.device) -> Optional[float]:
    if dev.type == "cuda":
        return round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 3)
    return None


# ---------------------------------------------------------------------------------------------------------
# One variant

def resolve_config(name: str) -> Path:
    """A YAML path, or the name of a shipped config (``paper/mixer_autoencoder_d1024_c512``)."""
    from memtrain.errors import UserError
    from memtrain.shipped import resolve_config as shipped

    path = shipped(name)
    if path.is_file():
        return path
    raise UserError(f"bench: no config {name!r} (give a YAML file, or a shipped name: memtrain configs list)")


def autocast_for(precision: str, dev: torch.device):
    import contextlib

    if precision == "bf16":
        return lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def run_variant(cfg: Any, variant: str, ids: torch.Tensor, vocab: int, steps: int, warmup: int,
                precision: str, dev: torch.device, profile_rows: int = 0) -> dict:
    """Train ``steps`` timed steps of ``variant``; returns its timings, memory and losses."""
    from memtrain.engine.optim import build_optimizer
    from memtrain.kernels.dispatch import set_kernels
    from memtrain.models import build_model
    from memtrain.objectives import SpecialTokens, compute_losses

    impl, compiled = variant.split("+")[0], variant.endswith("+compile")
    torch.manual_seed(cfg.run.seed)
    model = set_kernels(build_model(cfg.model, vocab), impl).to(dev)
    if cfg.model.frozen_encoder is not None:
        model.freeze(["encoder"])
    opt = build_optimizer(model, cfg.optim, dev)
    runner = torch.compile(model) if compiled else model
    view = _View(runner, model)
    weights = cfg.stages()[0].weights.active()
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=cfg.objective.n_delimiters, filler_id=5)
    autocast = autocast_for(precision, dev)
    losses: list[float] = []

    def step() -> torch.Tensor:
        with autocast():
            total, _ = compute_losses(view, ids, weights, special)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total.detach()

    t0 = time.perf_counter()
    for _ in range(warmup):
        losses.append(float(step()))
    sync(dev)
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = []
    t0 = time.perf_counter()
    for _ in range(steps):
        done.append(step())
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    losses += [float(x) for x in done]
    row = {"variant": variant, "ms_per_step": round(dt * 1e3, 3), "tokens_per_s": round(ids.numel() / dt, 1),
           "warmup_s": round(warmup_s, 2), "peak_mem_GiB": peak_memory_gib(dev),
           "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5)}
    if dev.type != "cuda":
        row["max_rss_growth_MiB"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    if profile_rows:
        row["profile"] = profile_steps(step, dev, profile_rows)
    return row


class _View:
    """Calls go to the (maybe compiled) runner; attributes come from the model (as the engine's ModelView)."""

    def __init__(self, runner: Any, model: torch.nn.Module):
        self._runner, self._model = runner, model

    def __call__(self, *args, **kwargs):
        return self._runner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def profile_steps(step, dev: torch.device, rows: int) -> list[dict]:
    """The ``rows`` kernels (or CPU ops) with the most self time over two profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [{"name": e.key[:90], "calls": e.count // 2, "ms_per_step": round(getattr(e, key) / 2e3, 3),
             "share": round(getattr(e, key) / total, 4)} for e in events[:rows]]


# ---------------------------------------------------------------------------------------------------------
# The command

def default_variants(dev: torch.device) -> list[str]:
    from memtrain.kernels.common import interpreting, triton_importable

    if dev.type == "cuda":
        return list(VARIANTS) if triton_importable() else ["torch", "torch+compile"]
    return ["torch", "triton"] if interpreting() and triton_importable() else ["torch"]


def scored_positions(cfg: Any, ids: torch.Tensor, vocab: int, objectives: Optional[Any] = None
                     ) -> tuple[dict[str, int], int]:
    """(objective -> scored positions of the batch, i.e. the rows the head is applied to, counted from the
    real task tensors; the model's parameter count). ``objectives``: names (default: the first stage's)."""
    from memtrain.models import build_model
    from memtrain.objectives import SpecialTokens, make_task, task_chunks

    with torch.device("meta"):
        model = build_model(cfg.model.model_copy(update={"kernels": "torch"}), vocab)
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=cfg.objective.n_delimiters, filler_id=5)
    out = {}
    for name in (cfg.stages()[0].weights.active() if objectives is None else objectives):
        _, targets = make_task(name, ids.cpu(), special, task_chunks(model))
        out[name] = int((model.align_labels(targets) != -100).sum())
    return out, sum(p.numel() for p in model.parameters())


def bench(config: str, overrides: list[str], variants: list[str] | None, steps: int, warmup: int,
          batch_size: int | None, precision: str | None, vocab: int, device: str, peak_size: int | None,
          profile_rows: int = 0, on_progress: Optional[Callable[[dict], None]] = None,
          peak_tflops: Optional[float] = None) -> dict:
    """Run the benchmark; returns the JSON-ready result (see the module docstring). ``on_progress`` gets the
    result so far after each variant (``"complete": False`` until the last), so a run that is stopped early
    still leaves the variants it measured. ``peak_tflops`` overrides the datasheet peak of the MFU."""
    from memtrain.config import load_config
    from memtrain.engine.distributed import pick_device
    from memtrain.errors import UserError

    path = resolve_config(config)
    cfg = load_config(path, overrides)
    dev = pick_device(device)
    variants = variants or default_variants(dev)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"bench: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    prec = precision or cfg.train.precision
    if prec == "auto":
        prec = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
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

    header = {"device": name, "torch": torch.__version__, "triton": _triton_version(),
              "commit": current_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]), "config": str(path),
              "overrides": overrides, "kind": cfg.model.kind, "precision": prec, "batch_size": batch,
              "seq_len": cfg.model.seq_len, "vocab": vocab, "steps": steps, "warmup": warmup,
              "scored_positions": scored, "params_M": round(n_params / 1e6, 2),
              "flops_per_token": round(flops["per_token"]),
              "flops_split": {k: v for k, v in flops.items() if k not in ("total", "per_token")},
              "matmul_peak_TFLOPs": float(f"{peak:.4g}"), "matmul_peak": f"{n}^3 {str(peak_dtype).split('.')[-1]}",
              "matmul_precision": column, "peak_TFLOPs": datasheet, "peak_source": peak_source}
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


def _add_ratios(rows: list[dict], flops_per_token: float, matmul: float, peak: Optional[float] = None) -> None:
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


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def current_commit() -> str:
    """The commit of the running memtrain (see :func:`memtrain.version.git_commit`), or ``unknown``."""
    from memtrain.version import git_commit

    return git_commit() or "unknown"


def format_table(result: dict) -> str:
    head = (f"# {result['device']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, "
            f"{result['date']}\n# {result['config']} ({result['kind']}, {result['params_M']}M params), batch {result['batch_size']} x "
            f"{result['seq_len']}, {result['precision']}, {result['flops_per_token'] / 1e9:.3f} GFLOP/token, "
            f"measured matmul {result['matmul_peak_TFLOPs']} TFLOP/s ({result['matmul_peak']})\n# MFU peak: "
            + (f"{result['peak_TFLOPs']} TFLOP/s ({result['peak_source']})" if result.get("peak_TFLOPs") else
               f"none for this device and {result.get('matmul_precision')} (give --peak-tflops)") + "\n")
    lines = ["| variant | ms/step | tokens/s | model TFLOP/s | MFU | vs measured matmul | peak GiB | ratio vs torch "
             "| loss first -> last |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:200]} | | | | | | | |")
            continue
        util = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['variant']} | {r['ms_per_step']} | {r['tokens_per_s']:,.0f} | {r['model_TFLOPs']:.4g} | "
                     f"{util} | {r['vs_matmul']:.1%} | "
                     f"{r['peak_mem_GiB'] if r['peak_mem_GiB'] is not None else '-'} | "
                     f"{r.get('ratio_vs_torch', '-')} | {r['loss_first']} -> {r['loss_last']} |")
    return head + "\n".join(lines)


def _cmd_bench(args) -> int:
    variants = [v for v in (args.variants or "").split(",") if v] or None

    def progress(partial: dict) -> None:
        last = partial["results"][-1]
        print(f"bench: {last['variant']}: " + (last["error"] if "error" in last else
                                               f"{last['tokens_per_s']:,.0f} tokens/s"), flush=True)
        if args.json:
            write_json(args.json, partial)

    result = bench(args.config, args.set, variants, args.steps, args.warmup, args.batch_size, args.precision,
                   args.vocab, args.device, args.peak_size, args.profile, on_progress=progress,
                   peak_tflops=args.peak_tflops)
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
    b.add_argument("--variants", help=f"comma-separated, from {','.join(VARIANTS)} "
                                      "(default: all four on CUDA; torch, plus triton under TRITON_INTERPRET=1, on CPU)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    b.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the config's)")
    b.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: the config's")
    b.add_argument("--vocab", type=int, default=8000, help="vocabulary when the config leaves it to the data")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--peak-size", type=int, default=None, help="n of the n^3 matmul peak (8192 CUDA, 1024 CPU)")
    b.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                   help="per-device dense peak for the MFU in TFLOP/s (default: the datasheet table for the "
                        "device and precision; none on CPU)")
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
