"""Evaluation metrics: token accuracy, cross-entropy, information ratios, exact match, greedy regeneration.

All token metrics are **micro-averages**: sums over every supervised token (label != -100) of every batch,
divided once at the end, as the reference's "Hamming" metric does (docs/reference.md §5.1;
it is an accuracy, 1 - normalized Hamming distance). Labels are always *aligned* with predictions (the output
of ``model.align_labels``), so no shift is applied here.

Information ratios (docs/reference.md §5.2), for a CE ``H`` in nats over a vocabulary of ``V`` tokens:

- ``information_ratio``: ``I_e = 1 - H / ln V``; ``ln V`` is the CE of the exactly uniform distribution.
- ``paper_information_ratio``: ``1 - H / H_u``, the blog's normalisation. ``H_u`` is the expected CE of
  logits drawn i.i.d. from ``U[0, 1)``: ``E[-u_y + log Σ_i exp(u_i)] = -1/2 + ln V + ln(e - 1)`` for large V
  (``E[exp(u)] = e - 1``; the next term is about ``-0.04 / V``). So ``H_u = ln V + ln(e-1) - 1/2 =
  ln V + 0.0413``: 9.028 for V = 8000 (ln 8000 = 8.987), the paper's "9.03".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from memtrain.labels import IGNORE_INDEX

#: ln(e - 1) - 1/2: excess CE of uniform-random U[0,1) logits over the uniform distribution's ln V
UNIFORM_LOGIT_EXCESS = math.log(math.e - 1.0) - 0.5


# ----------------------------------------------------------------------------------------------------
# Token-level counts


def token_counts(pred: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_correct, n_tokens)`` as 0-dim int64 tensors (no host sync).

    pred, labels: integer tensors of the same shape (e.g. ``[B, T]``); positions with label -100 are ignored.
    """
    if pred.shape != labels.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and labels {tuple(labels.shape)} differ in shape")
    mask = labels != IGNORE_INDEX
    return ((pred == labels) & mask).sum(), mask.sum()


def token_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of supervised positions where ``pred == labels``, pooled over all of them (micro-average).

    pred, labels: same-shape integer tensors, e.g. ``[B, T]``. NaN when nothing is supervised.
    """
    correct, total = token_counts(pred, labels)
    total = int(total)
    return int(correct) / total if total else float("nan")


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE (fp32, nats) over supervised positions, and their count, as 0-dim tensors.

    logits: ``[..., V]``; labels: ``[...]`` aligned with them (-100 ignored).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce, (flat_labels != IGNORE_INDEX).sum()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE (fp32, nats) over supervised positions: logits ``[..., V]``, labels ``[...]``. NaN if none."""
    ce, n = cross_entropy_sum(logits, labels)
    return ce / n


def exact_match(pred: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """``(rows whose every supervised position is correct, rows with any supervised position)``.

    pred, labels: ``[B, T]``. Rows without supervision are counted in neither.
    """
    exact, rows = exact_match_counts(pred, labels)
    return int(exact), int(rows)


def exact_match_counts(pred: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`exact_match` as 0-dim int64 tensors (no host sync). pred, labels: ``[B, T]``."""
    if pred.shape != labels.shape or labels.dim() != 2:
        raise ValueError(f"pred {tuple(pred.shape)} and labels {tuple(labels.shape)} must both be [B, T]")
    mask = labels != IGNORE_INDEX
    wrong = (pred != labels) & mask
    has = mask.any(1)
    return (has & ~wrong.any(1)).sum(), has.sum()


# ----------------------------------------------------------------------------------------------------
# Scalars derived from a CE


def information_ratio(ce: float, vocab_size: int) -> float:
    """``I_e = 1 - ce / ln V``: 0 for a model no better than uniform, 1 for a perfect one. ce in nats."""
    return 1.0 - ce / math.log(vocab_size)


def uniform_logit_ce(vocab_size: int) -> float:
    """Expected CE of i.i.d. ``U[0, 1)`` logits over V tokens: ``ln V + ln(e - 1) - 1/2`` (9.028 for V=8000)."""
    return math.log(vocab_size) + UNIFORM_LOGIT_EXCESS


def paper_information_ratio(ce: float, vocab_size: int) -> float:
    """The paper's ``I_e = 1 - ce / H_u`` with ``H_u = ln V + ln(e - 1) - 1/2`` (its "9.03" at V = 8000)."""
    return 1.0 - ce / uniform_logit_ce(vocab_size)


def bits_per_token(ce: float) -> float:
    """CE in nats -> bits per token: ``ce / ln 2``."""
    return ce / math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# Accumulation over an evaluation

_FIELDS = ("ce_sum", "ce_tokens", "n_correct", "n_tokens", "n_rows_exact", "n_rows")


class MetricAccumulator:
    """Pools per-objective sums over many batches and divides once in :meth:`compute`.

    The sums of one objective live in one fp64 tensor ``[6]`` (exact for counts below 2**53) on the device of
    the first tensor it received, so updates cause no host sync and :meth:`compute` reads each objective once.

    >>> acc = MetricAccumulator(vocab_size=8000)
    >>> acc.update("copy", logits, labels)        # logits [B, T, V] aligned with labels [B, T]
    >>> acc.update("copy", pred, labels)          # or integer predictions [B, T] (then no CE)
    >>> acc.update("causal", stats)               # or an objectives.ObjectiveStats
    >>> acc.compute()["copy"]["accuracy"]
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)
        self._sums: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self._sums.clear()

    def _add(self, name: str, **values: Any) -> None:
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        if name in self._sums:
            device = self._sums[name].device
        row = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)
        for key, value in values.items():
            value = value.detach().to(device, torch.float64) if isinstance(value, torch.Tensor) else float(value)
            row[_FIELDS.index(key)] = value
        self._sums[name] = self._sums[name] + row if name in self._sums else row

    def update(self, name: str, logits_or_pred: Any, labels: torch.Tensor | None = None) -> None:
        """Add one batch of objective ``name``.

        ``logits_or_pred``: float logits ``[B, T, V]``, integer predictions ``[B, T]`` (CE not updated), or an
        ``ObjectiveStats`` from :func:`memtrain.objectives.compute_losses` (then ``labels`` is None).
        ``labels``: ``[B, T]`` aligned labels, -100 ignored.
        """
        if labels is None:
            self.update_from_stats(name, logits_or_pred)
            return
        x = logits_or_pred
        with torch.no_grad():
            extra = {}
            if x.dtype.is_floating_point:
                ce, n_ce = cross_entropy_sum(x, labels)
                extra = {"ce_sum": ce, "ce_tokens": n_ce}
                x = x.argmax(-1)
            correct, n = token_counts(x, labels)
            exact, rows = exact_match_counts(x, labels)
        self._add(name, n_correct=correct, n_tokens=n, n_rows_exact=exact, n_rows=rows, **extra)

    def ensure(self, names: Any, device: torch.device) -> None:
        """Give every objective of ``names`` a (zero) row on ``device`` if it has none, so that ranks that saw
        no batch of it (a pipeline stage without the loss) still take part in :meth:`all_reduce`."""
        for name in names:
            if name not in self._sums:
                self._sums[name] = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)

    def update_from_stats(self, name: str, stats: Any) -> None:
        """Add an ``ObjectiveStats`` (teacher-forced counts from the loss computation)."""
        self._add(
            name,
            ce_sum=stats.ce_sum,
            ce_tokens=stats.n_tokens,
            n_correct=stats.n_correct,
            n_tokens=stats.n_tokens,
            n_rows_exact=stats.n_rows_exact,
            n_rows=stats.n_rows,
        )

    def all_reduce(self, group: Any = None) -> None:
        """Sum the pooled counts over the ranks of ``group`` (a no-op unless torch.distributed is initialised).

        Every rank must have updated the same objective names. Each objective's sums travel on the device
        they live on (CUDA for NCCL).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in sorted(self._sums):
            dist.all_reduce(self._sums[name], group=group)

    def compute(self) -> dict[str, dict[str, float]]:
        """Per objective: ``ce`` (nats), ``accuracy``, ``I_e``, ``I_e_paper``, ``bits_per_token``,
        ``exact_match`` (fraction of rows), ``tokens`` and ``rows``. NaN where the inputs carried no CE or no
        supervised token."""
        out: dict[str, dict[str, float]] = {}
        for name, sums in self._sums.items():
            s = dict(zip(_FIELDS, sums.tolist()))
            ce = s["ce_sum"] / s["ce_tokens"] if s["ce_tokens"] else float("nan")
            tokens, rows = s["n_tokens"], s["n_rows"]
            out[name] = {
                "ce": ce,
                "accuracy": s["n_correct"] / tokens if tokens else float("nan"),
                "I_e": information_ratio(ce, self.vocab_size),
                "I_e_paper": paper_information_ratio(ce, self.vocab_size),
                "bits_per_token": bits_per_token(ce),
                "exact_match": s["n_rows_exact"] / rows if rows else float("nan"),
                "tokens": int(tokens),
                "rows": int(rows),
            }
        return out


# ----------------------------------------------------------------------------------------------------
# Free-running regeneration


@torch.no_grad()
def greedy_regenerate(model: Any, inputs: torch.Tensor, labels: torch.Tensor, feed_back: bool = True) -> torch.Tensor:
    """Regenerate the supervised positions greedily, feeding each prediction back as the next input.

    Args:
        model: ``kind``, ``label_shift``, ``__call__(inputs [B,T]) -> hidden [B,T,d]``,
            ``logits(hidden [..., d]) -> [..., V]``.
        inputs: ``[B, T]`` the task's model inputs (not modified; a copy is written into).
        labels: ``[B, T]`` labels aligned with the model's outputs (``model.align_labels(targets)``).
        feed_back: write predictions into the inputs. False when the model never sees its own outputs at
            those positions, e.g. blank copy, whose filler inputs must stay: then one pass suffices.

    Returns:
        ``pred [B, T]`` aligned with ``labels``: the argmax at every column where any row is supervised,
        -100 at the other columns.

    The supervised columns are visited left to right. At column t the model runs on the current inputs and
    its argmax at t is taken; for rows supervised at t it is written into input position ``t + 1`` when
    ``model.label_shift == 1`` (a causal LM: it becomes the next input token) or into position ``t`` when
    ``label_shift == 0`` (a memory model: its output at t is the token at t, which the decoder reads from
    t + 1 on and the encoder re-encodes into that chunk's memory). Each row keeps its own predictions;
    unsupervised inputs (pads, delimiters, the source half) are left alone. An autoencoder's decoder does
    not read tokens, so it takes one pass, as does ``feed_back=False``. Cost: one forward pass per
    supervised column otherwise.
    """
    if inputs.shape != labels.shape or inputs.dim() != 2:
        raise ValueError(f"inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)} must both be [B, T]")
    B, T = labels.shape
    supervised = labels != IGNORE_INDEX
    cols = supervised.any(0).nonzero().squeeze(1).tolist()
    pred = torch.full_like(labels, IGNORE_INDEX)
    if not cols:
        return pred
    x = inputs.clone()
    shift = int(model.label_shift)
    if not feed_back or model.kind == "autoencoder":
        hidden = model(x)
        idx = torch.tensor(cols, device=labels.device)
        pred[:, idx] = model.logits(hidden.index_select(1, idx)).argmax(-1)
        return pred
    if shift not in (0, 1):
        raise ValueError(f"model.label_shift must be 0 or 1, got {shift}")
    for t in cols:
        hidden = model(x)
        pred[:, t] = model.logits(hidden[:, t]).argmax(-1)
        dest = t + shift
        if dest < T:
            x[:, dest] = torch.where(supervised[:, t], pred[:, t], x[:, dest])
    return pred
