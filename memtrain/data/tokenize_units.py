"""Tokenizing one unit of a corpus into packed rows: the work of ``memtrain data shards``'s helper processes.

Kept apart from the writing (:mod:`memtrain.data.ingest`), and light to import (SentencePiece, numpy,
pyarrow; no torch, no streaming): a helper process is ready in a fraction of a second and sends its rows back
to the process that writes them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from memtrain.data.documents import SourceUnit, is_val_document, iter_unit_pieces

_sp = None


def init_tokenizer(model_bytes: bytes) -> None:
    """Load the tokenizer of this process (the helpers' initializer)."""
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor()
    _sp.LoadFromSerializedProto(model_bytes)


def ready(*_: object) -> bool:
    """A no-op task: its answer says the helper is up."""
    return True


def count_tokens(texts: list[str]) -> int:
    """Tokens of ``texts`` (no EOS): the raw encode :mod:`memtrain.data.bench` compares against."""
    assert _sp is not None  # set by init_tokenizer
    return sum(map(len, _sp.Encode(texts, out_type=int)))


def _encode(texts: list[str], lasts: list[bool], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize texts: (all ids, with EOS after each text that ends a document; per-text lengths)."""
    assert _sp is not None  # set by init_tokenizer
    pieces = _sp.Encode(texts, out_type=int)
    for p, last in zip(pieces, lasts):
        if last:
            p.append(eos_id)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _doc_chunks(
    docs: Iterator[tuple[str, str, bool]],
    chunk_bytes: int,
    chunk_docs: int,
) -> Iterator[tuple[list[str], list[str], list[bool]]]:
    """Group ``(doc_id, piece, is_last)`` into chunks of about ``chunk_bytes`` characters / ``chunk_docs``
    pieces: ``(ids, texts, lasts)``."""
    ids: list[str] = []
    texts: list[str] = []
    lasts: list[bool] = []
    size = 0
    for doc_id, text, last in docs:
        ids.append(doc_id)
        texts.append(text)
        lasts.append(last)
        size += len(text)
        if size >= chunk_bytes or len(ids) >= chunk_docs:
            yield ids, texts, lasts
            ids, texts, lasts, size = [], [], [], 0
    if ids:
        yield ids, texts, lasts


class _Packer:
    """Packs one split's token stream into rows of ``row_len``; keeps the tail (fewer than ``row_len``)."""

    def __init__(self, row_len: int, dtype: np.dtype) -> None:
        self.row_len, self.dtype = row_len, dtype
        self.pending = np.empty(0, dtype=dtype)
        self.blocks: list[np.ndarray] = []
        self.documents = 0

    def add(self, tokens: np.ndarray, n_docs: int) -> None:
        """Append the tokens of ``n_docs`` whole documents (EOS included) and cut every full row."""
        self.documents += n_docs
        buf = np.concatenate([self.pending, tokens]) if self.pending.size else tokens
        n_full = buf.size // self.row_len
        if n_full:
            self.blocks.append(buf[: n_full * self.row_len].reshape(n_full, self.row_len))
        self.pending = buf[n_full * self.row_len :].copy()

    def result(self) -> dict:
        rows = np.concatenate(self.blocks) if self.blocks else np.empty((0, self.row_len), self.dtype)
        return {"rows": rows, "documents": self.documents, "tail": self.pending}


def tokenize_unit(task: tuple[int, SourceUnit, dict]) -> dict:
    """Read and tokenize one unit and pack each split's token stream into rows.

    ``task``: ``(index, unit, plan)`` with the plan's ``row_len``, ``dtype``, ``eos_id``, ``splits``,
    ``val_fraction`` and ``seed``. Returns ``{"index", "tokens", "splits": {split: {"rows" [n, row_len],
    "documents", "tail"}}}``: a document goes to validation by a stable hash of its id, and the pieces of one
    document stay contiguous in its split."""
    index, unit, plan = task
    dtype = np.dtype(plan["dtype"])
    packers = {s: _Packer(plan["row_len"], dtype) for s in plan["splits"]}
    tokens = 0
    for ids, texts, lasts in _doc_chunks(iter_unit_pieces(unit), chunk_bytes=1 << 20, chunk_docs=512):
        flat, lengths = _encode(texts, lasts, plan["eos_id"], dtype)
        tokens += int(flat.size)
        if "val" not in packers:
            packers["train"].add(flat, sum(lasts))
            continue
        val = np.fromiter((is_val_document(i, plan["val_fraction"], plan["seed"]) for i in ids), bool, len(ids))
        ends = np.cumsum(lengths)
        starts = ends - lengths
        last_arr = np.asarray(lasts, dtype=bool)
        for split, mask in (("train", ~val), ("val", val)):
            if not mask.any():
                continue
            part = flat if mask.all() else np.concatenate([flat[a:b] for a, b in zip(starts[mask], ends[mask])])
            packers[split].add(part, int(last_arr[mask].sum()))
    return {"index": index, "tokens": tokens, "splits": {s: pk.result() for s, pk in packers.items()}}
