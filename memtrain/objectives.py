"""Objectives: task tensors (causal, reconstruction, copy, blank copy), their weighted losses, curriculum stages.

Conventions
-----------
Every task is built as a pair ``(inputs, targets)`` of ``[B, T]`` integer tensors in *sequence-target*
convention: ``targets[:, t]`` is the token that sequence position ``t`` should be predicted as, or -100
where position ``t`` is not scored. The model turns targets into labels aligned with its hidden states
(``model.align_labels``): a causal LM shifts them by one (``hidden[:, t]`` predicts position ``t + 1``),
an autoencoder uses them as they are, and a memory model uses them as they are but never scores position 0
(nothing precedes it). Objectives therefore never know how a model is shifted.

Copy and blank copy (docs/reference.md §4.2)
--------------------------------------------
A row of ``T = 2h`` tokens is rebuilt as ``first ‖ first``: the second half repeats the first, and its
first ``n_delimiters`` positions are replaced by the delimiter token. Only the second half is scored, and
not at the delimiter positions. Blank copy also replaces the rest of the second half's *inputs* by the
filler token, so the copied tokens can reach the decoder only through the memories of the first half.
For a memory model the halves must be whole chunks (``C`` even): chunks ``0..C/2-1`` are the source,
chunks ``C/2..C-1`` the copy. See :func:`make_task` for the reference's worked example and the one place
where its labels differ from ours (the reference masks the labels one position too early).

Weighting, and the reference's combined objective (docs/reference.md §4.3)
--------------------------------------------------------------------------
:func:`compute_losses` runs one forward pass per active objective and returns
``total = Σ_k w_k · loss_k`` where ``loss_k`` is objective k's cross-entropy **averaged over its supervised
tokens, pooled over the batch**.

The reference's ``objective='combined'`` has no weights: it adds the per-chunk losses of a causal pass and
a copy pass and divides once by ``C``. With ``C = 4`` the causal pass contributes ``(1/4) Σ_{c=0..3} CE(c)``
(the mean over its four chunks), while the copy pass contributes ``(1/4) Σ_{c=2,3} CE(c)``: only two
chunks are supervised, yet the sum is still divided by four, i.e. half the copy pass's per-chunk mean.
The effective weighting is therefore causal 1.0 + copy 0.5, which ``config.PRESETS["reference_combined"]``
names (and ``reference_blank_combined`` for blank copy). In general the copy weight is ``(C/2)/C = 1/2`` for
any even C.

The reference's per-objective loss is a mean of per-chunk means; ours is one mean over all supervised
tokens. They are identical when every supervised chunk holds the same number of supervised tokens (no
padding, same masking in each chunk; ``tests/test_objectives.py`` checks the identity with the preset
weights). With padding, or when one chunk has fewer scored tokens (e.g. the delimiters), ours weights every
token equally while the reference weights every chunk equally. The reference also divides by ``C`` even
when a chunk is skipped because it has no labels, which ties its loss scale to the padding pattern; ours
does not.

Precomputed memories
--------------------
``compute_losses(..., memories=m)`` passes encoder outputs computed elsewhere (e.g. a frozen encoder run
once over the data). A tensor encodes the chunks of ``ids``. It is valid only for objectives whose
model inputs *are* ``ids``: causal and reconstruction. Copy and blank copy change the inputs the encoder
must see (the copied half with its delimiters, or filler), so memories of ``ids`` would be wrong there;
passing a tensor with a copy objective raises ``ValueError``. A mapping ``{objective: memories}`` gives
each objective the memories of its own task inputs (``memtrain precompute`` stores them; see
:mod:`memtrain.data.memories`); an active objective missing from it raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memtrain.config import OBJECTIVES, ObjectiveConfig, StageConfig
from memtrain.errors import UserError
from memtrain.kernels import dispatch  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)
from memtrain.kinds import KINDS
from memtrain.labels import IGNORE_INDEX

COPY_TASKS = ("copy", "blank_copy")


class TaskShapeError(UserError, ValueError):
    """A row shape or special-token setting that an objective cannot use.

    A ``ValueError`` for code that builds tasks, and a :class:`UserError` (one-line message, exit code 2) when
    it reaches the CLI, since its cause is a config setting (sequence length, chunk count, delimiters).
    """


# ----------------------------------------------------------------------------------------------------
# Special tokens


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the objectives need.

    pad_id: padding; never a target. delimiter_id: opens the copied half (``n_delimiters`` copies).
    filler_id: replaces the copied half's inputs in blank copy.
    """

    pad_id: int
    delimiter_id: int
    n_delimiters: int
    filler_id: int


def special_tokens(obj_cfg: ObjectiveConfig, tokenizer_specials: Mapping[str, int | None]) -> SpecialTokens:
    """Resolve the objective's special tokens from the config and the tokenizer.

    ``tokenizer_specials`` maps ``pad``, ``eos``, ``bos``, ``unk``, ``sep``, ``blank`` to token ids (or None).
    A null ``obj_cfg.delimiter_id`` falls back to the tokenizer's ``sep``, a null ``filler_id`` to ``blank``.
    Raises :class:`TaskShapeError` when a needed id is missing.
    """

    def need(key: str, why: str) -> int:
        value = tokenizer_specials.get(key)
        if value is None:
            raise TaskShapeError(f"the tokenizer has no <{key}> token, needed {why}")
        return int(value)

    pad = need("pad", "to mask padding out of the loss")
    delim = (
        obj_cfg.delimiter_id
        if obj_cfg.delimiter_id is not None
        else need("sep", "as the copy delimiter (or set objective.delimiter_id)")
    )
    filler = (
        obj_cfg.filler_id
        if obj_cfg.filler_id is not None
        else need("blank", "as the blank-copy filler (or set objective.filler_id)")
    )
    return SpecialTokens(pad_id=pad, delimiter_id=int(delim), n_delimiters=obj_cfg.n_delimiters, filler_id=int(filler))


# ----------------------------------------------------------------------------------------------------
# Task tensors


def check_task(name: str, seq_len: int, special: SpecialTokens, n_chunks: int | None = None) -> None:
    """Raise :class:`TaskShapeError` if objective ``name`` cannot be built for rows of ``seq_len`` tokens.

    ``n_chunks``: the memory model's C (rows are C chunks of ``seq_len / C`` tokens), or None for a model
    without chunks. Cheap; a trainer can call it once at start-up, before any data is read.
    """
    if name not in OBJECTIVES:
        raise TaskShapeError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    if n_chunks is not None and (n_chunks < 1 or seq_len % n_chunks):
        raise TaskShapeError(f"rows of {seq_len} tokens do not split into {n_chunks} equal chunks")
    if name not in COPY_TASKS:
        return
    if seq_len % 2:
        raise TaskShapeError(
            f"the {name} objective repeats the first half of a row, so the row length must "
            f"be even; got {seq_len} tokens"
        )
    if n_chunks is not None and n_chunks % 2:
        raise TaskShapeError(
            f"the {name} objective needs an even number of chunks so that the copied half "
            f"starts on a chunk boundary; got model.n_chunks = {n_chunks}"
        )
    if not 0 <= special.n_delimiters < seq_len // 2:
        raise TaskShapeError(
            f"objective.n_delimiters = {special.n_delimiters} must be >= 0 and leave at least "
            f"one copied token in a half of {seq_len // 2} tokens"
        )


def task_chunks(model: Any) -> int | None:
    """The ``n_chunks`` argument of :func:`make_task` for ``model``: its C for a memory model, else None.

    A causal LM's ``cfg.n_chunks`` only sets its context length (C*L); its copy halves need not be whole
    chunks, so passing it would wrongly demand an even C.
    """
    return model.cfg.n_chunks if KINDS[model.kind].chunked_tasks else None


def make_task(
    name: str, ids: torch.Tensor, special: SpecialTokens, n_chunks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the model inputs and sequence targets of objective ``name`` from a batch of token rows.

    Args:
        name: ``causal``, ``reconstruction``, ``copy`` or ``blank_copy``.
        ids: ``[B, T]`` integer token ids (never modified).
        special: pad / delimiter / filler ids and the delimiter count.
        n_chunks: the memory model's C, or None when the model has no chunks (then only T must be even
            for the copy tasks); :func:`task_chunks` gives the right value for a model.

    Returns:
        ``(inputs [B, T], targets [B, T])``, new tensors. ``targets[:, t]`` is the token sequence position
        ``t`` should be predicted as, -100 where it is not scored (the model aligns them to its outputs).

    - ``causal`` / ``reconstruction``: ``inputs = ids``; ``targets = ids`` with pad positions set to -100.
    - ``copy``: with ``h = T/2``, ``D = n_delimiters``, ``first = ids[:, :h]``:
      ``inputs = first ‖ first`` with ``inputs[:, h:h+D] = delimiter``;
      ``targets[:, :h+D] = -100``, ``targets[:, h+D:] = first[:, D:]`` (pad positions of the source -100).
    - ``blank_copy``: as copy, but ``inputs[:, h+D:] = filler``; targets identical to copy.

    Relation to the reference (docs/reference.md §4.2; N = 16, ids 10..25, D = 3 delimiters
    of id 100, filler 1)::

        position       0 .. 7            |  8    9    10   11  12  13  14  15
        copy inputs    10 11 .. 17       |  100  100  100  13  14  15  16  17     (identical)
        blank inputs   10 11 .. 17       |  100  100  100  1   1   1   1   1      (identical)
        ref labels     -100 x 8          |  -100 -100 12   13  14  15  16  17
        our targets    -100 x 8          |  -100 -100 -100 13  14  15  16  17

    The reference's labels use the Hugging Face convention, which our targets share: ``labels[t]`` is the
    token at position t and the causal LM shifts them (``logits[t]`` is scored against ``labels[t+1]``).
    The reference sets labels ``h-1 .. h+D-2`` (7, 8, 9) to -100 intending to stop the model being trained
    to *predict the delimiters* (the hidden states at 7, 8, 9 are the ones whose next token is a delimiter:
    the shifted reading). Applied to unshifted labels, that mask lands one position early, so the
    reference scores the replaced token 12 at the third delimiter's position (predicted from the second
    delimiter) and masks position 7, which is already masked. We mask the delimiter positions themselves:
    for a causal LM, ``model.align_labels(targets)`` masks hidden positions 7, 8, 9 (exactly the positions
    the reference wrote its mask on) and scores hidden 10..14 against 13..17, as the reference does; the
    only difference is hidden position 9, where the reference scores 12 and we score nothing.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be integer token ids, got {ids.dtype}")
    T = ids.shape[1]
    check_task(name, T, special, n_chunks)

    if name in ("causal", "reconstruction"):
        return ids.clone(), ids.masked_fill(ids == special.pad_id, IGNORE_INDEX)

    h, D = T // 2, special.n_delimiters
    first = ids[:, :h]
    second_in = first.clone()
    second_in[:, :D] = special.delimiter_id
    if name == "blank_copy":
        second_in[:, D:] = special.filler_id
    inputs = torch.cat([first, second_in], dim=1)

    second_tgt = first.masked_fill(first == special.pad_id, IGNORE_INDEX)
    second_tgt[:, :D] = IGNORE_INDEX
    targets = torch.cat([torch.full_like(first, IGNORE_INDEX), second_tgt], dim=1)
    return inputs, targets


# ----------------------------------------------------------------------------------------------------
# Losses


@dataclass
class ObjectiveStats:
    """One objective's loss on one batch, with detached counts for logging.

    loss: scalar CE mean over supervised tokens, attached to the graph (fp32).
    n_tokens: supervised tokens (a Python int: known once the supervised rows are gathered).
    n_correct: 0-dim int64 tensor, argmax == label at supervised tokens (detached, no host sync).
    ce_sum: 0-dim fp32 tensor, summed CE over supervised tokens (detached).
    n_rows_exact / n_rows: 0-dim int64 tensors: rows whose supervised tokens are all correct (teacher
        forced) / rows with any supervised token.
    weight: the objective's weight in the total.
    """

    loss: torch.Tensor
    n_tokens: int
    n_correct: torch.Tensor
    ce_sum: torch.Tensor
    n_rows_exact: torch.Tensor
    n_rows: torch.Tensor
    weight: float = 1.0


def supervised_loss(model: Any, hidden: torch.Tensor, labels: torch.Tensor) -> ObjectiveStats:
    """CE of ``model.logits`` at the supervised positions only.

    Args:
        hidden: ``[B, T, d]`` model outputs aligned with ``labels``.
        labels: ``[B, T]`` aligned labels, -100 where not scored.

    The ``N`` supervised rows of ``hidden`` are gathered first (``[N, d]``) and only they are projected to
    ``[N, V]`` logits; cross-entropy is computed in fp32. With no supervised token the loss is a zero that
    stays connected to the graph (so every parameter still receives a, zero, gradient).

    When the model's ``kernels`` setting resolves to Triton (``auto`` on CUDA, see
    :func:`memtrain.kernels.dispatch.fused_head`), the head and the loss run as one chunked linear +
    cross-entropy that never holds the ``[N, V]`` logits (same loss, gradients and predictions); elsewhere,
    e.g. on CPU by default, the plain path below.
    """
    B, T = labels.shape
    if hidden.shape[:2] != (B, T):
        raise ValueError(f"hidden {tuple(hidden.shape)} is not aligned with labels {tuple(labels.shape)}")
    flat_labels = labels.reshape(-1)
    idx = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # the one host sync: N is data-dependent
    n = idx.numel()
    rows = hidden.reshape(B * T, hidden.shape[-1]).index_select(0, idx)
    y = flat_labels.index_select(0, idx)
    if n and dispatch.fused_head(model, hidden.device):
        loss, predicted = dispatch.linear_cross_entropy(model.norm(rows), model.lm_head.weight, y, impl="triton")
    else:
        logits = model.logits(rows).float()
        loss = F.cross_entropy(logits, y) if n else logits.sum() * 0.0 + hidden.float().sum() * 0.0
        predicted = logits.detach().argmax(-1)
    with torch.no_grad():
        wrong_tok = predicted != y
        n_correct = (~wrong_tok).sum()
        wrong = torch.zeros(B * T, dtype=torch.bool, device=labels.device)
        wrong.index_copy_(0, idx, wrong_tok)
        supervised = (labels != IGNORE_INDEX).any(1)
        n_rows = supervised.sum()
        n_rows_exact = (supervised & ~wrong.view(B, T).any(1)).sum()
        ce_sum = loss.detach() * n
    return ObjectiveStats(
        loss=loss, n_tokens=n, n_correct=n_correct, ce_sum=ce_sum, n_rows_exact=n_rows_exact, n_rows=n_rows
    )


def compute_losses(
    model: Any,
    ids: torch.Tensor,
    weights: Mapping[str, float] | Any,
    special: SpecialTokens,
    memories: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    forward: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, ObjectiveStats]]:
    """Weighted sum of the active objectives' losses on one batch.

    Args:
        model: has ``kind``, ``cfg.n_chunks``, ``__call__(inputs [B,T], memories=None) -> hidden [B,T,d]``,
            ``logits(hidden [..., d]) -> [..., V]`` and ``align_labels(targets [B,T]) -> labels [B,T]``.
        ids: ``[B, T]`` token rows (never modified).
        weights: objective name -> weight (``ObjectiveWeights`` is accepted too); weights <= 0 are skipped.
        special: see :func:`special_tokens`.
        memories: precomputed encoder outputs ``[B, C-1, e]``: a tensor for the chunks of ``ids`` (only for
            causal / reconstruction: ``ValueError`` with a copy objective, whose encoder must see the task
            inputs), or a mapping objective -> memories of that objective's task inputs.
        forward: what runs the forward pass, ``forward(inputs, memories=...) -> hidden``, when it is not
            ``model`` itself: a DDP or DeepSpeed wrapper (which reduces gradients) or a compiled model.

    Returns:
        ``(total, parts)``: ``total`` = Σ w·loss (0-dim, attached), ``parts[name]`` an :class:`ObjectiveStats`
        per active objective, in the order of ``weights``. One forward pass per objective.
    """
    active_of = getattr(weights, "active", None)  # ObjectiveWeights
    if active_of is not None:
        weights = active_of()
    active = {k: float(w) for k, w in weights.items() if w > 0}
    if not active:
        raise ValueError("no objective has a weight > 0")
    per_objective = isinstance(memories, Mapping)
    if isinstance(memories, Mapping):
        absent = [k for k in active if k not in memories]
        if absent:
            raise ValueError(
                f"no precomputed memories for the {', '.join(absent)} objective "
                f"(memories are given for {', '.join(memories) or 'none'})"
            )
    elif memories is not None:
        copies = sorted(set(active) & set(COPY_TASKS))
        if copies:
            raise ValueError(
                f"precomputed memories encode the rows of ids, but the {', '.join(copies)} "
                "objective feeds the encoder different inputs; compute its memories from the "
                "task inputs (run without memories)"
            )
    n_chunks = task_chunks(model)

    total: torch.Tensor | None = None
    parts: dict[str, ObjectiveStats] = {}
    for name, w in active.items():
        inputs, targets = make_task(name, ids, special, n_chunks)
        hidden = (model if forward is None else forward)(inputs, memories=memories[name] if per_objective else memories)
        stats = supervised_loss(model, hidden, model.align_labels(targets))
        stats.weight = w
        parts[name] = stats
        total = w * stats.loss if total is None else total + w * stats.loss
    assert total is not None  # active is not empty
    return total, parts


# ----------------------------------------------------------------------------------------------------
# Curriculum


def stage_at(stages: Sequence[StageConfig], step: int) -> tuple[int, StageConfig, int]:
    """The curriculum stage that global step ``step`` (0-based) belongs to.

    Stage k covers steps ``[Σ_{i<k} steps_i, Σ_{i<=k} steps_i)``. Steps at or past the end of the curriculum
    belong to the last stage (``step_in_stage`` then keeps counting past its ``steps``).

    Returns:
        ``(index, stage, step_in_stage)``.
    """
    if not stages:
        raise ValueError("the curriculum has no stages")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start = 0
    for k, stage in enumerate(stages):
        if step < start + stage.steps or k == len(stages) - 1:
            return k, stage, step - start
        start += stage.steps
    raise AssertionError("unreachable")
