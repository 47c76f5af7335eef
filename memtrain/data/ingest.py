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
import glob
import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from memtrain.errors import UserError

FORMAT_VERSION = 1
INFO_FILE = "memtrain_shards.json"
SPLITS = ("train", "val")

#: longest piece of text (characters) ingest ever holds for one document: a longer document is read and
#: yielded in consecutive pieces of at most this many characters, cut after the last newline (else the last
#: whitespace) of each piece where there is one, so memory stays bounded whatever the input (a .txt file
#: without blank lines is one document). Shards keep the pieces of a document contiguous, with one EOS after
#: the last; the pieces of a document share its id (same train/val split).
MAX_PIECE_CHARS = 1 << 20
#: longest jsonl line accepted (a line is one JSON object and is parsed whole)
MAX_JSONL_LINE_CHARS = 64 << 20

_KIND_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".txt": "txt",
                   ".txt.gz": "txt"}
_PARQUET_BATCH_ROWS = 1024


# ----------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class SourceFile:
    """One input file: its path, its kind (parquet | jsonl | txt) and the stable name used in derived ids."""

    path: Path
    kind: str
    name: str


def _kind_of(path: Path) -> Optional[str]:
    name = path.name.lower()
    for suffix, kind in _KIND_BY_SUFFIX.items():
        if name.endswith(suffix):
            return kind
    return None


def _files_under(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not f.startswith(".") and _kind_of(p):
                found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _glob_root(pattern: str) -> Path:
    """The longest leading directory of ``pattern`` without glob characters."""
    parts = Path(pattern).parts
    root: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        root.append(part)
    return Path(*root) if root else Path(".")


def expand_sources(sources: Sequence[str | Path]) -> list[SourceFile]:
    """Resolve files, directories and globs into a sorted, de-duplicated list of :class:`SourceFile`.

    Names used for derived document ids are stable under the working directory: a file given directly is
    named by its file name, files found under a directory or a glob by their path relative to it.
    Raises :class:`UserError` for a path that does not exist, a glob that matches nothing, an unsupported
    file type, or when nothing readable is found at all.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise UserError("no input given: pass one or more parquet / jsonl / txt files, directories or globs")
    out: list[SourceFile] = []
    seen: set[Path] = set()

    def add(path: Path, name: str) -> None:
        real = path.resolve()
        if real in seen:
            return
        seen.add(real)
        out.append(SourceFile(path=path, kind=_kind_of(path) or "", name=name))

    for src in sources:
        s = str(src)
        if glob.has_magic(s):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise UserError(f"{s}: the pattern matches no files")
            root = _glob_root(s)
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    for f in _files_under(mp):
                        add(f, f.relative_to(root).as_posix())
                elif _kind_of(mp):
                    add(mp, mp.relative_to(root).as_posix())
            continue
        p = Path(s)
        if not p.exists():
            raise UserError(f"{s}: input not found (expected a parquet, jsonl or txt file, a directory or a glob)")
        if p.is_dir():
            files = _files_under(p)
            if not files:
                raise UserError(f"{s}: directory holds no .parquet, .jsonl, .jsonl.gz, .txt or .txt.gz files")
            for f in files:
                add(f, f.relative_to(p).as_posix())
        else:
            if not _kind_of(p):
                raise UserError(f"{s}: unsupported file type; expected .parquet, .jsonl, .jsonl.gz, .txt or .txt.gz")
            add(p, p.name)
    if not out:
        raise UserError(f"{', '.join(map(str, sources))}: no parquet, jsonl or txt files found")
    return out


def estimate_text_bytes(files: Sequence[SourceFile]) -> int:
    """Cheap estimate of the corpus's text bytes (parquet: uncompressed size of the ``text`` column)."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        if f.kind == "parquet":
            try:
                meta = pq.ParquetFile(f.path).metadata
                names = [meta.schema.column(i).name for i in range(meta.num_columns)]
                col = names.index("text") if "text" in names else None
                for rg in range(meta.num_row_groups):
                    g = meta.row_group(rg)
                    total += g.column(col).total_uncompressed_size if col is not None else g.total_byte_size
            except Exception:  # unreadable files are reported properly by iter_documents
                total += f.path.stat().st_size
        else:
            size = f.path.stat().st_size
            total += size * 4 if f.path.name.endswith(".gz") else size
    return total


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, "r", encoding="utf-8", newline="\n")


def _iter_parquet(f: SourceFile) -> Iterator[tuple[str, str, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{f.path}: not a readable parquet file ({err})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise UserError(f"{f.path}: parquet file has no 'text' column (columns: {', '.join(names) or 'none'})")
    text_type = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise UserError(f"{f.path}: column 'text' has type {text_type}, expected string")
    columns = ["text", "id"] if "id" in names else ["text"]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                if text and text.strip():
                    yield from _pieces((str(doc_id) if doc_id is not None else f"{f.name}#{row}"), text)
                row += 1
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{f.path}: cannot read parquet row {row} onwards ({err})") from None


def _iter_jsonl(f: SourceFile) -> Iterator[tuple[str, str, bool]]:
    lineno = 0
    try:
        with _open_text(f.path) as fh:
            while True:
                line = fh.readline(MAX_JSONL_LINE_CHARS + 1)
                if not line:
                    break
                lineno += 1
                if len(line) > MAX_JSONL_LINE_CHARS and not line.endswith("\n"):
                    raise UserError(f"{f.path}:{lineno}: line longer than {MAX_JSONL_LINE_CHARS} characters; split "
                                    "the document over several lines or use a .txt file")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{f.path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{f.path}:{lineno}: expected a JSON object with a 'text' field, "
                                    f"got {type(obj).__name__}")
                text = obj.get("text")
                if not isinstance(text, str):
                    what = "is missing" if "text" not in obj else f"is {type(text).__name__}, not a string"
                    raise UserError(f"{f.path}:{lineno}: field 'text' {what}")
                if not text.strip():
                    continue
                doc_id = obj.get("id")
                yield from _pieces((str(doc_id) if doc_id is not None else f"{f.name}:{lineno}"), text)
    except UnicodeDecodeError as err:
        raise UserError(f"{f.path}:{lineno + 1}: not UTF-8 text ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise UserError(f"{f.path}: cannot read ({err})") from None


def _cut(text: str, limit: int) -> int:
    """Where to end a piece of ``text`` (longer than ``limit``): after its last newline, else its last
    whitespace, within the first ``limit`` characters (else exactly at ``limit``)."""
    k = text.rfind("\n", 0, limit)
    if k <= 0:
        k = max(text.rfind(" ", 0, limit), text.rfind("\t", 0, limit))
    return k + 1 if k > 0 else limit


def _pieces(doc_id: str, text: str, limit: int = MAX_PIECE_CHARS) -> Iterator[tuple[str, str, bool]]:
    """``(doc_id, piece, is_last)`` for a document held in memory, in pieces of at most ``limit`` characters."""
    while len(text) > limit:
        k = _cut(text, limit)
        yield doc_id, text[:k], False
        text = text[k:]
    yield doc_id, text, True


def _iter_txt(f: SourceFile, limit: int = MAX_PIECE_CHARS) -> Iterator[tuple[str, str, bool]]:
    """Documents separated by blank lines, read in lines of at most ``limit`` characters and yielded in pieces
    of at most ``limit`` characters (a file without blank lines is one document, held only piece by piece)."""
    index = 0
    lineno = 0
    buf: list[str] = []
    size = 0
    at_line_start = True
    try:
        with _open_text(f.path) as fh:
            while True:
                line = fh.readline(limit)
                if not line:
                    break
                complete = line.endswith("\n")
                if at_line_start:
                    lineno += 1
                if at_line_start and complete and not line.strip():  # a blank line ends the document
                    if buf:
                        yield f"{f.name}#{index}", "".join(buf).rstrip("\n"), True
                        index += 1
                        buf, size = [], 0
                    at_line_start = True
                    continue
                at_line_start = complete
                buf.append(line)
                size += len(line)
                if size > limit:  # emit a full piece, keep the rest (less than one line) for the next
                    text = "".join(buf)
                    while len(text) > limit:
                        k = _cut(text, limit)
                        yield f"{f.name}#{index}", text[:k], False
                        text = text[k:]
                    buf, size = [text], len(text)
        if buf:
            yield f"{f.name}#{index}", "".join(buf).rstrip("\n"), True
    except UnicodeDecodeError as err:
        raise UserError(f"{f.path}:{lineno + 1}: not UTF-8 text ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise UserError(f"{f.path}: cannot read ({err})") from None


_READERS = {"parquet": _iter_parquet, "jsonl": _iter_jsonl, "txt": _iter_txt}


def iter_documents(sources: Sequence[str | Path] | Sequence[SourceFile]) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for every non-empty document of ``sources``, in a fixed order.

    ``sources``: paths / directories / globs (see :func:`expand_sources`) or already expanded
    :class:`SourceFile` objects. Parquet is read in batches of row groups (never whole files); ids come from
    the ``id`` column/field when present, else ``<file>#<row>`` (parquet), ``<file>:<line>`` (jsonl) or
    ``<file>#<index>`` (txt). Malformed input raises :class:`UserError` naming the file (and line).
    A document longer than :data:`MAX_PIECE_CHARS` characters is yielded as consecutive pieces of at most that
    many characters, all with the document's id (memory stays bounded; see :func:`iter_document_pieces`).
    """
    for doc_id, text, _ in iter_document_pieces(sources):
        yield doc_id, text


def iter_document_pieces(sources: Sequence[str | Path] | Sequence[SourceFile]) -> Iterator[tuple[str, str, bool]]:
    """Like :func:`iter_documents`, with ``is_last``: ``(doc_id, piece, is_last)``. A document longer than
    :data:`MAX_PIECE_CHARS` characters comes in consecutive pieces with the same id, ``is_last`` True on its
    final piece only (every other document is one piece with ``is_last`` True)."""
    files = list(sources) if sources and all(isinstance(s, SourceFile) for s in sources) else expand_sources(sources)
    for f in files:
        yield from _READERS[f.kind](f)


def stable_fraction(doc_id: str, seed: int = 0, purpose: bytes = b"split") -> float:
    """A number in [0, 1) fixed by ``(doc_id, seed, purpose)``: blake2b-64 of the id / 2**64."""
    h = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, salt=struct.pack("<q", int(seed)),
                        person=purpose[:16])
    return int.from_bytes(h.digest(), "big") / 2.0 ** 64


def is_val_document(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether document ``doc_id`` belongs to the validation split."""
    return val_fraction > 0 and stable_fraction(doc_id, seed) < val_fraction


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
    pieces = _worker_sp.Encode(texts, out_type=int)
    lengths = np.fromiter((len(p) + int(last) for p, last in zip(pieces, lasts)), dtype=np.int64,
                          count=len(pieces))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for p, last in zip(pieces, lasts):
        flat[pos:pos + len(p)] = p
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
        self.writer = streaming.MDSWriter(out=str(out), columns={"input_ids": f"ndarray:{dtype}:{row_len}"},
                                          compression="zstd", size_limit=shard_size, progress_bar=False,
                                          exist_ok=False)
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
        self.pending = buf[n_full * self.row_len:].copy()

    def finish(self) -> dict:
        """Close the writer; returns ``{rows, tokens, documents, dropped_tail_tokens}``."""
        self.writer.finish()
        return {"rows": self.rows, "tokens": self.rows * self.row_len, "documents": self.documents,
                "dropped_tail_tokens": int(self.pending.size)}


def publish_shards(tmp: Path, out: Path, info: dict, *, val_fraction: float, seed: int, sources: Sequence,
                   files: Sequence, overwrite: bool) -> None:
    """Complete ``info`` with what every shard manifest records (split settings, sources, time, version), write
    it into the finished temporary directory ``tmp`` and move that to ``out`` (checked again first: nothing
    may have appeared there meanwhile)."""
    info.update({"val_fraction": val_fraction, "seed": seed, "sources": [str(s) for s in sources],
                 "files": len(files), "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "memtrain_version": _version()})
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    _check_out_dir(out, overwrite)
    _replace_dir(tmp, out)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: output directory exists and is not empty; choose another --out or pass "
                            "--overwrite to replace it")
        if not (out / INFO_FILE).is_file():
            raise UserError(f"{out}: refusing to overwrite a directory that is not a memtrain shard directory "
                            f"(it has no {INFO_FILE})")


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


def _doc_chunks(docs: Iterator[tuple[str, str, bool]], chunk_bytes: int, chunk_docs: int,
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


def build_shards(sources: Sequence[str], tokenizer_path: str | Path, out_dir: str | Path, row_len: int,
                 val_fraction: float = 0.01, workers: int = 2, shard_size: str | int = "32mb", seed: int = 0,
                 overwrite: bool = False, progress: bool = True) -> dict:
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

        bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress, file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5)
        total_tokens = 0
        chunks = _doc_chunks(iter_document_pieces(files), chunk_bytes=1 << 20, chunk_docs=512)
        jobs = (((ids, lasts), (texts, tok.eos_id, dtype, lasts)) for ids, texts, lasts in chunks)
        for (ids, lasts), (flat, lengths) in pool.imap(jobs):
            ends = np.cumsum(lengths)
            starts = ends - lengths
            val_mask = np.fromiter((is_val_document(i, val_fraction, seed) for i in ids), dtype=bool,
                                   count=len(ids))
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
            raise UserError(f"train split is empty: its {tr['documents']} documents hold {tr['dropped_tail_tokens']} "
                            f"tokens, fewer than one row of --row-len {row_len}; add text or use a shorter row")
        if "val" in counts and counts["val"]["rows"] == 0:
            v = counts["val"]
            all_tokens = sum(c["rows"] * row_len + c["dropped_tail_tokens"] for c in counts.values())
            need = max(2 * val_fraction, 8 * row_len / max(1, all_tokens))  # aim at ~8 rows
            raise UserError(
                f"validation split would be empty: {v['documents']} of {n_docs} documents fell in it "
                f"({v['dropped_tail_tokens']} tokens, less than one row of {row_len}); use a larger "
                f"--val-fraction (e.g. {min(0.5, need):.3g}) or pass --val-fraction 0 for no validation split")
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
        publish_shards(tmp, out, info, val_fraction=val_fraction, seed=seed, sources=sources, files=files,
                       overwrite=overwrite)
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
    lines = [f"{summary['out_dir']}: rows of {summary['row_len']} tokens, vocab {summary['vocab_size']}, "
             f"tokenizer {summary['tokenizer_sha256'][:12]}"]
    for name, c in summary["splits"].items():
        lines.append(f"  {name:5s} {c['rows']:>10,} rows  {c['tokens']:>13,} tokens  {c['documents']:>9,} docs  "
                     f"(dropped tail {c['dropped_tail_tokens']:,} tokens)")
    if "seconds" in summary:
        lines.append(f"  done in {summary['seconds']:.1f} s")
    return "\n".join(lines)
