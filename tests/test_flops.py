"""``memtrain.flops.model_flops`` against ``torch.utils.flop_counter.FlopCounterMode`` on tiny models of every kind.

FlopCounterMode counts every matmul, conv and attention at the shapes it runs, so it counts the causal mixing
and causal attention as the dense products they are computed as; ``model_flops`` counts their lower
triangle (s <= t) only. That difference is asserted exactly, from the shapes: per row and layer of T
positions and width d, a mixer with k taps computes 2·k·T²·d where k·T(T+1)·d are causal (k·T(T-1)·d more),
attention 4·T²·d where 2·T(T+1)·d are causal (2·T(T-1)·d more); x3 for forward + backward, x1 for a frozen
encoder. Everything else (FFNs, projections, bottleneck, head) must agree exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from memtrain.bench import _add_ratios
from memtrain.config import config_from_dict, read_yaml
from memtrain.flops import PEAK_TFLOPS, device_peak_tflops, matmul_precision, mfu, model_flops, peak_device, run_flops

V, B = 50, 2
MIX = {"arch": "mixer", "n_layers": 1, "ffn_mult": 2}
ATT = {"arch": "transformer", "n_layers": 1, "n_heads": 2, "ffn_mult": 2}
CASES = {
    "autoencoder-mixer": dict(
        kind="autoencoder",
        chunk_len=8,
        n_chunks=1,
        encoder={**MIX, "d_model": 16},
        decoder={**MIX, "d_model": 24, "n_layers": 2},
        weights={"reconstruction": 1.0},
    ),
    "autoencoder-unroll-heads-bottleneck": dict(
        kind="autoencoder",
        chunk_len=8,
        n_chunks=1,
        injection="unroll",
        compression=2,
        encoder={**MIX, "d_model": 16, "n_heads": 2, "kernel": 3},
        decoder={**MIX, "d_model": 16},
        weights={"reconstruction": 1.0},
    ),
    "autoencoder-transformer": dict(
        kind="autoencoder",
        chunk_len=8,
        n_chunks=1,
        encoder={**ATT, "d_model": 16},
        decoder={**ATT, "d_model": 16},
        weights={"reconstruction": 1.0},
    ),
    "memory-mixer-taps": dict(
        kind="memory",
        chunk_len=6,
        n_chunks=4,
        encoder={**MIX, "d_model": 16, "kernel": 3},
        decoder={**MIX, "d_model": 24, "kernel": 2},
        weights={"causal": 1.0, "copy": 0.5},
    ),
    "memory-transformer": dict(
        kind="memory",
        chunk_len=6,
        n_chunks=2,
        compression=4,
        encoder={**ATT, "d_model": 16},
        decoder={**ATT, "d_model": 16, "n_layers": 2},
        weights={"causal": 1.0, "blank_copy": 1.0},
    ),
    "memory-no-memory": dict(
        kind="memory",
        chunk_len=6,
        n_chunks=2,
        no_memory=True,
        encoder={**MIX, "d_model": 16},
        decoder={**MIX, "d_model": 16},
        weights={"causal": 1.0},
    ),
    "clm-mixer": dict(
        kind="clm",
        chunk_len=8,
        n_chunks=2,
        decoder={**MIX, "d_model": 16, "n_heads": 4},
        weights={"causal": 1.0, "copy": 1.0},
    ),
    "clm-transformer": dict(
        kind="clm", chunk_len=8, n_chunks=2, decoder={**ATT, "d_model": 16}, weights={"causal": 1.0}
    ),
}


def make_config(case: dict, frozen: bool = False):
    raw = read_yaml("yaml/tiny.yaml")
    case = copy.deepcopy(case)
    raw["objective"] = {"weights": case.pop("weights")}
    raw["model"] = {**case, "kernels": "torch", "final_norm": True}
    if frozen:
        raw["model"]["frozen_encoder"] = {"checkpoint": None}
    return config_from_dict(raw, source="test")


def dense_excess(stack, rows: int, length: int) -> int:
    """Forward FLOPs that the dense causal mixing / attention computes beyond the lower triangle."""
    T, d = length, stack.d_model
    per_row = stack.kernel * T * (T - 1) * d if stack.arch == "mixer" else 2 * T * (T - 1) * d
    return stack.n_layers * rows * per_row


def grouped_conv_overcount(stack, rows: int, length: int) -> int:
    """FlopCounterMode's own excess (torch 2.13): the weight gradient of a grouped conv (a multi-head mixer with
    k > 1 taps: H groups) is counted as if every group saw every channel, H x its 2·k·rows·T²·d FLOPs."""
    if stack.arch != "mixer" or stack.kernel == 1 or stack.n_heads < 2:
        return 0
    return stack.n_layers * (stack.n_heads - 1) * 2 * stack.kernel * rows * length**2 * stack.d_model


def counter_bugs(cfg) -> int:
    m = cfg.model
    if m.kind == "autoencoder":
        return grouped_conv_overcount(m.encoder, B, m.chunk_len) + grouped_conv_overcount(m.decoder, B, m.chunk_len)
    if m.kind == "memory":
        enc = 0 if m.no_memory else grouped_conv_overcount(m.encoder, B * (m.n_chunks - 1), m.chunk_len)
        return enc + grouped_conv_overcount(m.decoder, B * m.n_chunks, m.n_chunks + m.chunk_len)
    return grouped_conv_overcount(m.decoder, B, m.seq_len)


def excess(cfg) -> tuple[int, int]:
    """(encoder, decoder) dense excess of one forward pass of ``cfg.model`` on B rows."""
    m = cfg.model
    if m.kind == "autoencoder":
        return dense_excess(m.encoder, B, m.chunk_len), dense_excess(m.decoder, B, m.chunk_len)
    if m.kind == "memory":
        enc = 0 if m.no_memory else dense_excess(m.encoder, B * (m.n_chunks - 1), m.chunk_len)
        return enc, dense_excess(m.decoder, B * m.n_chunks, m.n_chunks + m.chunk_len)
    return 0, dense_excess(m.decoder, B, m.seq_len)


def counted(cfg, backward: bool) -> tuple[int, dict[str, int]]:
    """FlopCounterMode's count of one training step's objectives (forward, or forward + backward)."""
    from memtrain.models import build_model
    from memtrain.objectives import SpecialTokens, compute_losses

    torch.manual_seed(0)
    model = build_model(cfg.model, V)
    if cfg.model.frozen_encoder is not None:
        model.freeze(["encoder"])
    ids = torch.randint(6, V, (B, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=cfg.objective.n_delimiters, filler_id=5)
    # the math attention is plain matmuls, which FlopCounterMode counts (the CPU flash kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        total, parts = compute_losses(model, ids, cfg.stages()[0].weights, special)
        if backward:
            total.backward()
    return fc.get_total_flops(), {k: int(v.n_tokens) for k, v in parts.items()}


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("name", list(CASES))
def test_model_flops_equal_flop_counter_up_to_the_causal_triangle(name, backward):
    cfg = make_config(CASES[name])
    got, scored = counted(cfg, backward)
    ours = model_flops(cfg.model, V, B, scored, backward=backward)
    enc_x, passes = (3 if backward else 1), len(scored)
    enc, dec = excess(cfg)
    bug = passes * counter_bugs(cfg) if backward else 0
    assert got - ours["total"] == passes * enc_x * (enc + dec) + bug
    assert enc + dec > 0  # every case has causal mixing or attention
    # run_flops (bench, collect) counts the same scored positions on rows without padding
    assert run_flops(cfg, V, B, scored=None)["total"] == model_flops(cfg.model, V, B, scored)["total"]


@pytest.mark.parametrize("name", ["autoencoder-mixer", "autoencoder-unroll-heads-bottleneck", "memory-transformer"])
def test_frozen_encoder_counts_its_forward_only(name):
    cfg = make_config(CASES[name], frozen=True)
    got, scored = counted(cfg, backward=True)
    ours = run_flops(cfg, V, B, scored=scored)
    assert ours == model_flops(cfg.model, V, B, scored, frozen_encoder=True)
    enc, dec = excess(cfg)
    assert got - ours["total"] == len(scored) * (enc + 3 * dec)  # no grouped conv in these decoders
    trained = model_flops(cfg.model, V, B, scored)
    assert ours["encoder"] == trained["encoder"] / 3 and ours["total"] < trained["total"]


def test_precomputed_memories_drop_the_encoder():
    cfg = make_config(CASES["memory-transformer"])
    scored = {"causal": B * (cfg.model.seq_len - 1)}
    pre = model_flops(cfg.model, V, B, scored, precomputed_memories=True)
    frozen = model_flops(cfg.model, V, B, scored, frozen_encoder=True)
    assert pre["encoder"] == 0 and pre["decoder"] == frozen["decoder"] and pre["head"] == frozen["head"]
    assert frozen["other"] - pre["other"] == B * (cfg.model.n_chunks - 1) * 4 * 16 * 4  # bottleneck fwd, e 16, c 4


def test_hf_decoder_is_not_counted():
    class Cfg:
        hf_decoder = object()

    with pytest.raises(ValueError, match="hf_decoder"):
        model_flops(Cfg(), V, B, {"causal": 1})


# ---------------------------------------------------------------------------------------------------------
# MFU and the datasheet table


def test_mfu_arithmetic_on_a_hand_example():
    # 1e9 FLOPs/token x 400,000 tokens/s = 400 TFLOP/s; on 2 devices of 989.5 TFLOP/s peak: 400 / 1979
    assert mfu(1e9 * 400_000, 989.5, n_devices=2) == pytest.approx(400 / 1979)
    assert mfu(1e9 * 400_000, 989.5) == pytest.approx(400 / 989.5)
    assert mfu(1e12, None) is None and mfu(1e12, 0.0) is None
    rows = [{"variant": "torch", "tokens_per_s": 1000.0}, {"variant": "triton", "tokens_per_s": 2000.0}]
    _add_ratios(rows, flops_per_token=5e9, matmul=20.0, peak=100.0)  # 5 and 10 TFLOP/s
    assert [r["model_TFLOPs"] for r in rows] == [5.0, 10.0]
    assert [r["mfu"] for r in rows] == [0.05, 0.1] and [r["vs_matmul"] for r in rows] == [0.25, 0.5]
    assert rows[1]["ratio_vs_torch"] == 2.0
    _add_ratios(rows, flops_per_token=5e9, matmul=20.0, peak=None)  # CPU without --peak-tflops
    assert rows[0]["mfu"] is None and rows[0]["vs_matmul"] == 0.25


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 SXM5 80GB", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 SXM4 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB"),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA L40S", "L40S"),
        ("AMD Instinct MI300X", "MI300X"),
        ("nvidia h200", "H200"),
        ("NVIDIA H100", None),
        ("NVIDIA GB200", None),
        ("NVIDIA L40", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("AMD EPYC 7763 64-Core Processor", None),
    ],
)
def test_device_name_lookup(name, key):
    assert peak_device(name) == key


def test_peak_lookup_by_precision():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.5, "H100 SXM bf16")
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == (156.0, "A100 SXM4 80GB tf32")
    assert device_peak_tflops("NVIDIA H100", "bf16") is None
    assert all(set(v) == {"bf16", "fp16", "tf32", "fp32"} for v in PEAK_TFLOPS.values())
    assert matmul_precision("bf16") == "bf16" and matmul_precision("fp32", "cpu") == "fp32"
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert matmul_precision("fp32", "cuda") == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


# ---------------------------------------------------------------------------------------------------------
# memtrain sweep collect: the same count, the recorded world size


def test_collect_uses_model_flops_and_the_recorded_world_size(tmp_path):
    import json

    import yaml
    from memtrain.flops import flops_per_token
    from memtrain.launch.collect import run_record

    raw = read_yaml("yaml/tiny.yaml")
    raw["slurm"] = {"nodes": 1, "tasks_per_node": 1}  # the config says 1 rank; the run recorded 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    logs = [
        {"kind": "train", "step": 5 * i, "tokens_per_s": tps, "stage": 0, "loss/total": 1.0}
        for i, tps in enumerate([10.0, 100.0, 300.0, 200.0], 1)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in logs))
    ck = tmp_path / "checkpoints" / "step_20"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"n_params": 1000, "vocab_size": V, "provenance": {"world_size": 3}}))
    rec = run_record(tmp_path, peak_tflops=2.0)
    per_token = flops_per_token(config_from_dict(raw), V)
    assert rec["ranks"] == 3 and rec["tokens"] == 20 * 4 * 3 * 32
    assert rec["flops_per_token"] == per_token
    assert rec["model_tflops_per_rank"] == pytest.approx(per_token * 200.0 / 3 / 1e12)  # median after the first
    assert rec["mfu"] == pytest.approx(per_token * 200.0 / (2.0e12 * 3))
    assert rec["compute_pflop"] == pytest.approx(per_token * rec["tokens"] / 1e15)
    (ck / "meta.json").write_text(json.dumps({"n_params": 1000, "vocab_size": V}))  # before provenance
    assert run_record(tmp_path)["ranks"] == 1
