"""The ``model.hf_decoder`` config section: defaults, the dual row length, and one-line errors."""

from __future__ import annotations

import pytest

from memtrain.config import config_from_dict
from memtrain.errors import UserError


def _model(**hf) -> dict:
    return {"model": {"kind": "memory", "chunk_len": 8, "n_chunks": 4, "hf_decoder": {"path": "llm", **hf}}}


def test_defaults_and_row_length():
    cfg = config_from_dict(_model())
    hf = cfg.model.hf_decoder
    assert (hf.mode, hf.lora.r, hf.lora.target_modules, hf.gradient_checkpointing, hf.dtype) == (
        "full",
        16,
        "all-linear",
        False,
        "float32",
    )
    assert cfg.model.decoder_chunk_len == 8 and cfg.model.seq_len == 4 * (8 + 8)
    cfg = config_from_dict(_model(chunk_len=6, mode="lora", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}))
    assert cfg.model.decoder_chunk_len == 6 and cfg.model.seq_len == 4 * (8 + 6)
    assert cfg.model.hf_decoder.lora.target_modules == ["q_proj", "v_proj"]
    plain = config_from_dict({"model": {"chunk_len": 8, "n_chunks": 4}})
    assert plain.model.hf_decoder is None and plain.model.seq_len == 32 and plain.model.decoder_chunk_len == 8


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"model": {"kind": "clm", "hf_decoder": {"path": "llm"}}}, "needs kind: memory"),
        (_model(mode="adapter"), "model.hf_decoder.mode"),
        (_model(lora={"alpah": 4}), "did you mean 'alpha'"),
        ({"model": {"kind": "memory", "hf_decoder": {}}}, "model.hf_decoder.path"),
    ],
)
def test_bad_hf_decoder_settings_are_one_line_errors(raw, expected):
    with pytest.raises(UserError) as err:
        config_from_dict(raw, source="run.yaml")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_paper_llama_config_is_the_reference_setup():
    from memtrain.config import load_config

    cfg = load_config("yaml/paper/llm_decoder_copy_llama32_1b.yaml", ["model.hf_decoder.path=/models/Llama-3.2-1B"])
    m = cfg.model
    assert (m.kind, m.chunk_len, m.n_chunks, m.decoder_chunk_len) == ("memory", 256, 4, 256)
    assert (m.encoder.arch, m.encoder.d_model) == ("transformer", 512) and m.frozen_encoder is not None
    assert (m.hf_decoder.path, m.hf_decoder.mode, m.hf_decoder.gradient_checkpointing) == (
        "/models/Llama-3.2-1B",
        "full",
        True,
    )
    assert cfg.objective.weights.active() == {"copy": 1.0} and cfg.objective.n_delimiters == 0
    assert (cfg.optim.lr, cfg.train.precision, cfg.dist.engine, cfg.dist.zero_stage) == (5e-5, "bf16", "deepspeed", 3)
