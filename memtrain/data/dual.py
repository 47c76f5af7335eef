"""Two token streams of the same text: the encoder's (a memtrain SentencePiece tokenizer) and a pretrained LLM
decoder's (a Hugging Face tokenizer), for memory models whose decoder is that LLM (``model.hf_decoder``).

Chunks are cut on **text**, so that both sides see the same span:

    document --TextSpanChunker--> spans s_0, s_1, ...     (never across documents; whole words when possible)
    span --encoder tokenizer--> <= L ids,  --decoder tokenizer--> <= L_dec ids   (EOS ends each document's
                                                                                   last span on both sides)
    C consecutive spans --> one row, each side padded to its chunk length (padding masked)

:func:`build_dual_shards` writes them as MDS shards with three columns (per row)::

    input_ids           [C, L]      encoder ids, right-padded with <pad>
    dec_input_ids       [C, L_dec]  decoder ids, right-padded (the pad value is irrelevant: it is masked)
    dec_attention_mask  [C, L_dec]  1 for real decoder tokens, 0 for padding

The loader turns a batch of them into **dual rows** ``[B, C*(L + L_dec)]`` (:func:`collate_dual`): for every
chunk its L encoder ids, then its L_dec decoder *slots*. A decoder slot holds

    v <= -101   decoder token ``-v - 101``       (as the data pipeline stores it)
    v == -1     padding (attention mask 0, never a target)
    v >= 0      decoder token ``v``              (written into a row by a task, e.g. the blank-copy filler, or by
                                                  greedy regeneration)

Storing the data's decoder tokens as negative numbers keeps them apart from everything the objectives do to a
row: :func:`memtrain.objectives.make_task` masks targets equal to the (encoder's) pad id and writes delimiter
and filler ids, none of which can then be mistaken for a decoder token or for decoder padding. Because every
chunk is a block of the row, the halves of a row are whole chunks (C even), so the copy and blank-copy
objectives work on dual rows unchanged: the copied half repeats both streams; the delimiters replace the first
encoder tokens of the copied half (the decoder stream has no delimiter, as in the paper's LLM copy runs); blank
copy fills both streams of the copied half with the filler id, which the decoder reads as one constant token.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtrain.errors import UserError
from memtrain.labels import IGNORE_INDEX

#: decoder slot value of padding
PAD_SLOT = -1
#: the data's decoder token t is stored as -(t + TOKEN_OFFSET); -2 .. -100 are never stored (-100 = ignore)
TOKEN_OFFSET = 101
#: where build_dual_shards saves the decoder tokenizer inside a shard directory
DECODER_TOKENIZER_DIR = "decoder_tokenizer"


# ----------------------------------------------------------------------------------------------------
# Dual rows


@dataclass(frozen=True)
class DualLayout:
    """Dual rows of ``n_chunks`` chunks, each ``enc_len`` encoder ids then ``dec_len`` decoder slots."""

    n_chunks: int
    enc_len: int
    dec_len: int

    @property
    def block_len(self) -> int:
        """Positions per chunk: L + L_dec."""
        return self.enc_len + self.dec_len

    @property
    def row_len(self) -> int:
        """Positions per row: C * (L + L_dec)."""
        return self.n_chunks * self.block_len

    def pack(self, enc_ids: torch.Tensor, dec_ids: torch.Tensor, dec_mask: torch.Tensor) -> torch.Tensor:
        """enc_ids [B, C, L], dec_ids [B, C, L_dec], dec_mask [B, C, L_dec] (True = real token) -> dual rows
        [B, C*(L + L_dec)] (int64)."""
        slots = torch.where(dec_mask.bool(), -(dec_ids.long() + TOKEN_OFFSET), PAD_SLOT)
        return torch.cat([enc_ids.long(), slots], dim=-1).reshape(enc_ids.shape[0], self.row_len)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dual rows [B, C*(L + L_dec)] -> (encoder ids [B, C, L], decoder slots [B, C, L_dec]) (views)."""
        if rows.dim() != 2 or rows.shape[1] != self.row_len:
            raise ValueError(
                f"dual rows of {self.n_chunks} chunks x ({self.enc_len} encoder + {self.dec_len} "
                f"decoder) positions must be [B, {self.row_len}], got {list(rows.shape)}"
            )
        blocks = rows.view(rows.shape[0], self.n_chunks, self.block_len)
        return blocks[..., : self.enc_len], blocks[..., self.enc_len :]

    @staticmethod
    def decoder_tokens(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder slots (any shape) -> (token ids, with 0 at padding; attention mask, True = a token).

        Raises ValueError for values that no data or task writes (-2 .. -100)."""
        stored = slots <= -TOKEN_OFFSET
        pad = slots == PAD_SLOT
        if bool(((slots < 0) & ~stored & ~pad).any()):
            raise ValueError(
                "decoder slots hold values in -100..-2, which no dual row contains; "
                "were targets passed where inputs belong?"
            )
        ids = torch.where(stored, -slots - TOKEN_OFFSET, torch.where(pad, torch.zeros_like(slots), slots))
        return ids, ~pad

    @staticmethod
    def decoder_labels(slots: torch.Tensor) -> torch.Tensor:
        """Decoder slots of a *targets* row (any shape) -> labels: the decoder token, or -100 at padding and
        at positions a task left unscored (-100)."""
        return torch.where(
            slots <= -TOKEN_OFFSET,
            -slots - TOKEN_OFFSET,
            torch.where(slots >= 0, slots, torch.full_like(slots, IGNORE_INDEX)),
        )


def collate_dual(samples: list[dict[str, Any]]) -> torch.Tensor:
    """Stack dual-shard samples (``input_ids`` [C, L], ``dec_input_ids`` / ``dec_attention_mask`` [C, L_dec])
    into dual rows ``torch.long [B, C*(L + L_dec)]``."""
    enc = torch.from_numpy(np.stack([s["input_ids"] for s in samples]).astype(np.int64))
    dec = torch.from_numpy(np.stack([s["dec_input_ids"] for s in samples]).astype(np.int64))
    mask = torch.from_numpy(np.stack([s["dec_attention_mask"] for s in samples]).astype(bool))
    C, L = enc.shape[1:]
    return DualLayout(C, L, dec.shape[2]).pack(enc, dec, mask)


# ----------------------------------------------------------------------------------------------------
# The decoder tokenizer


def load_decoder_tokenizer(path: str | Path):
    """The Hugging Face tokenizer in directory ``path`` (e.g. the LLM's own directory), checked for what the
    chunker needs: an EOS token (it ends each document). Raises :class:`UserError` with one line otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"{p}: decoder tokenizer directory not found (expected a Hugging Face model or tokenizer directory)"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for unusable folders
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{p}: not a Hugging Face tokenizer directory ({detail[:160]})") from None
    if tok.eos_token_id is None:
        raise UserError(
            f"{p}: the decoder tokenizer has no eos_token; the chunker ends every document with "
            "it, so set eos_token in its tokenizer_config.json"
        )
    return tok


def decoder_tokenizer_sha256(tok) -> str:
    """A hex SHA-256 that identifies a Hugging Face tokenizer by what it computes: the serialized fast
    tokenizer (vocabulary, merges, normalizer, pre-tokenizer) and its special tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    specials = json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())})
    return hashlib.sha256((type(tok).__name__ + "\n" + body + "\n" + specials).encode("utf-8")).hexdigest()


def decoder_special_ids(tok) -> dict[str, int | None]:
    """``{"bos", "eos", "pad", "unk"}`` -> id (or None) of a Hugging Face tokenizer."""
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}


# ----------------------------------------------------------------------------------------------------
# Cutting text into spans


@dataclass(frozen=True)
class Span:
    """One chunk of a document: characters ``start:end``, its encoder ids (<= L) and decoder ids (<= L_dec),
    both ending with EOS when the span ends its document."""

    start: int
    end: int
    enc_ids: list[int]
    dec_ids: list[int]


_WORD = re.compile(r"\s*\S+")


class TextSpanChunker:
    """Cuts documents into the longest spans whose encoder and decoder tokenizations both fit.

    ``encode_enc`` / ``encode_dec``: text -> ids (no special tokens added). A span ends at a word boundary (a
    word with the whitespace before it); only a word too long for one chunk is cut between characters.
    Deterministic: the spans depend on the text and the two tokenizers only.

    ``offsets_enc`` / ``offsets_dec`` (optional): text -> the character offset where each of its tokens ends.
    With them a document is tokenized once per side to guess each cut, and the guess is checked by tokenizing
    the span itself (usually once or twice); without them every cut is a binary search over word boundaries.
    """

    def __init__(
        self,
        encode_enc: Callable[[str], list[int]],
        encode_dec: Callable[[str], list[int]],
        enc_len: int,
        dec_len: int,
        enc_eos: int,
        dec_eos: int,
        offsets_enc: Callable[[str], list[int]] | None = None,
        offsets_dec: Callable[[str], list[int]] | None = None,
    ):
        if enc_len < 2 or dec_len < 2:
            raise UserError(
                f"chunk lengths must be >= 2 tokens (one for a document's EOS), got encoder "
                f"{enc_len} and decoder {dec_len}"
            )
        self.encode_enc, self.encode_dec = encode_enc, encode_dec
        self.enc_len, self.dec_len = enc_len, dec_len
        self.enc_eos, self.dec_eos = enc_eos, dec_eos
        self.offsets_enc, self.offsets_dec = offsets_enc, offsets_dec

    def _tokens(self, text: str, last: bool) -> tuple[list[int], list[int]] | None:
        """Both tokenizations of ``text`` (+ EOS when ``last``), or None when either is too long."""
        enc = self.encode_enc(text) + ([self.enc_eos] if last else [])
        if len(enc) > self.enc_len:
            return None
        dec = self.encode_dec(text) + ([self.dec_eos] if last else [])
        return (enc, dec) if len(dec) <= self.dec_len else None

    def _largest(self, ends: Sequence[int], start: int, text: str, guess: int | None = None):
        """The largest k (>= 1) such that text[start:ends[k-1]] fits, with its tokens; (0, None) if none.
        A ``guess`` that fits is taken as it is."""

        def probe(k: int):
            return self._tokens(text[start : ends[k - 1]], last=ends[k - 1] == len(text))

        n = len(ends)
        best_k, best, lo = 0, None, 1
        if guess is not None:
            hi = min(max(guess, 1), n)
            got = probe(hi)
            if got is not None:
                return hi, got
            hi -= 1
        else:
            hi = min(n, self.enc_len, self.dec_len)  # a word is at least one token on either side, usually
            while True:  # a guess that fits may still leave room (tokens that span words): grow it
                got = probe(hi)
                if got is None or hi == n:
                    break
                best_k, best, lo, hi = hi, got, hi + 1, min(n, 2 * hi)
            if got is not None:
                return hi, got
            hi -= 1
        while lo <= hi:
            mid = (lo + hi) // 2
            got = probe(mid)
            if got is None:
                hi = mid - 1
            else:
                best_k, best, lo = mid, got, mid + 1
        return best_k, best

    @staticmethod
    def _budget_end(token_ends: list[int] | None, start: int, budget: int, length: int) -> int:
        """Where ``budget`` tokens that end after ``start`` end (``length`` if fewer remain)."""
        if token_ends is None:
            return length
        i = bisect.bisect_right(token_ends, start) + budget - 1
        return token_ends[i] if i < len(token_ends) else length

    def spans(self, text: str) -> list[Span]:
        """The spans of one document, in order; they cover ``text`` exactly (``"".join`` of them is ``text``)."""
        words = [m.end() for m in _WORD.finditer(text)] or [len(text)]  # (whitespace only: one "word")
        words[-1] = len(text)
        enc_ends = self.offsets_enc(text) if self.offsets_enc else None
        dec_ends = self.offsets_dec(text) if self.offsets_dec else None
        guessing = enc_ends is not None and dec_ends is not None
        out: list[Span] = []
        start, w = 0, 0
        while start < len(text):
            while w < len(words) and words[w] <= start:
                w += 1
            guess = None
            if guessing:
                limit = min(
                    self._budget_end(enc_ends, start, self.enc_len, len(text)),
                    self._budget_end(dec_ends, start, self.dec_len, len(text)),
                )
                guess = bisect.bisect_right(words, limit, lo=w) - w
            k, got = self._largest(words[w:], start, text, guess)
            if k:
                end = words[w + k - 1]
            else:  # one word longer than a chunk: cut it between characters
                k, got = self._largest(range(start + 1, words[w] + 1), start, text)
                if not k:
                    raise UserError(
                        f"a chunk of {self.enc_len} encoder / {self.dec_len} decoder tokens cannot "
                        f"hold even the character {text[start]!r}; use longer chunks"
                    )
                end = start + k
            assert got is not None  # _largest gives the tokens of every k >= 1
            out.append(Span(start, end, got[0], got[1]))
            start = end
        return out


def sentencepiece_token_ends(tok) -> Callable[[str], list[int]]:
    """text -> character offset where each token of a memtrain (SentencePiece) tokenizer ends."""
    sp = tok.processor

    def ends(text: str) -> list[int]:
        byte_to_char = np.zeros(len(text.encode("utf-8")) + 1, dtype=np.int64)
        pos = 0
        for i, ch in enumerate(text):
            pos += len(ch.encode("utf-8"))
            byte_to_char[pos] = i + 1
        np.maximum.accumulate(byte_to_char, out=byte_to_char)
        return [int(byte_to_char[p.end]) for p in sp.encode(text, out_type="proto").pieces]

    return ends


def hf_token_ends(tok) -> Callable[[str], list[int]] | None:
    """text -> character offset where each token of a fast Hugging Face tokenizer ends (None for a slow one)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None

    def ends(text: str) -> list[int]:
        return [e for _, e in backend.encode(text, add_special_tokens=False).offsets]

    return ends


def dual_chunker(enc_tok, dec_tok, enc_len: int, dec_len: int) -> TextSpanChunker:
    """The :class:`TextSpanChunker` of a memtrain encoder tokenizer and a Hugging Face decoder tokenizer."""
    sp = enc_tok.processor  # one string at a time: a list would go through SentencePiece's thread pool
    backend = getattr(dec_tok, "backend_tokenizer", None)  # a fast tokenizer's Rust side: same ids, less overhead
    encode_dec = (
        (lambda t: backend.encode(t, add_special_tokens=False).ids)
        if backend is not None
        else (lambda t: dec_tok.encode(t, add_special_tokens=False))
    )
    return TextSpanChunker(
        sp.EncodeAsIds,
        encode_dec,
        enc_len,
        dec_len,
        enc_tok.eos_id,
        dec_tok.eos_token_id,
        sentencepiece_token_ends(enc_tok),
        hf_token_ends(dec_tok),
    )


# ----------------------------------------------------------------------------------------------------
# Shards


class _DualSplitWriter:
    """Groups one split's spans into rows of ``n_chunks`` and writes them with ``MDSWriter``."""

    def __init__(self, out: Path, layout: DualLayout, enc_dtype: str, enc_pad: int, shard_size) -> None:
        from memtrain.data.streaming_compat import import_streaming

        C, L, Ld = layout.n_chunks, layout.enc_len, layout.dec_len
        self.layout, self.enc_dtype, self.enc_pad = layout, np.dtype(enc_dtype), enc_pad
        self.writer = import_streaming().MDSWriter(
            out=str(out),
            columns={
                "input_ids": f"ndarray:{enc_dtype}:{C},{L}",
                "dec_input_ids": f"ndarray:int32:{C},{Ld}",
                "dec_attention_mask": f"ndarray:uint8:{C},{Ld}",
            },
            compression="zstd",
            size_limit=shard_size,
            progress_bar=False,
            exist_ok=False,
        )
        self.pending: list[Span] = []
        self.rows = self.documents = self.enc_tokens = self.dec_tokens = 0

    def add(self, spans: list[Span]) -> None:
        """Append one document's spans and write every complete row."""
        self.documents += 1
        self.pending.extend(spans)
        C, L, Ld = self.layout.n_chunks, self.layout.enc_len, self.layout.dec_len
        while len(self.pending) >= C:
            row, self.pending = self.pending[:C], self.pending[C:]
            enc = np.full((C, L), self.enc_pad, dtype=self.enc_dtype)
            dec = np.zeros((C, Ld), dtype=np.int32)
            mask = np.zeros((C, Ld), dtype=np.uint8)
            for c, s in enumerate(row):
                enc[c, : len(s.enc_ids)] = s.enc_ids
                dec[c, : len(s.dec_ids)] = s.dec_ids
                mask[c, : len(s.dec_ids)] = 1
                self.enc_tokens += len(s.enc_ids)
                self.dec_tokens += len(s.dec_ids)
            self.writer.write({"input_ids": enc, "dec_input_ids": dec, "dec_attention_mask": mask})
            self.rows += 1

    def finish(self) -> dict:
        """Close the writer; returns the split's counts (``tokens`` = rows x row length, as for other shards;
        ``encoder_tokens`` / ``decoder_tokens`` = unpadded ids written; ``dropped_tail_spans``)."""
        self.writer.finish()
        return {
            "rows": self.rows,
            "tokens": self.rows * self.layout.row_len,
            "documents": self.documents,
            "dropped_tail_tokens": sum(len(s.enc_ids) for s in self.pending),
            "dropped_tail_spans": len(self.pending),
            "encoder_tokens": self.enc_tokens,
            "decoder_tokens": self.dec_tokens,
        }


def build_dual_shards(
    sources: Sequence[str],
    tokenizer_path: str | Path,
    decoder_tokenizer: str | Path,
    out_dir: str | Path,
    chunk_len: int,
    n_chunks: int,
    decoder_chunk_len: int | None = None,
    val_fraction: float = 0.01,
    shard_size: str | int = "32mb",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Cut ``sources`` into text spans and write dual train/val MDS shards to ``out_dir``.

    Args:
        sources: parquet / jsonl / txt files, directories or globs.
        tokenizer_path: the encoder's memtrain ``tokenizer.model`` (or its directory).
        decoder_tokenizer: the LLM's Hugging Face tokenizer directory (the LLM's own directory works).
        chunk_len / decoder_chunk_len: L (encoder) and L_dec (decoder, default L) tokens per chunk.
        n_chunks: C spans per row.
        val_fraction, seed: documents held out for validation, by the same stable hash of the document id as
            :func:`memtrain.data.ingest.build_shards`.

    Writes ``train/``, ``val/``, ``tokenizer.model``, ``decoder_tokenizer/`` and ``memtrain_shards.json``
    (its ``row_len`` is the dual row's C*(L + L_dec) and its ``dual`` entry describes the decoder side);
    built in a temporary directory and renamed into place, as ``build_shards`` does. Returns the summary.
    """
    from tqdm import tqdm

    from memtrain.data.documents import expand_sources, is_val_document, iter_documents
    from memtrain.data.ingest import FORMAT_VERSION, _check_out_dir, publish_shards
    from memtrain.data.tokenizer import TOKENIZER_FILE, Tokenizer

    t0 = time.time()
    decoder_chunk_len = chunk_len if decoder_chunk_len is None else decoder_chunk_len
    if n_chunks < 1:
        raise UserError(f"--chunks: expected >= 1, got {n_chunks}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    files = expand_sources(sources)
    enc_tok = Tokenizer.load(tokenizer_path)
    dec_tok = load_decoder_tokenizer(decoder_tokenizer)
    chunker = dual_chunker(enc_tok, dec_tok, chunk_len, decoder_chunk_len)
    layout = DualLayout(n_chunks, chunk_len, decoder_chunk_len)
    enc_dtype = "uint16" if enc_tok.vocab_size <= 65536 else "int32"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    bar = None
    try:
        writers = {"train": _DualSplitWriter(tmp / "train", layout, enc_dtype, enc_tok.pad_id, shard_size)}
        if val_fraction > 0:
            writers["val"] = _DualSplitWriter(tmp / "val", layout, enc_dtype, enc_tok.pad_id, shard_size)
        bar = tqdm(
            desc="cutting spans",
            unit=" docs",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        for doc_id, text in iter_documents(files):
            split = "val" if is_val_document(doc_id, val_fraction, seed) else "train"
            writers[split].add(chunker.spans(text))
            bar.update(1)
        bar.close()
        counts = {name: w.finish() for name, w in writers.items()}
        if sum(c["documents"] for c in counts.values()) == 0:
            raise UserError(f"{', '.join(map(str, sources))}: no documents found (empty corpus)")
        for name, c in counts.items():
            if c["rows"] == 0:
                raise UserError(
                    f"{name} split is empty: its {c['documents']} documents make {c['dropped_tail_spans']} "
                    f"spans, fewer than one row of {n_chunks}; add text"
                    + (" or change --val-fraction" if name == "val" else "")
                )
        shutil.copyfile(enc_tok.path, tmp / TOKENIZER_FILE)
        dec_tok.save_pretrained(str(tmp / DECODER_TOKENIZER_DIR))
        info = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": enc_tok.sha256,
            "vocab_size": enc_tok.vocab_size,
            "row_len": layout.row_len,
            "dtype": enc_dtype,
            "special_ids": enc_tok.special_ids,
            "splits": counts,
            "dropped_tail_tokens": sum(c["dropped_tail_tokens"] for c in counts.values()),
            "dual": {
                "n_chunks": n_chunks,
                "chunk_len": chunk_len,
                "decoder_chunk_len": decoder_chunk_len,
                "decoder_tokenizer": DECODER_TOKENIZER_DIR,
                "decoder_tokenizer_sha256": decoder_tokenizer_sha256(dec_tok),
                "decoder_vocab_size": len(dec_tok),
                "decoder_special_ids": decoder_special_ids(dec_tok),
            },
        }
        publish_shards(
            tmp, out, info, val_fraction=val_fraction, seed=seed, sources=sources, files=files, overwrite=overwrite
        )
    except BaseException:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "out_dir": str(out), "seconds": time.time() - t0}


def format_dual_summary(summary: dict) -> str:
    """:func:`memtrain.data.ingest.format_summary` plus the decoder side and the padding of each side."""
    from memtrain.data.ingest import format_summary

    d = summary["dual"]
    lines = [
        format_summary(summary),
        f"  dual rows: {d['n_chunks']} chunks x ({d['chunk_len']} encoder + {d['decoder_chunk_len']} decoder) "
        f"positions; decoder tokenizer {d['decoder_tokenizer_sha256'][:12]}, vocab {d['decoder_vocab_size']}",
    ]
    for name, c in summary["splits"].items():
        slots = max(c["rows"] * d["n_chunks"], 1)
        lines.append(
            f"  {name:5s} filled: encoder {c['encoder_tokens'] / (slots * d['chunk_len']):.1%}, "
            f"decoder {c['decoder_tokens'] / (slots * d['decoder_chunk_len']):.1%} of chunk positions"
        )
    return "\n".join(lines)
