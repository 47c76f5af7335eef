"""Objective tensors, weighted losses and curriculum stages, against small fake models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memtrain.config import PRESETS, ObjectiveConfig, ObjectiveWeights, StageConfig
from memtrain.errors import UserError
from memtrain.objectives import (
    SpecialTokens,
    check_task,
    compute_losses,
    make_task,
    special_tokens,
    stage_at,
    task_chunks,
)

IGN = -100


class FakeModel(nn.Module):
    """Embedding + linear head obeying the memtrain model interface; records what reaches the head.

    clm: hidden[:, t] = emb(x[:, t]) and predicts position t+1 (label_shift 1).
    memory / autoencoder: hidden[:, t] = emb(x[:, t-1]) (zeros at t = 0) and predicts position t.
    ``chunk_first_unscored`` masks the first token of every chunk, as the reference memory model does.
    """

    def __init__(
        self,
        kind: str,
        vocab: int = 32,
        d: int = 8,
        n_chunks: int = 4,
        chunk_len: int = 4,
        chunk_first_unscored: bool = False,
    ):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.label_shift = 1 if kind == "clm" else 0
        self.vocab_size = vocab
        self.cfg = SimpleNamespace(n_chunks=n_chunks, chunk_len=chunk_len)
        self.chunk_first_unscored = chunk_first_unscored
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)
        self.head_inputs: list[torch.Tensor] = []
        self.hiddens: list[torch.Tensor] = []
        self.calls: list[tuple[torch.Tensor, object]] = []

    def forward(self, input_ids, memories=None):
        self.calls.append((input_ids.clone(), memories))
        h = self.emb(input_ids)
        if self.kind != "clm":
            h = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        self.hiddens.append(h.detach().clone())
        return h

    def logits(self, hidden):
        self.head_inputs.append(hidden.detach().clone())
        return self.head(hidden)

    def align_labels(self, targets):
        if self.kind == "clm":
            return torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], IGN)], dim=1)
        labels = targets.clone()
        if self.kind == "memory":
            labels[:, 0] = IGN
            if self.chunk_first_unscored:
                labels[:, :: self.cfg.chunk_len] = IGN
        return labels


REF = SpecialTokens(pad_id=1, delimiter_id=100, n_delimiters=3, filler_id=1)


# ----------------------------------------------------------------------------------------------------
# Task tensors


def test_reference_worked_example():
    """docs/reference.md §4.2: N=16, ids 10..25, delimiter 100 x 3, filler 1."""
    ids = torch.arange(10, 26).unsqueeze(0)
    before = ids.clone()
    copy_in, copy_tgt = make_task("copy", ids, REF)
    blank_in, blank_tgt = make_task("blank_copy", ids, REF)

    ref_copy_in = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17, 100, 100, 100, 13, 14, 15, 16, 17]])
    ref_blank_in = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17, 100, 100, 100, 1, 1, 1, 1, 1]])
    ref_labels = torch.tensor([[IGN] * 8 + [IGN, IGN, 12, 13, 14, 15, 16, 17]])
    assert torch.equal(copy_in, ref_copy_in)
    assert torch.equal(blank_in, ref_blank_in)
    assert torch.equal(copy_tgt, torch.tensor([[IGN] * 8 + [IGN, IGN, IGN, 13, 14, 15, 16, 17]]))
    assert torch.equal(blank_tgt, copy_tgt)
    assert torch.equal(ids, before)
    # our targets equal the reference's labels except at the last delimiter position, where the reference
    # (masking one position early) scores the replaced token 12
    differ = (copy_tgt != ref_labels).nonzero()[:, 1].tolist()
    assert differ == [10]

    # equivalence for a causal LM (hidden[:, t] scored against the token at t + 1)
    clm = FakeModel("clm", vocab=128)
    ours = clm.align_labels(copy_tgt)
    ref_pairs = torch.cat([ref_labels[:, 1:], torch.tensor([[IGN]])], dim=1)  # HF: logits[t] vs labels[t+1]
    sup = ours != IGN
    # every hidden position we score is scored by the reference against the same token ...
    assert torch.equal(ours[sup], ref_pairs[sup])
    assert ours[0, 10:15].tolist() == [13, 14, 15, 16, 17]
    # ... and the reference scores exactly one more: hidden 9 (second delimiter) -> 12
    assert ((ref_pairs != IGN) & ~sup).nonzero()[:, 1].tolist() == [9]
    assert ref_pairs[0, 9].item() == 12
    # our unscored hidden positions are exactly the reference's masked label indices read in the
    # shifted convention (hidden 7, 8, 9 = the positions whose next input is a delimiter)
    assert torch.equal((ours == IGN)[:, :15], (ref_labels == IGN)[:, :15])
    assert ((ours == IGN)[0, 7:10]).all()


def test_copy_on_memory_model_shaped_rows():
    """C = 4 chunks of L = 4: chunks 0-1 are the source, chunks 2-3 the copy; pads are never targets."""
    sp = SpecialTokens(pad_id=0, delimiter_id=30, n_delimiters=1, filler_id=31)
    torch.manual_seed(1)
    ids = torch.randint(2, 30, (3, 16))
    ids[1, 5:] = 0  # row 1: padding from position 5 on (in the source half)
    before = ids.clone()

    inp, tgt = make_task("copy", ids, sp, n_chunks=4)
    assert torch.equal(inp[:, :8], ids[:, :8])
    assert (inp[:, 8] == 30).all()
    assert torch.equal(inp[:, 9:], ids[:, 1:8])
    assert (tgt[:, :9] == IGN).all()
    expect = ids[:, 1:8].masked_fill(ids[:, 1:8] == 0, IGN)
    assert torch.equal(tgt[:, 9:], expect)
    assert (tgt[1, 13:] == IGN).all() and (tgt[1, 9:13] != IGN).all()

    b_inp, b_tgt = make_task("blank_copy", ids, sp, n_chunks=4)
    assert torch.equal(b_inp[:, :9], inp[:, :9])
    assert (b_inp[:, 9:] == 31).all()
    assert torch.equal(b_tgt, tgt)
    assert torch.equal(ids, before)

    # halves that are not whole chunks, odd rows, too many delimiters
    with pytest.raises(ValueError, match="even number of chunks"):
        make_task("copy", torch.zeros(2, 12, dtype=torch.long), sp, n_chunks=3)
    make_task("copy", torch.zeros(2, 12, dtype=torch.long), sp)  # no chunks: only T must be even
    with pytest.raises(ValueError, match="row length must be even"):
        make_task("blank_copy", torch.zeros(2, 15, dtype=torch.long), sp)
    with pytest.raises(ValueError, match="n_delimiters"):
        make_task("copy", ids, SpecialTokens(0, 30, 8, 31), n_chunks=4)
    with pytest.raises(UserError):  # reaches the CLI as a one-line message
        check_task("copy", 16, sp, n_chunks=3)
    with pytest.raises(ValueError, match="unknown objective"):
        make_task("copy_paste", ids, sp)


def test_task_chunks_only_constrains_memory_models():
    assert task_chunks(FakeModel("memory", n_chunks=4)) == 4
    clm = FakeModel("clm", n_chunks=3, chunk_len=4)  # context 12: copy halves of 6 are fine
    assert task_chunks(clm) is None
    make_task("copy", torch.zeros(1, 12, dtype=torch.long), REF, task_chunks(clm))


def test_causal_and_reconstruction_mask_pads():
    sp = SpecialTokens(pad_id=0, delimiter_id=30, n_delimiters=1, filler_id=31)
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 4]])
    before = ids.clone()
    for name in ("causal", "reconstruction"):
        inp, tgt = make_task(name, ids, sp)
        assert torch.equal(inp, ids)
        assert tgt.tolist() == [[5, 6, 7, IGN, IGN], [IGN, IGN, 8, 9, 4]]
        inp[0, 0] = 99
        assert torch.equal(ids, before)


def test_special_tokens_fall_back_to_the_tokenizer():
    specials = {"pad": 0, "eos": 2, "bos": 3, "unk": 4, "sep": 5, "blank": 6}
    sp = special_tokens(ObjectiveConfig(), specials)
    assert sp == SpecialTokens(pad_id=0, delimiter_id=5, n_delimiters=1, filler_id=6)
    sp = special_tokens(ObjectiveConfig(delimiter_id=100, n_delimiters=3, filler_id=1), specials)
    assert sp == SpecialTokens(pad_id=0, delimiter_id=100, n_delimiters=3, filler_id=1)
    with pytest.raises(UserError, match="sep"):
        special_tokens(ObjectiveConfig(), {**specials, "sep": None})


# ----------------------------------------------------------------------------------------------------
# Losses

SP = SpecialTokens(pad_id=0, delimiter_id=30, n_delimiters=1, filler_id=31)


def _ids(B=3, T=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 30, (B, T), generator=g)
    ids[2, 12:] = 0
    return ids


@pytest.mark.parametrize("kind", ["memory", "clm"])
def test_compute_losses_total_grads_and_supervised_rows(kind):
    model = FakeModel(kind)
    ids = _ids()
    before = ids.clone()
    weights = {"causal": 1.0, "copy": 0.5, "blank_copy": 0.25}
    total, parts = compute_losses(model, ids, weights, SP)
    assert list(parts) == ["causal", "copy", "blank_copy"]
    assert len(model.calls) == 3  # one forward pass per objective
    assert torch.equal(ids, before)

    expect_total = sum(w * parts[k].loss for k, w in weights.items())
    assert torch.allclose(total, expect_total)

    for k, (name, stats) in enumerate(parts.items()):
        inputs, targets = make_task(name, ids, SP, n_chunks=4 if kind == "memory" else None)
        assert torch.equal(model.calls[k][0], inputs)
        labels = model.align_labels(targets)
        mask = labels != IGN
        # only supervised rows reached the head, in order
        assert torch.equal(model.head_inputs[k], model.hiddens[k][mask])
        assert stats.n_tokens == int(mask.sum()) == model.head_inputs[k].shape[0]
        # the loss is the token-pooled mean CE
        full = model.head(model.hiddens[k])
        ref = F.cross_entropy(full.reshape(-1, 32), labels.reshape(-1), ignore_index=IGN)
        assert torch.allclose(stats.loss, ref, atol=1e-6)
        assert math.isclose(float(stats.ce_sum), float(ref.detach()) * stats.n_tokens, rel_tol=1e-5)
        pred = full.argmax(-1)
        assert int(stats.n_correct) == int(((pred == labels) & mask).sum())
        row_ok = ((pred == labels) | ~mask).all(1) & mask.any(1)
        assert int(stats.n_rows_exact) == int(row_ok.sum()) and int(stats.n_rows) == int(mask.any(1).sum())
        assert stats.weight == weights[name]
        assert stats.loss.dtype == torch.float32

    total.backward()
    assert model.emb.weight.grad is not None and model.emb.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_compute_losses_weights_and_memories():
    model = FakeModel("memory")
    ids = _ids()
    total, parts = compute_losses(model, ids, ObjectiveWeights(causal=0.0, copy=2.0), SP)
    assert list(parts) == ["copy"] and torch.allclose(total, 2.0 * parts["copy"].loss)

    mem = torch.randn(3, 4, 8)
    compute_losses(model, ids, {"causal": 1.0}, SP, memories=mem)
    assert model.calls[-1][1] is mem
    for name in ("copy", "blank_copy"):
        with pytest.raises(ValueError, match="precomputed memories"):
            compute_losses(model, ids, {"causal": 1.0, name: 0.5}, SP, memories=mem)
    with pytest.raises(ValueError, match="weight > 0"):
        compute_losses(model, ids, {"causal": 0.0}, SP)


def test_compute_losses_without_supervised_tokens_is_a_connected_zero():
    model = FakeModel("autoencoder", n_chunks=1, chunk_len=6)
    ids = torch.zeros(2, 6, dtype=torch.long)  # all pad
    total, parts = compute_losses(model, ids, {"reconstruction": 1.0}, SP)
    assert parts["reconstruction"].n_tokens == 0 and total.item() == 0.0
    total.backward()
    assert model.head.weight.grad is not None


class FixedLogitModel:
    """A memory model with fixed logits: logits[b, t] = P[t] + Q[x[b, t-1]]; the first token of every chunk
    is never scored (the reference's chunk layout, so every chunk has L - 1 scored tokens)."""

    kind, label_shift, vocab_size = "memory", 0, 40

    def __init__(self, C=4, L=4):
        g = torch.Generator().manual_seed(3)
        self.cfg = SimpleNamespace(n_chunks=C, chunk_len=L)
        self.P = torch.randn(C * L, self.vocab_size, generator=g)
        self.Q = torch.randn(self.vocab_size, self.vocab_size, generator=g)

    def __call__(self, x, memories=None):
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        pos = torch.arange(x.shape[1]).expand_as(x)
        return torch.stack([pos, prev], dim=-1).float()  # hidden [B, T, 2] = (position, previous token)

    def logits(self, h):
        return self.P[h[..., 0].long()] + self.Q[h[..., 1].long()]

    def align_labels(self, targets):
        labels = targets.clone()
        labels[:, :: self.cfg.chunk_len] = IGN
        return labels


def _reference_objective_loss(model, name, ids, special):
    """The reference's per-objective loss: per-chunk mean CE, summed over supervised chunks, divided by C."""
    inputs, targets = make_task(name, ids, special, model.cfg.n_chunks)
    logits, labels = model.logits(model(inputs)), model.align_labels(targets)
    C, L = model.cfg.n_chunks, model.cfg.chunk_len
    total = 0.0
    for c in range(C):
        lab = labels[:, c * L : (c + 1) * L]
        if (lab == IGN).all():
            continue  # skipped chunk, still divided by C
        total += F.cross_entropy(
            logits[:, c * L : (c + 1) * L].reshape(-1, model.vocab_size), lab.reshape(-1), ignore_index=IGN
        )
    return total / C


@pytest.mark.parametrize(
    "copy_name,preset", [("copy", "reference_combined"), ("blank_copy", "reference_blank_combined")]
)
def test_reference_combined_weighting(copy_name, preset):
    """L_ref = L_clm + L_copy (docs/reference.md §4.3) equals our total with the preset weights when every
    supervised chunk has the same number of scored tokens."""
    model = FixedLogitModel()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 30, (2, 16), generator=g)  # no padding
    sp = SpecialTokens(pad_id=0, delimiter_id=30, n_delimiters=1, filler_id=31)  # delimiter on a chunk start
    l_ref = _reference_objective_loss(model, "causal", ids, sp) + _reference_objective_loss(model, copy_name, ids, sp)
    total, parts = compute_losses(model, ids, PRESETS[preset], sp)
    assert PRESETS[preset] == {"causal": 1.0, copy_name: 0.5}
    assert torch.allclose(total, l_ref, atol=1e-6)

    # with 3 delimiters chunk 2 scores fewer tokens than chunk 3: the reference weights chunks equally,
    # we weight tokens equally, and the two differ
    sp3 = SpecialTokens(pad_id=0, delimiter_id=30, n_delimiters=3, filler_id=31)
    l_ref3 = _reference_objective_loss(model, "causal", ids, sp3) + _reference_objective_loss(
        model, copy_name, ids, sp3
    )
    total3, _ = compute_losses(model, ids, PRESETS[preset], sp3)
    assert not torch.allclose(total3, l_ref3, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Curriculum


def _stages(*steps):
    return [StageConfig(name=f"s{k}", steps=n, weights=ObjectiveWeights(causal=1.0)) for k, n in enumerate(steps)]


def test_stage_at_boundaries():
    stages = _stages(3, 5, 2)
    cases = {0: (0, 0), 2: (0, 2), 3: (1, 0), 7: (1, 4), 8: (2, 0), 9: (2, 1), 10: (2, 2), 100: (2, 92)}
    for step, (k, in_stage) in cases.items():
        idx, stage, s = stage_at(stages, step)
        assert (idx, s) == (k, in_stage) and stage is stages[k], step
    assert stage_at(_stages(4), 4)[::2] == (0, 4)
    with pytest.raises(ValueError):
        stage_at(stages, -1)
    with pytest.raises(ValueError):
        stage_at([], 0)
