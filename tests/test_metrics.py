"""Metric values on hand-made logits, pooling, information ratios and greedy regeneration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memtrain.metrics import (
    MetricAccumulator,
    bits_per_token,
    cross_entropy,
    cross_entropy_sum,
    exact_match,
    greedy_regenerate,
    information_ratio,
    paper_information_ratio,
    token_accuracy,
    uniform_logit_ce,
)
from memtrain.objectives import ObjectiveStats

IGN = -100

# two rows, two positions, V = 3; row 1's second position is not supervised
LOGITS = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
LABELS = torch.tensor([[0, 2], [2, IGN]])


def _hand_ce():
    e = math.e
    terms = [-2 + math.log(e**2 + 2), -0 + math.log(1 + e + 1), -3 + math.log(2 + e**3)]
    return sum(terms) / 3


def test_accuracy_ce_exact_match_on_hand_made_logits():
    pred = LOGITS.argmax(-1)
    assert pred.tolist() == [[0, 1], [2, 0]]
    assert token_accuracy(pred, LABELS) == pytest.approx(2 / 3)
    assert cross_entropy(LOGITS, LABELS).item() == pytest.approx(_hand_ce(), rel=1e-6)
    ce_sum, n = cross_entropy_sum(LOGITS, LABELS)
    assert int(n) == 3 and ce_sum.item() == pytest.approx(3 * _hand_ce(), rel=1e-6)
    assert exact_match(pred, LABELS) == (1, 2)  # row 0 has a miss; row 1 all correct
    assert exact_match(pred, torch.full_like(LABELS, IGN)) == (0, 0)
    assert math.isnan(token_accuracy(pred, torch.full_like(LABELS, IGN)))
    # bf16 logits are scored in fp32
    assert cross_entropy(LOGITS.bfloat16(), LABELS).dtype == torch.float32


def test_information_ratios_and_bits():
    V = 8000
    assert information_ratio(0.0, V) == 1.0
    assert information_ratio(math.log(V), V) == pytest.approx(0.0)
    assert information_ratio(math.log(V) / 2, V) == pytest.approx(0.5)
    assert uniform_logit_ce(V) == pytest.approx(math.log(V) + 0.0413, abs=1e-4)
    assert round(uniform_logit_ce(V), 2) == 9.03  # the paper's constant
    assert paper_information_ratio(9.03, V) == pytest.approx(0.0, abs=3e-4)
    assert paper_information_ratio(1.0, V) == pytest.approx(1 - 1 / 9.0285, abs=1e-4)
    assert bits_per_token(math.log(2)) == pytest.approx(1.0)
    assert bits_per_token(math.log(8000)) == pytest.approx(math.log2(8000))


def test_uniform_logit_ce_monte_carlo():
    """E[CE] of U[0,1) logits with a uniformly random target is ln V + ln(e-1) - 1/2 (9.028 at V = 8000)."""
    V, rows, per = 8000, 16384, 2048
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(rows // per):
        logits = torch.rand(per, V, generator=g)
        target = torch.randint(0, V, (per,), generator=g)
        total += F.cross_entropy(logits, target, reduction="sum").item()
    assert total / rows == pytest.approx(uniform_logit_ce(V), abs=0.01)
    assert total / rows == pytest.approx(9.03, abs=0.01)


def test_accumulator_pools_unequal_batches():
    acc = MetricAccumulator(vocab_size=4)
    # batch A: 1 token, correct, CE a; batch B: 3 tokens, all wrong, CE b each
    la = torch.tensor([[[3.0, 0.0, 0.0, 0.0]]])
    lb = torch.tensor([[[0.0, 2.0, 0.0, 0.0]] * 3])
    acc.update("copy", la, torch.tensor([[0]]))
    acc.update("copy", lb, torch.tensor([[0, 0, 0]]))
    out = acc.compute()["copy"]
    a = -3 + math.log(math.exp(3) + 3)
    b = math.log(math.exp(2) + 3)
    assert out["accuracy"] == pytest.approx(1 / 4)  # micro-average, not (1 + 0) / 2
    assert out["ce"] == pytest.approx((a + 3 * b) / 4, rel=1e-6)  # not (a + b) / 2
    assert out["tokens"] == 4 and out["rows"] == 2
    assert out["exact_match"] == pytest.approx(0.5)
    assert out["I_e"] == pytest.approx(1 - out["ce"] / math.log(4))
    assert out["I_e_paper"] == pytest.approx(paper_information_ratio(out["ce"], 4))
    assert out["bits_per_token"] == pytest.approx(out["ce"] / math.log(2))

    # integer predictions add counts but no CE
    acc.update("greedy", torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, IGN]]))
    acc.update("greedy", torch.tensor([[1]]), torch.tensor([[1]]))
    g = acc.compute()["greedy"]
    assert g["accuracy"] == pytest.approx(2 / 3) and g["tokens"] == 3 and math.isnan(g["ce"])
    assert g["exact_match"] == pytest.approx(0.5)

    # from ObjectiveStats (the loss computation's detached counts)
    acc.reset()
    for n, ce, correct in ((2, 1.0, 2), (6, 0.5, 3)):
        acc.update(
            "causal",
            ObjectiveStats(
                loss=torch.tensor(ce),
                n_tokens=n,
                n_correct=torch.tensor(correct),
                ce_sum=torch.tensor(ce * n),
                n_rows_exact=torch.tensor(1),
                n_rows=torch.tensor(2),
            ),
        )
    c = acc.compute()["causal"]
    assert c["ce"] == pytest.approx((2 * 1.0 + 6 * 0.5) / 8)
    assert c["accuracy"] == pytest.approx(5 / 8) and c["exact_match"] == pytest.approx(2 / 4)


def test_accumulator_all_reduce_single_rank(tmp_path):
    import torch.distributed as dist

    acc = MetricAccumulator(vocab_size=3)
    acc.update("copy", LOGITS, LABELS)
    before = acc.compute()
    acc.all_reduce()  # not initialised: no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        acc.all_reduce()
    finally:
        dist.destroy_process_group()
    assert acc.compute() == before


# ----------------------------------------------------------------------------------------------------
# Greedy regeneration


class Echo:
    """Predicts its own input: clm/autoencoder: argmax at t = x[t]; memory (label_shift 0): argmax at t = x[t-1].

    For a clm this means "the next token repeats the current one", so teacher forcing is right wherever the
    text repeats, while free running copies the first prediction forward forever."""

    def __init__(self, kind, V=10):
        self.kind, self.V, self.calls = kind, V, 0
        self.label_shift = 1 if kind == "clm" else 0

    def __call__(self, x, memories=None):
        self.calls += 1
        src = x if self.kind != "memory" else torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return F.one_hot(src, self.V).float()

    def logits(self, h):
        return h


IDS = torch.tensor([[3, 3, 3, 5, 5, 5, 7, 7], [4, 6, 6, 6, 6, 6, 6, 6], [2, 2, 2, 2, 2, 9, 9, 9]])


def _targets():
    t = IDS.clone()
    t[:, :2] = IGN  # a two-token prompt
    t[2, :6] = IGN  # row 2 is scored only at its last two positions
    return t


def test_greedy_clm_free_running_differs_from_teacher_forcing():
    model = Echo("clm")
    targets = _targets()
    labels = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], IGN)], dim=1)  # clm alignment
    before = IDS.clone()

    tf_pred = model.logits(model(IDS)).argmax(-1)
    assert token_accuracy(tf_pred, labels) == pytest.approx(12 / 14)  # row 0: 4/6, row 1: 6/6, row 2: 2/2

    model.calls = 0
    free = greedy_regenerate(model, IDS, labels)
    assert model.calls == 6  # one pass per supervised column (1..6)
    assert free[0, 1:7].tolist() == [3] * 6  # row 0 keeps copying its first prediction
    assert free[1, 1:7].tolist() == [6] * 6
    assert free[2, 5:7].tolist() == [9, 9]  # row 2's unsupervised inputs were left alone
    assert (free[:, [0, 7]] == IGN).all()
    assert token_accuracy(free, labels) == pytest.approx(9 / 14)  # row 0: 1/6
    assert exact_match(free, labels) == (2, 3)
    assert torch.equal(IDS, before)

    model.calls = 0
    once = greedy_regenerate(model, IDS, labels, feed_back=False)  # e.g. blank copy: one pass
    assert model.calls == 1
    assert token_accuracy(once, labels) == pytest.approx(12 / 14)


def test_greedy_memory_model_writes_prediction_at_its_own_position():
    model = Echo("memory")
    labels = _targets()
    labels[:, 0] = IGN  # memory alignment: identity, position 0 unscored
    tf_pred = model.logits(model(IDS)).argmax(-1)
    assert token_accuracy(tf_pred, labels) == pytest.approx(12 / 14)  # row 0: 4/6
    free = greedy_regenerate(model, IDS, labels)
    assert model.calls == 1 + 6
    assert free[0, 2:].tolist() == [3] * 6
    assert token_accuracy(free, labels) == pytest.approx(9 / 14)  # row 0: 1/6


def test_greedy_autoencoder_takes_one_pass():
    model = Echo("autoencoder")
    labels = IDS.clone()
    free = greedy_regenerate(model, IDS, labels)
    assert model.calls == 1 and torch.equal(free, IDS)
    none = greedy_regenerate(model, IDS, torch.full_like(IDS, IGN))
    assert (none == IGN).all() and model.calls == 1


class CausalBag(torch.nn.Module):
    """A random causal model: hidden[t] = Σ_{s<=t} w[s]·emb(x[s]) (clm) or Σ_{s<t} (label_shift 0)."""

    def __init__(self, kind, V=12, d=6, T=10):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.kind, self.label_shift = kind, (1 if kind == "clm" else 0)
        self.emb = torch.randn(V, d, generator=g)
        self.w = torch.randn(T, 1, generator=g)
        self.head = torch.randn(d, V, generator=g)

    def __call__(self, x, memories=None):
        h = (self.emb[x] * self.w[: x.shape[1]]).cumsum(1)
        if self.label_shift == 0:
            h = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return h

    def logits(self, h):
        return h @ self.head


@pytest.mark.parametrize("kind", ["clm", "memory"])
def test_greedy_output_is_self_consistent(kind):
    """Writing the greedy predictions into the inputs and running one teacher-forced pass reproduces them."""
    model = CausalBag(kind)
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 12, (4, 10), generator=g)
    labels = torch.randint(0, 12, (4, 10), generator=g)
    labels[:, :4] = IGN
    labels[1, 6] = IGN
    pred = greedy_regenerate(model, x, labels)
    sup = labels != IGN
    filled = x.clone()
    if kind == "clm":
        filled[:, 1:][sup[:, :-1]] = pred[:, :-1][sup[:, :-1]]
    else:
        filled[sup] = pred[sup]
    again = model.logits(model(filled)).argmax(-1)
    assert torch.equal(again[sup], pred[sup])
    # and greedy differs from teacher forcing on the original inputs for this random model
    assert not torch.equal(model.logits(model(x)).argmax(-1)[sup], pred[sup])
