"""Reading text corpora: parquet files in FineWeb's schema (``text``, ``id``, ...), jsonl files (one
``{"text": ..., "id": ...}`` object per line) or plain text files (documents separated by blank lines), given
as files, directories (searched recursively by extension) or glob patterns; and the stable train/val split of
documents by id. Used by shard building (:mod:`memtrain.data.ingest`), tokenizer training and the commands
that read documents.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from memtrain.errors import UserError

#: longest piece of text (characters) ingest ever holds for one document: a longer document is read and
#: yielded in consecutive pieces of at most this many characters, cut after the last newline (else the last
#: whitespace) of each piece where there is one, so memory stays bounded whatever the input (a .txt file
#: without blank lines is one document). Shards keep the pieces of a document contiguous, with one EOS after
#: the last; the pieces of a document share its id (same train/val split).
MAX_PIECE_CHARS = 1 << 20
#: longest jsonl line accepted (a line is one JSON object and is parsed whole)
MAX_JSONL_LINE_CHARS = 64 << 20

_KIND_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".txt": "txt", ".txt.gz": "txt"}
_PARQUET_BATCH_ROWS = 1024


# ----------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class SourceFile:
    """One input file: its path, its kind (parquet | jsonl | txt) and the stable name used in derived ids."""

    path: Path
    kind: str
    name: str


def _kind_of(path: Path) -> str | None:
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
    return open(path, encoding="utf-8", newline="\n")


def _open_parquet(f: SourceFile):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{f.path}: not a readable parquet file ({err})") from None


def _iter_parquet(f: SourceFile, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, str, bool]]:
    """Rows ``start .. stop-1`` of a parquet file (all by default), reading only the row groups that hold them."""
    import pyarrow as pa

    pf = _open_parquet(f)
    names = pf.schema_arrow.names
    if "text" not in names:
        raise UserError(f"{f.path}: parquet file has no 'text' column (columns: {', '.join(names) or 'none'})")
    text_type = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise UserError(f"{f.path}: column 'text' has type {text_type}, expected string")
    columns = ["text", "id"] if "id" in names else ["text"]
    meta = pf.metadata
    stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
    groups, first, row = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row < stop and row + n > start:
            groups.append(g)
            first = row if first is None else first
        row += n
    row = start if first is None else first
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns, row_groups=groups):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                if start <= row < stop and text and text.strip():
                    yield from _pieces((str(doc_id) if doc_id is not None else f"{f.name}#{row}"), text)
                row += 1
            if row >= stop:
                break
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
                    raise UserError(
                        f"{f.path}:{lineno}: line longer than {MAX_JSONL_LINE_CHARS} characters; split "
                        "the document over several lines or use a .txt file"
                    )
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{f.path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{f.path}:{lineno}: expected a JSON object with a 'text' field, got {type(obj).__name__}"
                    )
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


@dataclass(frozen=True)
class SourceUnit:
    """A part of a corpus that is read, tokenized and written on its own: rows ``start .. stop-1`` of a parquet
    file, or a whole jsonl or txt file (``stop`` None)."""

    file: SourceFile
    start: int = 0
    stop: int | None = None

    def describe(self) -> str:
        return f"{self.file.path}" + ("" if self.stop is None else f" rows {self.start}-{self.stop - 1}")


def plan_units(files: Sequence[SourceFile], unit_bytes: int) -> list[SourceUnit]:
    """Cut a corpus into units of about ``unit_bytes`` of text, fixed by the files alone (never by how many
    processes read them). A parquet file is cut into ranges of whole rows, as many rows as hold about
    ``unit_bytes`` of its ``text`` column on average (from the file's metadata; nothing is read); a jsonl or
    txt file is one unit (split a large one into several files to spread it)."""
    units: list[SourceUnit] = []
    for f in files:
        if f.kind != "parquet":
            units.append(SourceUnit(f))
            continue
        meta = _open_parquet(f).metadata
        rows = meta.num_rows
        if rows == 0:
            continue
        text_bytes = estimate_text_bytes([f])
        per_unit = max(1, -(-unit_bytes * rows // max(1, text_bytes)))  # ceil
        units.extend(SourceUnit(f, a, min(a + per_unit, rows)) for a in range(0, rows, per_unit))
    return units


def iter_unit_pieces(unit: SourceUnit) -> Iterator[tuple[str, str, bool]]:
    """``(doc_id, piece, is_last)`` of one unit, as :func:`iter_document_pieces` gives them for its file."""
    if unit.file.kind == "parquet":
        return _iter_parquet(unit.file, unit.start, unit.stop)
    return _READERS[unit.file.kind](unit.file)


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
    if sources and all(isinstance(s, SourceFile) for s in sources):
        files = cast(list[SourceFile], list(sources))
    else:
        files = expand_sources(cast(Sequence[str | Path], sources))
    for f in files:
        yield from _READERS[f.kind](f)


def stable_fraction(doc_id: str, seed: int = 0, purpose: bytes = b"split") -> float:
    """A number in [0, 1) fixed by ``(doc_id, seed, purpose)``: blake2b-64 of the id / 2**64."""
    h = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, salt=struct.pack("<q", int(seed)), person=purpose[:16])
    return int.from_bytes(h.digest(), "big") / 2.0**64


def is_val_document(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether document ``doc_id`` belongs to the validation split."""
    return val_fraction > 0 and stable_fraction(doc_id, seed) < val_fraction
