"""What the retention probe builds on: any model family's encoder loads into a ChunkEncoder, and the trainer's
batch transform (the random-token control) reaches every batch."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config

from memtrain.config import ModelConfig, StackConfig
from memtrain.engine.trainer import train
from memtrain.errors import UserError
from memtrain.models import build_model
from memtrain.models.base import encoder_state_from

V = 50


def probe_cfg(arch: str, length: int, **kw) -> ModelConfig:
    enc = StackConfig(arch=arch, d_model=16, n_layers=2, n_heads=2, kernel=1)
    return ModelConfig(
        kind="autoencoder",
        chunk_len=length,
        n_chunks=1,
        encoder=enc,
        decoder=StackConfig(arch="mixer", d_model=16, n_layers=1),
        **kw,
    )


@pytest.mark.parametrize("arch,kernel", [("mixer", 1), ("mixer", 3), ("transformer", 1)])
@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_loads_as_encoder_and_reads_a_prefix(arch, kernel, tied):
    torch.manual_seed(0)
    body = StackConfig(arch=arch, d_model=16, n_layers=2, n_heads=2, kernel=kernel)
    clm = build_model(ModelConfig(kind="clm", chunk_len=6, n_chunks=2, decoder=body, tie_embeddings=tied), V).eval()
    ids = torch.randint(0, V, (3, 12))
    with torch.no_grad():
        lm_hidden = clm.norm(clm(ids))  # [3, 12, 16]: what the LM's head reads
    for length in (12, 5):  # the full context, and a prefix of it
        probe = build_model(probe_cfg(arch, length, memory_position=-2).model_copy(update={"encoder": body}), V).eval()
        probe.load_encoder_state(clm.state_dict(), "clm")
        with torch.no_grad():
            assert torch.allclose(probe.encode(ids[:, :length]), lm_hidden[:, length - 2], atol=1e-5)


def test_encoder_sources_without_an_encoder_are_one_line_errors():
    ae = build_model(probe_cfg("mixer", 8), V)
    with pytest.raises(UserError, match="kind 'retriever' has no encoder"):
        encoder_state_from(ae.state_dict(), "retriever")
    no_mem = build_model(ModelConfig(kind="memory", chunk_len=8, n_chunks=2, no_memory=True), V)
    with pytest.raises(UserError, match="holds no encoder parameters.*no_memory"):
        ae.load_encoder_state(no_mem.state_dict(), "memory")
    short = build_model(
        ModelConfig(
            kind="clm", chunk_len=4, n_chunks=1, decoder=StackConfig(arch="mixer", d_model=16, n_layers=2, n_heads=2)
        ),
        V,
    )
    with pytest.raises(UserError, match=r"conv\.weight has shape \(2, 4, 4, 1\).*\(2, 8, 8, 1\)"):
        ae.load_encoder_state(short.state_dict(), "clm")


def test_batch_transform_reaches_training_and_held_out_batches(tiny_data, tmp_path):
    seen = []

    def transform(ids: torch.Tensor) -> torch.Tensor:
        seen.append(ids.shape)
        return torch.full_like(ids, 7)  # every row becomes one repeated token: trivially predictable

    summary = train(
        tiny_config(
            tiny_data.shards,
            tmp_path / "run",
            "train.steps=30",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "optim.lr=1e-2",
        ),
        batch_transform=transform,
    )
    assert len(seen) == 30 + 2 and all(s == (4, 32) for s in seen)  # 30 steps + 2 held-out batches
    assert summary["eval"]["causal"]["accuracy"] == 1.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in logged if r["kind"] == "train"][-1]["accuracy/causal"] > 0.9
