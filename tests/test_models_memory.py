"""Whole models: chunk folding == per-chunk loop, cross-chunk causality, frozen encoders, labels, groups, ties."""

from __future__ import annotations

import pytest
import torch

from memtrain.config import ModelConfig, StackConfig
from memtrain.errors import UserError
from memtrain.models import Autoencoder, CausalLM, MemoryModel, MemtrainModel, build_model

V = 37


def stack(arch: str, d: int = 16, k: int = 1, h: int | None = None) -> StackConfig:
    heads = (2 if arch == "transformer" else 0) if h is None else h
    return StackConfig(arch=arch, d_model=d, n_layers=2, kernel=k, n_heads=heads)


def memory_cfg(dec_arch: str = "mixer", enc_arch: str = "mixer", **kw) -> ModelConfig:
    enc = stack(enc_arch, 16, k=3 if enc_arch == "mixer" else 1)
    base = dict(kind="memory", chunk_len=6, n_chunks=4, encoder=enc, decoder=stack(dec_arch, 24))
    base.update(kw)
    return ModelConfig(**base)


def chunk_loop(model: MemoryModel, ids: torch.Tensor) -> torch.Tensor:
    """The reference's sequential algorithm (docs/reference.md §4.1), with our output alignment, using the model's own parts."""
    C, L, d = model.cfg.n_chunks, model.cfg.chunk_len, model.cfg.decoder.d_model
    B = ids.shape[0]
    chunks = [ids[:, c * L : (c + 1) * L] for c in range(C)]
    memories = [] if model.encoder is None else [model.decoder_proj(model.encoder(chunks[c])) for c in range(C - 1)]
    outputs = []
    for c in range(C):
        slots = [memories[j] if j < c and memories else torch.zeros(B, d) for j in range(C)]
        x = torch.cat([torch.stack(slots, dim=1), model.decoder_wte(chunks[c])], dim=1)  # [B, C+L, d]
        outputs.append(model.decoder(x)[:, C - 1 : C + L - 1])
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("dec_arch", ["mixer", "transformer"])
@pytest.mark.parametrize("no_memory", [False, True])
def test_folded_memory_model_equals_chunk_loop(dec_arch, no_memory):
    torch.manual_seed(0)
    model = build_model(memory_cfg(dec_arch, no_memory=no_memory, compression=2, memory_position=-2), V)
    ids = torch.randint(0, V, (3, model.cfg.seq_len))
    with torch.no_grad():  # fp32, different matmul shapes: summation order differs at the 1e-5 level
        torch.testing.assert_close(model(ids), chunk_loop(model, ids), rtol=1e-4, atol=5e-5)


def test_folded_memory_model_equals_chunk_loop_transformer_encoder():
    torch.manual_seed(0)
    model = build_model(memory_cfg("mixer", enc_arch="transformer"), V)
    ids = torch.randint(0, V, (2, model.cfg.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), chunk_loop(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dec_arch", ["mixer", "transformer"])
def test_memory_model_cross_chunk_causality(dec_arch):
    torch.manual_seed(0)
    model = build_model(memory_cfg(dec_arch), V)
    C, L = model.cfg.n_chunks, model.cfg.chunk_len
    ids = torch.randint(0, V, (2, C * L))
    with torch.no_grad():
        h = model(ids).view(2, C, L, -1)

        def perturbed(chunk: int, pos: int) -> torch.Tensor:
            ids2 = ids.clone()
            ids2[:, chunk * L + pos] = (ids2[:, chunk * L + pos] + 1) % V
            return model(ids2).view(2, C, L, -1)

        h2 = perturbed(2, 1)  # a token of chunk 2
        assert torch.equal(h2[:, :2], h[:, :2]), "chunk 2 leaked into chunks 0-1"
        assert not torch.equal(h2[:, 3], h[:, 3]), "chunk 2 must reach chunk 3 through its memory"

        h3 = perturbed(0, 3)  # chunk 0, position 3: output j predicts token j, so outputs 0..3 must not see it
        assert torch.equal(h3[:, 0, :4], h[:, 0, :4])
        assert not torch.equal(h3[:, 0, 4:], h[:, 0, 4:])
        for c in (1, 2, 3):
            assert not torch.equal(h3[:, c], h[:, c]), f"chunk 0 must reach chunk {c} through its memory"

        for chunk, pos in ((1, 0), (3, 5), (2, 4)):  # output j of a chunk depends only on tokens < j of it
            hp = perturbed(chunk, pos)
            assert torch.equal(hp[:, :chunk], h[:, :chunk])
            assert torch.equal(hp[:, chunk, : pos + 1], h[:, chunk, : pos + 1])


@pytest.mark.parametrize("arch", ["mixer", "transformer"])
def test_clm_is_causal(arch):
    torch.manual_seed(0)
    dec = stack(arch, 16, k=2 if arch == "mixer" else 1)
    model = build_model(ModelConfig(kind="clm", chunk_len=6, n_chunks=3, decoder=dec), V)
    ids = torch.randint(0, V, (2, 18))
    with torch.no_grad():
        h = model(ids)
        for p in (0, 7, 17):
            ids2 = ids.clone()
            ids2[:, p] = (ids2[:, p] + 1) % V
            h2 = model(ids2)
            assert torch.equal(h2[:, :p], h[:, :p])
            assert not torch.equal(h2[:, p], h[:, p])


def test_frozen_encoder_gets_no_grad_and_memories_do_not_require_grad():
    torch.manual_seed(0)
    model = build_model(memory_cfg(), V)
    model.freeze(["encoder"])
    assert model.encoder_frozen()
    ids = torch.randint(0, V, (2, model.cfg.seq_len))
    assert not model.encode(ids).requires_grad
    model.logits(model(ids)).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decoder_wte.weight.grad is not None and model.lm_head.weight.grad is not None
    model.freeze([])
    assert not model.encoder_frozen() and model.encode(ids).requires_grad


@pytest.mark.parametrize("kind", ["memory", "autoencoder"])
def test_encode_then_forward_with_memories_equals_forward(kind):
    torch.manual_seed(0)
    if kind == "memory":
        cfg = memory_cfg("transformer", compression=4)
    else:
        cfg = ModelConfig(
            kind="autoencoder",
            chunk_len=8,
            n_chunks=1,
            encoder=stack("mixer", 16, k=4, h=2),
            decoder=stack("mixer", 24),
            injection="unroll",
            compression=2,
        )
    model = build_model(cfg, V)
    ids = torch.randint(0, V, (3, cfg.seq_len))
    with torch.no_grad():
        memories = model.encode(ids)
        expected_shape = (3, cfg.n_chunks - 1, 16) if kind == "memory" else (3, 16)
        assert memories.shape == expected_shape
        assert torch.equal(model(ids, memories=memories), model(ids))


@pytest.mark.parametrize("injection", ["repeat", "unroll"])
@pytest.mark.parametrize("arch", ["mixer", "transformer"])
def test_autoencoder_shapes_and_decoder_sees_only_the_memory(injection, arch):
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="autoencoder",
        chunk_len=8,
        n_chunks=1,
        encoder=stack(arch, 16),
        decoder=stack(arch, 16),
        injection=injection,
    )
    model = build_model(cfg, V)
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        h = model(ids)
        assert h.shape == (2, 8, 16) and model.logits(h).shape == (2, 8, V)
        ids2 = ids.clone()
        ids2[:, 2] = (ids2[:, 2] + 1) % V
        assert torch.equal(model(ids2, memories=model.encode(ids)), h)  # no token input to the decoder


def test_align_labels():
    targets = torch.arange(12).view(2, 6)
    clm = build_model(ModelConfig(kind="clm", chunk_len=3, n_chunks=2, decoder=stack("mixer")), V)
    ae = build_model(ModelConfig(kind="autoencoder", chunk_len=6, n_chunks=1), V)
    mem = build_model(ModelConfig(kind="memory", chunk_len=3, n_chunks=2), V)
    assert (clm.label_shift, ae.label_shift, mem.label_shift) == (1, 0, 0)
    assert clm.align_labels(targets).tolist() == [[1, 2, 3, 4, 5, -100], [7, 8, 9, 10, 11, -100]]
    assert torch.equal(ae.align_labels(targets), targets)
    assert mem.align_labels(targets).tolist() == [[-100, 1, 2, 3, 4, 5], [-100, 7, 8, 9, 10, 11]]
    assert targets[0, 0] == 0, "align_labels must not modify its input"


def test_build_model_kinds_and_encode_on_clm():
    for kind, cls in (("memory", MemoryModel), ("autoencoder", Autoencoder), ("clm", CausalLM)):
        n = 1 if kind == "autoencoder" else 2
        model = build_model(ModelConfig(kind=kind, chunk_len=4, n_chunks=n), V)
        assert isinstance(model, cls) and isinstance(model, MemtrainModel) and model.kind == kind
        assert model.vocab_size == V and model.cfg.kind == kind
    with pytest.raises(TypeError):
        model.encode(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("kind", ["memory", "autoencoder", "clm"])
def test_module_groups_cover_every_parameter_and_freeze(kind):
    n = 1 if kind == "autoencoder" else 3
    model = build_model(
        ModelConfig(kind=kind, chunk_len=4, n_chunks=n, encoder=stack("mixer", 16), decoder=stack("transformer", 24)), V
    )
    groups = model.module_groups()
    assert set(groups) == {"encoder", "decoder", "embeddings", "head"}
    covered = {id(p) for params in groups.values() for p in params}
    assert covered == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups["head"]} == {id(p) for p in [*model.norm.parameters(), model.lm_head.weight]}
    if kind == "clm":
        assert groups["encoder"] == []
    else:
        assert {id(p) for p in groups["encoder"]} == {id(p) for p in model.encoder.parameters()}
    model.freeze(["embeddings", "head"])
    frozen = {id(p) for p in groups["embeddings"] + groups["head"]}
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    with pytest.raises(ValueError):
        model.freeze(["encoders"])


def test_tie_embeddings():
    clm = build_model(ModelConfig(kind="clm", chunk_len=4, n_chunks=2, tie_embeddings=True), V)
    assert clm.lm_head.weight is clm.wte.weight
    mem = build_model(ModelConfig(kind="memory", chunk_len=4, n_chunks=2, tie_embeddings=True), V)
    assert mem.lm_head.weight is mem.decoder_wte.weight
    assert (
        sum(p.numel() for p in mem.parameters())
        == sum(p.numel() for p in build_model(ModelConfig(kind="memory", chunk_len=4, n_chunks=2), V).parameters())
        - V * 128
    )
    ae = build_model(ModelConfig(kind="autoencoder", chunk_len=4, n_chunks=1, tie_embeddings=True), V)
    assert ae.lm_head.weight is ae.encoder.wte.weight
    with pytest.raises(UserError, match="tie_embeddings"):
        build_model(
            ModelConfig(
                kind="autoencoder",
                chunk_len=4,
                n_chunks=1,
                tie_embeddings=True,
                encoder=stack("mixer", 16),
                decoder=stack("mixer", 24),
            ),
            V,
        )


def test_load_encoder_state_from_autoencoder_and_memory_model():
    torch.manual_seed(0)
    enc = stack("mixer", 16, k=3)
    ae = build_model(
        ModelConfig(
            kind="autoencoder", chunk_len=6, n_chunks=1, encoder=enc, decoder=stack("mixer", 24), compression=2
        ),
        V,
    )
    mem = build_model(memory_cfg(encoder=enc, compression=2), V)
    ids = torch.randint(0, V, (2, mem.cfg.seq_len))
    mem.load_encoder_state(ae.state_dict(), "autoencoder")
    with torch.no_grad():
        chunks = ids[:, :18].reshape(6, 6)
        assert torch.equal(mem.encode(ids).reshape(6, 16), ae.encode(chunks))
    mem2 = build_model(memory_cfg(encoder=enc, compression=2), V)
    mem2.load_encoder_state({"module." + k: v for k, v in mem.state_dict().items()}, "memory")
    with torch.no_grad():
        assert torch.equal(mem2.encode(ids), mem.encode(ids))

    wrong_len = build_model(ModelConfig(kind="autoencoder", chunk_len=8, n_chunks=1, encoder=enc, compression=2), V)
    with pytest.raises(UserError, match=r"encoder\.blocks\.0\.conv\.weight has shape \(8, 8, 3\).*\(6, 6, 3\)"):
        mem.load_encoder_state(wrong_len.state_dict(), "autoencoder")
    no_bottleneck = build_model(ModelConfig(kind="autoencoder", chunk_len=6, n_chunks=1, encoder=enc), V)
    with pytest.raises(UserError, match="missing"):
        mem.load_encoder_state(no_bottleneck.state_dict(), "autoencoder")
    with pytest.raises(UserError, match="no encoder"):
        mem.load_encoder_state(ae.state_dict(), "retriever")
    with pytest.raises(UserError, match="no encoder"):
        build_model(memory_cfg(no_memory=True), V).load_encoder_state(ae.state_dict(), "autoencoder")


def test_no_memory_model_has_no_encoder():
    model = build_model(memory_cfg(no_memory=True), V)
    assert model.encoder is None and model.module_groups()["encoder"] == []
    with pytest.raises(TypeError):
        model.encode(torch.zeros(1, model.cfg.seq_len, dtype=torch.long))


def test_memory_model_trains_chunk_initial_tokens():
    """Every position of every chunk gets a finite loss and gradient; only the row's first token is ignored."""
    torch.manual_seed(0)
    model = build_model(memory_cfg("transformer"), V)
    ids = torch.randint(0, V, (2, model.cfg.seq_len))
    labels = model.align_labels(ids)
    logits = model.logits(model(ids))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(2, -1)
    assert torch.all(loss[:, 0] == 0) and torch.all(loss[:, 1:] > 0)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
