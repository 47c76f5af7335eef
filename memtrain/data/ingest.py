"""Reading text corpora and writing them as packed, tokenized MDS shards.

Sources are parquet files in FineWeb's schema (``text``, ``id``, ...), jsonl files (one
``{"text": ..., "id": ...}`` object per line) or plain text files (documents separated by blank lines),
given as files, directories (searched recursively by extension) or glob patterns.

:func:`build_shards` writes::

    OUT/train/         MDS shards (index.json + shard.*.mds.zstd), column input_ids: ndarray uint16[row_len]
    OUT/val/           the same for the validation split (absent when val_fraction is 0)
    OUT/tokenizer.model
    OUT/memtrain_shards.json

Every document is tokenized, followed by EOS, and the stream of each split is cut into rows of exactly
``row_len`` tokens (a row may span documents; the split's last partial row is dropped and counted). A
document goes to validation when a stable hash of its id falls below ``val_fraction``, so membership does
not depend on document order, worker count or which other documents exist.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from memtrain.data.documents import expand_sources, is_val_document, iter_document_pieces
from memtrain.errors import UserError

FORMAT_VERSION = 1
INFO_FILE = "memtrain_shards.json"
SPLITS = ("train", "val")

# ----------------------------------------------------------------------------------------------------
# Tokenization workers


_worker_sp = None


def _init_worker(model_bytes: bytes) -> None:
    global _worker_sp
    import sentencepiece as spm

    _worker_sp = spm.SentencePieceProcessor()
    _worker_sp.LoadFromSerializedProto(model_bytes)


def _encode_chunk(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a chunk of documents (or document pieces): returns (all ids with EOS after each document,
    per-text lengths). ``args``: ``(texts, eos_id, dtype)`` or ``(texts, eos_id, dtype, lasts)`` where
    ``lasts[i]`` False marks a piece continued by the next text (no EOS after it)."""
    texts, eos_id, dtype = args[:3]
    lasts = args[3] if len(args) > 3 else [True] * len(texts)
    assert _worker_sp is not None  # set by _init_worker before any chunk is encoded
    pieces = _worker_sp.Encode(texts, out_type=int)
    lengths = np.fromiter((len(p) + int(last) for p, last in zip(pieces, lasts)), dtype=np.int64, count=len(pieces))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for p, last in zip(pieces, lasts):
        flat[pos : pos + len(p)] = p
        pos += len(p)
        if last:
            flat[pos] = eos_id
            pos += 1
    return flat, lengths


class _InOrderPool:
    """``imap`` with bounded look-ahead: results come back in submission order; at most ``window`` chunks
    are in flight, so a huge corpus is never read ahead into memory. ``workers <= 1`` runs in-process."""

    def __init__(self, workers: int, model_bytes: bytes, window: int) -> None:
        self.workers = workers
        self.window = window
        self.pool = None
        if workers > 1:
            import multiprocessing as mp

            # spawn: safe whatever threads the parent has started (torch, tqdm's monitor)
            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(model_bytes,))
        else:
            _init_worker(model_bytes)

    def imap(self, jobs: Iterator, fn=_encode_chunk) -> Iterator:
        """``(key, args)`` jobs -> ``(key, fn(args))`` results, in job order."""
        if self.pool is None:
            for job in jobs:
                yield job[0], fn(job[1])
            return
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append((job[0], self.pool.apply_async(fn, (job[1],))))
            if len(pending) >= self.window:
                key, res = pending.popleft()
                yield key, res.get()
        while pending:
            key, res = pending.popleft()
            yield key, res.get()

    def close(self) -> None:
        """Stop the worker processes."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# ----------------------------------------------------------------------------------------------------
# Packing and writing


class _SplitWriter:
    """Packs one split's token stream into rows of ``row_len`` and writes them with ``MDSWriter``."""

    def __init__(self, out: Path, row_len: int, dtype: str, shard_size) -> None:
        from memtrain.data.streaming_compat import import_streaming

        streaming = import_streaming()
        self.row_len = row_len
        self.dtype = np.dtype(dtype)
        self.writer = streaming.MDSWriter(
            out=str(out),
            columns={"input_ids": f"ndarray:{dtype}:{row_len}"},
            compression="zstd",
            size_limit=shard_size,
            progress_bar=False,
            exist_ok=False,
        )
        self.pending = np.empty(0, dtype=self.dtype)
        self.rows = 0
        self.documents = 0
        self.doc_tokens = 0

    def add(self, tokens: np.ndarray, n_docs: int) -> None:
        """Append the tokens of ``n_docs`` whole documents (EOS included) and write every full row."""
        self.documents += n_docs
        self.doc_tokens += int(tokens.size)
        buf = np.concatenate([self.pending, tokens]) if self.pending.size else tokens
        n_full = buf.size // self.row_len
        if n_full:
            rows = buf[: n_full * self.row_len].reshape(n_full, self.row_len)
            for row in rows:
                self.writer.write({"input_ids": row})
            self.rows += n_full
        self.pending = buf[n_full * self.row_len :].copy()

    def finish(self) -> dict:
        """Close the writer; returns ``{rows, tokens, documents, dropped_tail_tokens}``."""
        self.writer.finish()
        return {
            "rows": self.rows,
            "tokens": self.rows * self.row_len,
            "documents": self.documents,
            "dropped_tail_tokens": int(self.pending.size),
        }


def publish_shards(
    tmp: Path,
    out: Path,
    info: dict,
    *,
    val_fraction: float,
    seed: int,
    sources: Sequence,
    files: Sequence,
    overwrite: bool,
) -> None:
    """Complete ``info`` with what every shard manifest records (split settings, sources, time, version), write
    it into the finished temporary directory ``tmp`` and move that to ``out`` (checked again first: nothing
    may have appeared there meanwhile)."""
    info.update(
        {
            "val_fraction": val_fraction,
            "seed": seed,
            "sources": [str(s) for s in sources],
            "files": len(files),
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "memtrain_version": _version(),
        }
    )
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    _check_out_dir(out, overwrite)
    _replace_dir(tmp, out)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out}: output directory exists and is not empty; choose another --out or pass "
                "--overwrite to replace it"
            )
        if not (out / INFO_FILE).is_file():
            raise UserError(
                f"{out}: refusing to overwrite a directory that is not a memtrain shard directory "
                f"(it has no {INFO_FILE})"
            )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place as ``out``; an old ``out`` is removed only after the move."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def build_shards(
    sources: Sequence[str],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    row_len: int,
    val_fraction: float = 0.01,
    workers: int = 2,
    shard_size: str | int = "32mb",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize ``sources`` and write train/val MDS shards of ``row_len``-token rows to ``out_dir``.

    Args:
        sources: parquet / jsonl / txt files, directories or globs.
        tokenizer_path: a memtrain ``tokenizer.model`` (or a directory holding one).
        out_dir: the shard directory to create. It must not exist or be empty, unless ``overwrite`` (then it
            must be an earlier shard directory). Built in ``<out_dir>.tmp-XXXX`` and renamed into place, so a
            failed or interrupted build leaves nothing behind.
        row_len: tokens per row (= model.chunk_len * model.n_chunks), >= 2.
        val_fraction: expected fraction of documents in the validation split (by a stable hash of the id
            salted with ``seed``); 0 writes no validation split.
        workers: tokenizer processes; the output is identical for any value.
        shard_size: MDS shard size limit (bytes, or a string such as ``"32mb"``).
        progress: show a tqdm bar (documents/s and tokens).

    Rows are ``ndarray:uint16:<row_len>`` (``int32`` when the vocabulary exceeds 65536 ids), zstd-compressed.
    Returns the summary written to ``out_dir/memtrain_shards.json`` plus ``out_dir`` and ``seconds``.
    Raises :class:`UserError` for bad arguments or input, an empty corpus, or an empty split.
    """
    from memtrain.data.tokenizer import TOKENIZER_FILE, Tokenizer

    t0 = time.time()
    if int(row_len) != row_len or row_len < 2:
        raise UserError(f"--row-len: rows must hold at least 2 tokens, got {row_len}")
    row_len = int(row_len)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    if workers < 1:
        raise UserError(f"--workers: expected >= 1, got {workers}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    files = expand_sources(sources)
    tok = Tokenizer.load(tokenizer_path)
    dtype = "uint16" if tok.vocab_size <= 65536 else "int32"
    model_bytes = tok.path.read_bytes()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the final directory gets the usual mode
    pool = None
    bar = None
    try:
        writers = {"train": _SplitWriter(tmp / "train", row_len, dtype, shard_size)}
        if val_fraction > 0:
            writers["val"] = _SplitWriter(tmp / "val", row_len, dtype, shard_size)
        pool = _InOrderPool(workers, model_bytes, window=4 * workers)
        from tqdm import tqdm

        bar = tqdm(
            desc="tokenizing", unit=" docs", disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=0.5
        )
        total_tokens = 0
        chunks = _doc_chunks(iter_document_pieces(files), chunk_bytes=1 << 20, chunk_docs=512)
        jobs = (((ids, lasts), (texts, tok.eos_id, dtype, lasts)) for ids, texts, lasts in chunks)
        for (ids, lasts), (flat, lengths) in pool.imap(jobs):
            ends = np.cumsum(lengths)
            starts = ends - lengths
            val_mask = np.fromiter((is_val_document(i, val_fraction, seed) for i in ids), dtype=bool, count=len(ids))
            for split, mask in (("train", ~val_mask), ("val", val_mask)):
                if not mask.any():
                    continue
                if mask.all():
                    part = flat
                else:
                    part = np.concatenate([flat[s:e] for s, e in zip(starts[mask], ends[mask])])
                # pieces of one document share its id, hence its split: they stay contiguous in that split
                writers[split].add(part, int(np.asarray(lasts, dtype=bool)[mask].sum()))
            total_tokens += int(flat.size)
            bar.update(int(sum(lasts)))
            bar.set_postfix_str(f"{total_tokens / 1e6:.2f}M tokens", refresh=False)
        bar.close()
        pool.close()
        pool = None
        counts = {name: w.finish() for name, w in writers.items()}
        n_docs = sum(c["documents"] for c in counts.values())
        if n_docs == 0:
            raise UserError(f"{', '.join(map(str, sources))}: no documents found (empty corpus)")
        tr = counts["train"]
        if tr["rows"] == 0:
            raise UserError(
                f"train split is empty: its {tr['documents']} documents hold {tr['dropped_tail_tokens']} "
                f"tokens, fewer than one row of --row-len {row_len}; add text or use a shorter row"
            )
        if "val" in counts and counts["val"]["rows"] == 0:
            v = counts["val"]
            all_tokens = sum(c["rows"] * row_len + c["dropped_tail_tokens"] for c in counts.values())
            need = max(2 * val_fraction, 8 * row_len / max(1, all_tokens))  # aim at ~8 rows
            raise UserError(
                f"validation split would be empty: {v['documents']} of {n_docs} documents fell in it "
                f"({v['dropped_tail_tokens']} tokens, less than one row of {row_len}); use a larger "
                f"--val-fraction (e.g. {min(0.5, need):.3g}) or pass --val-fraction 0 for no validation split"
            )
        shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
        info = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "row_len": row_len,
            "dtype": dtype,
            "special_ids": tok.special_ids,
            "splits": counts,
            "dropped_tail_tokens": sum(c["dropped_tail_tokens"] for c in counts.values()),
        }
        publish_shards(
            tmp, out, info, val_fraction=val_fraction, seed=seed, sources=sources, files=files, overwrite=overwrite
        )
    except BaseException:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "out_dir": str(out), "seconds": time.time() - t0}


def _version() -> str:
    try:
        from memtrain import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def format_summary(summary: dict) -> str:
    """A few human-readable lines: rows, tokens and documents per split, dropped tail, time."""
    lines = [
        f"{summary['out_dir']}: rows of {summary['row_len']} tokens, vocab {summary['vocab_size']}, "
        f"tokenizer {summary['tokenizer_sha256'][:12]}"
    ]
    for name, c in summary["splits"].items():
        lines.append(
            f"  {name:5s} {c['rows']:>10,} rows  {c['tokens']:>13,} tokens  {c['documents']:>9,} docs  "
            f"(dropped tail {c['dropped_tail_tokens']:,} tokens)"
        )
    if "seconds" in summary:
        lines.append(f"  done in {summary['seconds']:.1f} s")
    return "\n".join(lines)
