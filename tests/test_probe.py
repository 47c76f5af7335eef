"""`memtrain probe`: every model family, the controls, cases whose answer is known, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import save_model

import yaml
from memtrain.cli import main
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.checkpoint import load_model
from memtrain.engine.trainer import train
from memtrain.eval.data import RandomTokens, RunStopped, finished, shards_with_row_len
from memtrain.eval.probe import ProbeSettings, open_source, run_probe
from memtrain.metrics import uniform_logit_ce

FAST = [
    "--set",
    "train.threads=1",
    "--set",
    "train.progress=false",
    "--set",
    "train.eval_batches=2",
    "--set",
    "data.batch_size=8",
    "--set",
    "train.ckpt_every=0",
]


def tiny_run(tiny_data, root: Path, name: str, *overrides: str) -> Path:
    run = root / name
    train(
        tiny_config(
            tiny_data.shards,
            run,
            f"run.name={name}",
            "train.steps=4",
            "train.eval_every=0",
            "train.ckpt_every=0",
            *overrides,
        )
    )
    return run


@pytest.fixture(scope="module")
def sources(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Tiny trained runs of every family, on rows of 32 tokens."""
    root = tmp_path_factory.mktemp("sources")
    ae = ["model.kind=autoencoder", "model.chunk_len=32", "model.n_chunks=1", "objective.weights={reconstruction: 1}"]
    clm = ["model.kind=clm", "objective.weights={causal: 1}", "model.decoder.n_heads=2"]
    return {
        "ae": tiny_run(tiny_data, root, "ae", *ae),
        "clm": tiny_run(tiny_data, root, "clm", *clm),
        "memory": tiny_run(tiny_data, root, "memory"),
        "no_memory": tiny_run(tiny_data, root, "no-memory", "model.no_memory=true", "objective.weights={causal: 1}"),
    }


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.mark.slow
def test_probe_every_family_with_controls(sources, tiny_data, tmp_path, capsys):
    out = tmp_path / "probes"
    assert (
        cli(
            "probe",
            sources["ae"],
            sources["memory"],
            "--controls",
            "--steps",
            5,
            "--out",
            out,
            "--shards",
            tiny_data.shards,
            *FAST,
        )
        == 0
    )
    assert (
        cli(
            "probe",
            sources["clm"],
            "--length",
            16,
            "--decoder",
            "transformer",
            "--steps",
            5,
            "--out",
            out / "clm",
            "--shards",
            tiny_data.shards,
            *FAST,
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| ae untrained | mixer d32 n1 (untrained) | 32 |" in printed, printed

    probes = json.loads((out / "report.json").read_text())["probes"]
    assert [p["label"] for p in probes] == ["ae", "ae untrained", "memory", "memory untrained"]
    assert [p["length"] for p in probes] == [32, 32, 8, 8]  # the source's context: the AE's, a memory chunk
    assert [p["trained"] for p in probes] == [True, False, True, False]
    for p in probes:
        assert p["baseline"]["ln_V"] == pytest.approx(math.log(400))
        assert p["baseline"]["uniform_logits"] == pytest.approx(uniform_logit_ce(400))
        assert p["I_e"] == pytest.approx(1 - p["ce"] / math.log(400))
        assert 0 <= p["accuracy"] <= 1 and p["eval_tokens"] > 0
        frozen = yaml.safe_load((Path(p["run_dir"]) / "config.yaml").read_text())["model"]["frozen_encoder"]
        if p["trained"]:  # <run>/checkpoints/step_*: the source's newest checkpoint
            assert Path(frozen["checkpoint"]).parent.parent.name in ("ae", "memory")
        else:
            assert frozen["checkpoint"] is None
    for png in ("retention.png", "ce.png", "curves.png"):
        assert (out / png).stat().st_size > 5000
    assert "![retention](retention.png)" in (out / "report.md").read_text()

    (clm,) = json.loads((out / "clm" / "report.json").read_text())["probes"]
    assert clm["length"] == 16 and clm["memory_position"] == -2 and clm["source_kind"] == "clm"
    assert clm["decoder"]["arch"] == "transformer" and clm["injection"] == "unroll"


def test_untrained_model_of_a_yaml_config(tiny_data, tmp_path, capsys):
    out = tmp_path / "yaml"
    assert (
        cli(
            "probe",
            Path(__file__).parents[1] / "yaml" / "tiny.yaml",
            "--steps",
            3,
            "--out",
            out,
            "--shards",
            tiny_data.shards,
            *FAST,
        )
        == 0
    )
    (p,) = json.loads((out / "report.json").read_text())["probes"]
    assert p["label"] == "tiny untrained" and not p["trained"] and p["length"] == 8


def test_model_init_torch_starts_every_layer_at_pytorchs_defaults_and_reaches_the_untrained_control(tiny_data):
    """``model.init: torch`` (the reproduction's transformer autoencoder): embeddings N(0, 1) and Linear layers
    U(±1/sqrt(fan_in)) instead of HF Llama's N(0, 0.02); the untrained control of a probe is built the same way."""
    from memtrain.config import load_config
    from memtrain.eval.probe import Source, probe_config
    from memtrain.models import build_model

    root = Path(__file__).parents[1] / "yaml" / "repro"
    cfg = load_config(root / "transformer_autoencoder.yaml")
    assert cfg.model.init == "torch"
    torch.manual_seed(0)
    fresh = build_model(cfg.model, 400)
    llama = build_model(cfg.model.model_copy(update={"init": "arch"}), 400)
    assert fresh.encoder.wte.weight.std().item() == pytest.approx(1.0, abs=0.05)
    assert llama.encoder.wte.weight.std().item() == pytest.approx(0.02, abs=0.002)
    bound = 1 / math.sqrt(cfg.model.decoder.d_model)  # lm_head: fan_in d
    assert fresh.lm_head.weight.abs().max().item() <= bound and fresh.lm_head.weight.std().item() > 0.04
    q = fresh.decoder.blocks[0].self_attn.q_proj.weight
    assert q.abs().max().item() <= bound and q.std().item() > 0.04

    control = probe_config(
        Source("x.yaml", "t", cfg, None, 400, None), ProbeSettings(shards=str(tiny_data.shards)), "o"
    )
    assert control.model.init == "torch" and control.model.encoder == cfg.model.encoder


# ----------------------------------------------------------------------------------------------------
# Cases whose answer is known


def hand_built_encoder(tiny_data, root: Path, constant: bool) -> Path:
    """An autoencoder checkpoint over 4-token chunks whose encoder is set by hand.

    identity-like (``constant=False``): one multi-head mixer layer with a head per position; at the last
    position head h copies (8x) the normalised embedding of token h, so the memory is an injective function of
    the four tokens. constant: every token has the same embedding, so the memory is the same for every input.
    """
    shards = shards_with_row_len(tiny_data.shards, 4)
    run = root / ("constant" if constant else "identity")
    train(
        tiny_config(
            shards,
            run,
            "model.kind=autoencoder",
            "model.chunk_len=4",
            "model.n_chunks=1",
            "objective.weights={reconstruction: 1}",
            "model.encoder={arch: mixer, d_model: 64, n_layers: 1, n_heads: 4}",
            "train.steps=1",
            "train.eval_every=0",
            "train.ckpt_every=0",
        )
    )
    model, _, _ = load_model(run, torch.device("cpu"))
    enc, d = model.encoder, 64
    with torch.no_grad():
        torch.manual_seed(1)
        enc.wte.weight.normal_()
        if constant:
            enc.wte.weight.copy_(enc.wte.weight[7].expand_as(enc.wte.weight))
        mix = enc.blocks[0].conv
        mix.weight.zero_()
        mix.bias.zero_()
        for h in range(4):
            mix.weight[h, 3, h, 0] = 8.0
        for lin in (mix.proj, mix.out_proj):
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()
        enc.blocks[0].patch_ff[2].weight.zero_()
        enc.blocks[0].patch_ff[2].bias.zero_()
    folder = ckpt.resolve_checkpoint(run)
    save_model(model, str(folder / "model.safetensors"))
    ckpt.write_manifest(folder)  # the hand-built weights are this checkpoint's own now
    return run


KNOWN = ("train.threads=1", "train.progress=false", "optim.lr=1e-2", "train.eval_batches=8", "data.batch_size=32")


def test_identity_like_encoder_is_regenerated_almost_perfectly(tiny_data, tmp_path):
    src = open_source(hand_built_encoder(tiny_data, tmp_path, constant=False))
    r = run_probe(src, ProbeSettings(steps=300, overrides=KNOWN), tmp_path / "probe")
    assert r["accuracy"] > 0.97 and r["exact_match"] > 0.9, r
    assert r["ce"] < 0.3 < r["baseline"]["information_less_ce"]
    assert r["retained_bits_per_memory"] > 0.9 * 4 * r["baseline"]["unigram_ce"] / math.log(2)


@pytest.mark.slow
def test_constant_input_encoder_stays_at_the_information_less_baseline(tiny_data, tmp_path):
    src = open_source(hand_built_encoder(tiny_data, tmp_path, constant=True))
    text = run_probe(src, ProbeSettings(steps=300, overrides=KNOWN), tmp_path / "text")
    base = text["baseline"]["unigram_ce"]
    assert text["baseline"]["information_less_ce"] == base
    # the decoder learns the token frequencies (CE falls from ~ln V to the baseline) and nothing more
    assert abs(text["ce"] - base) < 0.1 and text["retained_bits_per_memory"] < 0.6, text
    assert text["accuracy"] < 0.1 and text["exact_match"] == 0.0

    rand = run_probe(src, ProbeSettings(steps=150, random_tokens=True, overrides=KNOWN), tmp_path / "random")
    assert rand["baseline"]["information_less_ce"] == pytest.approx(math.log(400 - 6))
    assert rand["ce"] > math.log(400 - 6) - 0.01 and rand["accuracy"] < 0.02, rand


def test_random_tokens_are_a_pure_function_of_the_batch():
    rt = RandomTokens(400, 6, seed=3)
    ids = torch.arange(64).view(2, 32)
    a, b = rt(ids), rt(ids.clone())
    assert torch.equal(a, b) and a.shape == ids.shape and a.dtype == ids.dtype
    assert int(a.min()) >= 6 and int(a.max()) < 400
    assert not torch.equal(rt(ids + 1), a) and not torch.equal(RandomTokens(400, 6, seed=4)(ids), a)
    state = torch.get_rng_state()
    rt(ids)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (and so a resumed run) is untouched


# ----------------------------------------------------------------------------------------------------
# Bad input: one line each


def fails(capsys, *argv, needle: str) -> None:
    capsys.readouterr()
    assert cli(*argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtrain: error: ") and needle in lines[0], lines


def test_bad_input(sources, tiny_data, other_data, tmp_path, capsys):
    out = ["--out", tmp_path / "p", "--steps", 2, *FAST]
    fails(capsys, "probe", sources["no_memory"], *out, needle="no_memory: true and has no encoder to probe")
    fails(capsys, "probe", sources["clm"], "--length", 64, *out, needle="--length 64: longer than the context")
    fails(capsys, "probe", sources["ae"], "--length", 16, *out, needle="reads exactly 32 tokens")
    fails(
        capsys,
        "probe",
        sources["ae"],
        "--shards",
        other_data.shards,
        *out,
        needle="shards were made with tokenizer sha256",
    )
    fails(capsys, "probe", tmp_path / "nothing", *out, needle="no such checkpoint, run directory or YAML config")
    assert not (tmp_path / "p").exists()  # nothing was written


def test_a_run_stopped_early_asks_for_a_rerun():
    with pytest.raises(RunStopped, match=r"runs/x: stopped at step 3 .* run the same command again") as err:
        finished({"complete": False, "step": 3, "preempted": True}, "runs/x")
    assert err.value.exit_code == 75  # as a preempted `memtrain train`: a Slurm job is requeued
    assert finished({"complete": True, "eval": {}}, "runs/x")["complete"]


def test_probe_reads_the_encoder_of_an_hf_decoder_run(tmp_path, tmp_path_factory):
    """A memory model whose decoder is a Hugging Face LLM: its memtrain encoder is probed on the encoder's token
    stream of the dual shards (the encoder tokenizer's vocabulary, the encoder's chunk length)."""
    from helpers import L, shm_retry, trained_run

    run = trained_run(tmp_path_factory)
    out = tmp_path / "probe"
    assert shm_retry(cli, "probe", run, "--steps", 2, "--out", out, *FAST) == 0
    (p,) = json.loads((out / "report.json").read_text())["probes"]
    assert p["source_kind"] == "memory" and p["trained"] and p["length"] == L and p["memory_position"] == -1
    assert p["vocab_size"] == 420 and p["encoder"]["arch"] == "transformer" and p["eval_tokens"] > 0
    frozen = yaml.safe_load((Path(p["run_dir"]) / "config.yaml").read_text())["model"]["frozen_encoder"]
    assert Path(frozen["checkpoint"]).parent.parent == run
    assert math.isfinite(p["ce"]) and 0 <= p["accuracy"] <= 1
