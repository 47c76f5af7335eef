"""``memtrain bench`` and the operator benchmark: analytic FLOPs, and a real (tiny) run on this device.

Without CUDA the Triton variant runs in the CPU interpreter, so these runs are tiny: they check that the tools
work end to end and report consistent numbers, not speed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of a Triton kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

from memtrain.cli import main as cli_main  # noqa: E402
from memtrain.config import load_config  # noqa: E402
from memtrain.flops import model_flops, stack_flops  # noqa: E402


def test_autoencoder_flops_match_the_hand_count():
    """d 1024, n_ctx 512, 8 + 8 mixer layers, k 1, V 8000: about 0.9 GFLOP per token (forward + backward)."""
    cfg = load_config("yaml/paper/mixer_autoencoder_d1024_c512.yaml").model
    d, L, V = 1024, 512, 8000
    per_layer = 16 * d * d + (L + 1) * d  # FFN 2 x 2 x d x 4d; mixing L(L+1)/2 pairs x 2 FLOPs x d, per token
    expected = 3 * (16 * per_layer + 2 * d * V)
    flops = model_flops(cfg, V, batch=4, scored={"reconstruction": 4 * L})
    assert abs(flops["per_token"] - expected) < 1e-6 * expected
    assert 0.87e9 < flops["per_token"] < 0.89e9


def test_mixing_is_counted_on_the_lower_triangle_per_tap_and_head():
    cfg = load_config("yaml/tiny.yaml").model.encoder
    T = 9
    base = stack_flops(cfg.model_copy(update={"kernel": 1}), rows=2, length=T)
    taps = stack_flops(cfg.model_copy(update={"kernel": 3}), rows=2, length=T)
    assert taps - base == 2 * cfg.n_layers * 2 * T * (T + 1) * cfg.d_model  # 2 more taps, 2 rows
    heads = stack_flops(cfg.model_copy(update={"n_heads": 4}), rows=2, length=T)
    assert heads - base == 2 * cfg.n_layers * 4 * cfg.d_model**2 * T  # projections only: heads split d


def test_memory_model_flops_shapes_and_frozen_encoder():
    cfg = load_config("yaml/paper/memory_mixer_e512_d512.yaml").model
    B, V, C, L = 2, 8000, cfg.n_chunks, cfg.chunk_len
    scored = {"causal": B * (C * L - 1), "copy": B * (C * L // 2 - 1)}
    f = model_flops(cfg, V, B, scored)
    assert f["encoder"] == 2 * 3 * stack_flops(cfg.encoder, B * (C - 1), L)
    assert f["decoder"] == 2 * 3 * stack_flops(cfg.decoder, B * C, C + L)
    assert f["head"] == 3 * 2 * cfg.decoder.d_model * V * sum(scored.values())
    frozen = model_flops(cfg, V, B, scored, frozen_encoder=True)
    assert frozen["encoder"] == f["encoder"] / 3 and frozen["per_token"] < f["per_token"]


def test_bench_cli_runs_torch_and_triton_on_this_device(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli_main(
        [
            "bench",
            "tiny",
            "--variants",
            "torch,triton",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--vocab",
            "64",
            "--peak-size",
            "256",
            "--profile",
            "3",
            "--peak-tflops",
            "0.5",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["kind"] == "memory" and result["batch_size"] == 2 and result["seq_len"] == 32
    assert result["matmul_peak_TFLOPs"] > 0 and result["flops_per_token"] > 0
    assert result["peak_TFLOPs"] == 0.5 and result["peak_source"] == "--peak-tflops"
    assert result["scored_positions"] == {"causal": 2 * 31, "copy": 2 * 15}
    torch_row, triton_row = result["results"]
    assert [torch_row["variant"], triton_row["variant"]] == ["torch", "triton"]
    for row in (torch_row, triton_row):
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and 0 < row["vs_matmul"] and row["profile"]
        assert abs(row["tokens_per_s"] * row["ms_per_step"] / 1e3 - 2 * 32) < 0.01 * 64  # tokens per step
        rate = result["flops_per_token"] * row["tokens_per_s"]  # model FLOP/s
        assert abs(row["model_TFLOPs"] - rate / 1e12) < 0.01 * rate / 1e12
        assert abs(row["mfu"] - rate / 0.5e12) < 0.01 * rate / 0.5e12  # against the given peak
        vs = rate / (result["matmul_peak_TFLOPs"] * 1e12)  # against the matmul rate measured in the run
        assert abs(row["vs_matmul"] - vs) < 0.01 * vs
    assert torch_row["ratio_vs_torch"] == 1.0
    assert triton_row["ratio_vs_torch"] == round(triton_row["tokens_per_s"] / torch_row["tokens_per_s"], 3)
    assert abs(triton_row["loss_last"] - torch_row["loss_last"]) < 1e-4  # the same training, other kernels
    printed = capsys.readouterr().out
    assert "| torch |" in printed and "| triton |" in printed and "GFLOP/token" in printed
    assert "| MFU | vs measured matmul |" in printed and "MFU peak: 0.5 TFLOP/s (--peak-tflops)" in printed


def _tiny_bench(variants: list[str], **kwargs) -> dict:
    """``memtrain bench`` of yaml/tiny.yaml on the CPU at vocabulary 64 (fp32, a 64^3 matmul for the rate)."""
    import memtrain.bench as bench_mod

    return bench_mod.bench("tiny", [], variants, precision=None, vocab=64, device="cpu", peak_size=64, **kwargs)


def test_a_failing_variant_is_reported_and_the_others_still_run(monkeypatch):
    import memtrain.bench as bench_mod

    real = bench_mod.run_variant

    def run(cfg, variant, *args, **kwargs):
        if variant == "triton":
            raise RuntimeError("out of memory (simulated)")
        return real(cfg, variant, *args, **kwargs)

    monkeypatch.setattr(bench_mod, "run_variant", run)
    seen = []
    result = _tiny_bench(
        ["triton", "torch"],
        steps=1,
        warmup=0,
        batch_size=1,
        on_progress=lambda r: seen.append((r["complete"], [x["variant"] for x in r["results"]])),
    )
    assert seen == [(False, ["triton"]), (True, ["triton", "torch"])]  # written after every variant
    failed, ok = result["results"]
    assert failed == {"variant": "triton", "error": "RuntimeError: out of memory (simulated)"}
    assert ok["variant"] == "torch" and ok["ratio_vs_torch"] == 1.0 and ok["tokens_per_s"] > 0
    assert ok["mfu"] is None and ok["vs_matmul"] > 0 and result["peak_TFLOPs"] is None  # CPU: no datasheet peak
    table = bench_mod.format_table(result)
    assert "| triton | failed: RuntimeError: out of memory (simulated)" in table
    assert "MFU peak: none for this device" in table


def test_bench_reports_an_unknown_config_as_a_user_error(capsys):
    assert cli_main(["bench", "no/such/config"]) == 2
    assert "bench: no config 'no/such/config'" in capsys.readouterr().err


def test_operator_benchmark_runs(tmp_path, capsys):
    from memtrain.kernels import bench_ops

    out = tmp_path / "ops.json"
    assert bench_ops.main(["--tiny", "--no-compile", "--ops", "mix,linear_ce", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["op"] for r in rows] == ["mix", "linear_ce", "linear_ce"]
    for r in rows:
        assert r["ms"]["torch"] > 0 and r["ms"]["triton"] > 0 and r["speedup_vs_torch"] > 0
    assert "| mix |" in capsys.readouterr().out


def test_compile_variants_train_like_the_eager_ones(monkeypatch):
    """``+compile`` wraps the model in torch.compile's OptimizedModule, which refuses ``len()`` and so ``bool()``:
    the forward it is handed must be called as given (the variant once failed with 'does not support len()').
    Dynamo's eager backend traces the same graph without a C++ compiler."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    result = _tiny_bench(["torch", "torch+compile"], steps=2, warmup=1, batch_size=2)
    eager, compiled = result["results"]
    assert "error" not in compiled, compiled
    assert compiled["tokens_per_s"] > 0
    assert compiled["loss_first"] == pytest.approx(eager["loss_first"], rel=1e-4)
    assert compiled["loss_last"] == pytest.approx(eager["loss_last"], rel=1e-3)
