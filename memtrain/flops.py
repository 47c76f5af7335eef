"""Model FLOPs and MFU: the one analytic count that ``memtrain bench``, the training log and ``memtrain sweep
collect`` use, and the dense datasheet peaks MFU divides by (docs/performance.md defines both).
"""

from __future__ import annotations

from typing import Any

import torch

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


def model_flops(
    cfg: Any,
    vocab: int,
    batch: int,
    scored: dict[str, int],
    frozen_encoder: bool = False,
    precomputed_memories: bool = False,
    backward: bool = True,
) -> dict[str, float]:
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
    out = {
        "encoder": passes * enc * enc_x,
        "decoder": passes * dec * train_x,
        "head": head * train_x,
        "other": passes * (bottleneck * enc_x + bridge),
    }
    out["total"] = sum(out.values())
    out["per_token"] = out["total"] / (batch * cfg.seq_len)
    return out


def run_flops(
    cfg: Any, vocab: int, batch: int | None = None, stage: int = 0, scored: dict[str, int] | None = None
) -> dict[str, float]:
    """:func:`model_flops` of one optimizer micro-step of a run config ``cfg`` (a memtrain Config): ``batch``
    rows (default ``data.batch_size``), the objectives of curriculum stage ``stage``, the encoder frozen by
    ``model.frozen_encoder`` or the stage's ``freeze``, skipped with ``data.memories``. ``scored`` defaults to
    the positions each objective scores on rows without padding (:func:`scored_positions`)."""
    if cfg.model.hf_decoder is not None:  # before building anything: the LLM can't be built on the meta device
        raise ValueError("analytic FLOPs do not cover model.hf_decoder (a Hugging Face LLM decoder)")
    rows: int = batch or cfg.data.batch_size
    st = cfg.stages()[stage]
    if scored is None:
        ids = torch.full((rows, cfg.model.seq_len), 6, dtype=torch.long)
        scored, _ = scored_positions(cfg, ids, vocab, st.weights.active())
    frozen = cfg.model.frozen_encoder is not None or "encoder" in st.freeze
    return model_flops(
        cfg.model,
        vocab,
        rows,
        scored,
        frozen_encoder=frozen,
        precomputed_memories=getattr(cfg.data, "memories", None) is not None,
    )


def flops_per_token(cfg: Any, vocab: int, stage: int = 0) -> float:
    """Model FLOPs per training token of run config ``cfg`` in curriculum stage ``stage`` (see :func:`run_flops`):
    times the logged ``tokens_per_s`` (all ranks) it is the run's model FLOP/s."""
    return run_flops(cfg, vocab, stage=stage)["per_token"]


def stage_flops_per_token(cfg: Any, vocab: int) -> list[float] | None:
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


def peak_device(name: str) -> str | None:
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
    if dev_type == "cuda" and (
        torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    ):
        return "tf32"
    return "fp32"


def device_peak_tflops(name: str, precision: str) -> tuple[float, str] | None:
    """(dense datasheet peak in TFLOP/s, "KEY PRECISION") for device ``name`` and a :func:`matmul_precision`
    column, or None when the device is not in :data:`PEAK_TFLOPS`."""
    key = peak_device(name)
    if key is None or precision not in PEAK_TFLOPS[key]:
        return None
    return PEAK_TFLOPS[key][precision], f"{key} {precision}"


def mfu(model_flops_per_s: float, peak_tflops: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: model FLOP/s (all ``n_devices`` together) / (``n_devices`` x the per-device
    dense datasheet peak in TFLOP/s); None without a peak."""
    if not peak_tflops:
        return None
    return model_flops_per_s / (peak_tflops * 1e12 * n_devices)


def scored_positions(
    cfg: Any, ids: torch.Tensor, vocab: int, objectives: Any | None = None
) -> tuple[dict[str, int], int]:
    """(objective -> scored positions of the batch, i.e. the rows the head is applied to, counted from the
    real task tensors; the model's parameter count). ``objectives``: names (default: the first stage's)."""
    from memtrain.models import build_model
    from memtrain.objectives import SpecialTokens, make_task, task_chunks

    with torch.device("meta"):
        model = build_model(cfg.model.model_copy(update={"kernels": "torch"}), vocab)
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=cfg.objective.n_delimiters, filler_id=5)
    out = {}
    for name in cfg.stages()[0].weights.active() if objectives is None else objectives:
        _, targets = make_task(name, ids.cpu(), special, task_chunks(model))
        out[name] = int((model.align_labels(targets) != -100).sum())
    return out, sum(p.numel() for p in model.parameters())
