#!/usr/bin/env python3
"""Build memtrain's bundled demo corpus from Debian documentation packages.

The corpus is real English prose in FineWeb's parquet schema (text, id, dump, url, date, file_path,
language, language_score, token_count), taken from:

* the Python 3.11 documentation (Debian ``python3.11-doc``, reST sources under
  ``/usr/share/doc/python3.11/html/_sources``; PSF License Agreement), and
* the PostgreSQL 15 documentation (Debian ``postgresql-doc-15``, HTML under
  ``/usr/share/doc/postgresql-doc-15/html``; PostgreSQL License).

Install them first::

    apt-get update && apt-get install -y --no-install-recommends python3.11-doc postgresql-doc-15

Extraction keeps prose only: reST/HTML markup is stripped; code and literal blocks, doctests, tables,
grid/simple tables, ``<pre>`` blocks, navigation, comments, labels and the bodies of non-prose directives
(code-block, toctree, index, productionlist, ...) are dropped; the bodies of description directives
(function, class, method, ...) and admonitions (note, warning, seealso, ...) are kept. A paragraph is kept
when it has at least 40 characters and at least 75 % of its non-space characters are letters. One document
per source page; pages longer than ``--max-doc-chars`` are split at paragraph boundaries into sections,
with ids ``pydoc/<relpath>#<n>`` / ``pgdoc/<file>#<n>``.

The output is deterministic for given package versions (sorted file order, no clocks, fixed row groups;
``date`` is the installed file's modification time, which comes from the package).

Usage::

    python tools/build_demo_corpus.py --out memtrain/data/demo/demo-corpus.parquet
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import html.parser
import re
import sys
from pathlib import Path

PY_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
PG_ROOT = Path("/usr/share/doc/postgresql-doc-15/html")
PY_URL = "https://docs.python.org/3.11/{}.html"
PG_URL = "https://www.postgresql.org/docs/15/{}"

MIN_CHARS = 40
MIN_LETTER_RATIO = 0.75

# --------------------------------------------------------------------------------------------------
# paragraph filter


def is_prose(par: str) -> bool:
    """True when ``par`` has >= 40 characters and >= 75 % letters among its non-space characters."""
    if len(par) < MIN_CHARS:
        return False
    chars = [c for c in par if not c.isspace()]
    if not chars:
        return False
    letters = sum(c.isalpha() for c in chars)
    return letters / len(chars) >= MIN_LETTER_RATIO


def squash(text: str) -> str:
    """Collapse runs of whitespace into single spaces."""
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------------------------------
# reST (Python docs)

#: directives whose indented body is prose worth keeping
PROSE_DIRECTIVES = {
    "function",
    "method",
    "class",
    "attribute",
    "data",
    "exception",
    "decorator",
    "decoratormethod",
    "classmethod",
    "staticmethod",
    "abstractmethod",
    "describe",
    "envvar",
    "option",
    "cmdoption",
    "opcode",
    "pdbcommand",
    "module",
    "currentmodule",
    "c:function",
    "c:type",
    "c:member",
    "c:macro",
    "c:var",
    "c:struct",
    "c:data",
    "note",
    "warning",
    "seealso",
    "versionadded",
    "versionchanged",
    "deprecated",
    "deprecated-removed",
    "important",
    "tip",
    "caution",
    "attention",
    "hint",
    "admonition",
    "impl-detail",
    "glossary",
    "topic",
    "sidebar",
    "rubric",
    "centered",
    "hlist",
    "coroutinefunction",
    "coroutinemethod",
    "awaitablefunction",
    "awaitablemethod",
    "audit-event",
    "availability",
}

_LITERAL = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>`]*>`__?")
_INTERPRETED = re.compile(r"`([^`]+)`_{0,2}")
_EMPH = re.compile(r"(\*\*|\*)([^\s*](?:[^*]*?[^\s*])?)\1")
_SUBST = re.compile(r"\|([^|\s][^|]*)\|_?")
_FOOT = re.compile(r"\s*\[[#*0-9A-Za-z_-]*\]_")
_SECTION_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
_SIMPLE_TABLE = re.compile(r"^=+(\s+=+)+\s*$")
_DIRECTIVE = re.compile(r"^\.\.\s+([A-Za-z0-9_:-]+)::(.*)$")
_BULLET = re.compile(r"^([*+\-\u2022]|\d+[.)]|#\.|\(\d+\)|[a-z][.)])\s+")
_FIELD = re.compile(r"^:[^:`]+:(\s+|$)")


_ROLE = re.compile(r":([A-Za-z0-9_.:+-]+):`([^`]*)`")

#: ``:ref:`label``` targets -> section titles, filled by :func:`collect_labels`
REF_TITLES: dict[str, str] = {}


def _role_text(match: re.Match) -> str:
    role, inner = match.group(1), match.group(2)
    m = re.match(r"^(.*?)\s*<[^>]*>$", inner, flags=re.S)
    if m and m.group(1):
        return m.group(1).lstrip("!~")
    inner = inner.lstrip("!~")
    if role in ("rfc", "pep"):
        return f"{role.upper()} {inner.split('#')[0]}"
    if role in ("issue", "gh"):
        return f"{'bpo' if role == 'issue' else 'gh'}-{inner}"
    if role in ("ref", "std:ref"):
        return REF_TITLES.get(inner.lower(), inner.replace("-", " ").replace("_", " "))
    return inner


def rst_inline(text: str) -> str:
    """Strip inline reST markup from one paragraph (roles, literals, links, emphasis, substitutions)."""
    literals: list[str] = []

    def keep(m: re.Match) -> str:  # protect literal text from the other substitutions
        literals.append(m.group(1))
        return f"\x00{len(literals) - 1}\x00"

    text = _LITERAL.sub(keep, text)
    text = _FOOT.sub("", text)
    text = _ROLE.sub(_role_text, text)
    text = _LINK.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    text = _EMPH.sub(r"\2", text)
    text = _SUBST.sub(r"\1", text)
    text = re.sub(r"\b([A-Za-z][A-Za-z0-9]*)_\b(?!\w)", r"\1", text)  # simple reference name_
    text = re.sub(r"\\(.)", r"\1", text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: literals[int(m.group(1))], text)
    text = re.sub(r"\s+\)", ")", text)
    return squash(text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of one reST page, markup stripped, code/tables/non-prose directives dropped."""
    lines = source.expandtabs(8).splitlines()
    out: list[str] = []
    n = len(lines)
    i = 0
    par: list[str] = []
    par_indent = 0
    literal_next = False  # the previous paragraph ended with "::"

    def flush() -> None:
        nonlocal par, literal_next
        if not par:
            return
        text = " ".join(s.strip() for s in par)
        par = []
        if text.startswith(">>>"):
            return
        if text.endswith("::"):
            literal_next = True
            text = text[:-2].rstrip()
            if text.endswith(":") is False and text:
                text += ":"
        text = _BULLET.sub("", text)
        text = _FIELD.sub("", text)
        text = rst_inline(text)
        if is_prose(text):
            out.append(text)

    def skip_block(start: int, base: int) -> int:
        """Skip lines from ``start`` that are blank or indented deeper than ``base``."""
        j = start
        while j < n and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        return j

    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            if literal_next:
                # a literal block: everything indented deeper than the paragraph that announced it
                literal_next = False
                j = i
                while j < n and not lines[j].strip():
                    j += 1
                if j < n and _indent(lines[j]) > par_indent:
                    i = skip_block(j, par_indent)
            continue
        ind = _indent(line)
        # tables
        if stripped.startswith("+-") or stripped.startswith("+=") or _SIMPLE_TABLE.match(stripped):
            flush()
            j = i
            while j < n and lines[j].strip():
                j += 1
            # simple tables have blank lines inside; continue while the next block is still tabular
            if _SIMPLE_TABLE.match(stripped):
                borders = 1
                j = i + 1
                while j < n and borders < 3:
                    if _SIMPLE_TABLE.match(lines[j].strip()):
                        borders += 1
                    j += 1
            i = j
            continue
        # section underline / overline
        if _SECTION_UNDERLINE.match(stripped):
            par = []  # the title line is not prose
            i += 1
            continue
        if stripped.startswith(".. "):
            flush()
            m = _DIRECTIVE.match(stripped)
            if m and m.group(1).lower() in PROSE_DIRECTIVES:
                # keep the inline argument of admonition-like directives as prose, then the body
                name, arg = m.group(1).lower(), m.group(2).strip()
                i += 1
                # the lines right after the directive (up to a blank line) are its options, more
                # signatures or signature continuations; for admonitions they continue the argument
                head: list[str] = []
                while i < n and lines[i].strip() and _indent(lines[i]) > ind:
                    head.append(lines[i].strip())
                    i += 1
                if name in {"versionadded", "versionchanged", "deprecated", "deprecated-removed"}:
                    arg = re.sub(r"^[0-9.]+(\s+[0-9.]+)?\s*", "", arg)
                    text = [arg] if arg else []
                elif name in {"note", "warning", "important", "tip", "caution", "attention", "hint", "seealso"}:
                    text = [arg] if arg else []
                else:
                    continue
                text += [h for h in head if not h.startswith(":")]
                if text:
                    par = text
                    par_indent = ind
                continue
            # any other directive, comment, label or substitution: drop it with its body
            i = skip_block(i + 1, ind)
            continue
        if stripped.startswith(">>>"):
            flush()
            j = i
            while j < n and lines[j].strip():
                j += 1
            i = j
            continue
        if stripped == "::":
            flush()
            literal_next = True
            par_indent = ind
            i += 1
            continue
        if par and (ind != par_indent and not _BULLET.match(stripped) and ind < par_indent):
            flush()
        if par and _BULLET.match(stripped):
            flush()
        if not par:
            par_indent = ind
        par.append(line)
        i += 1
    flush()
    return out


# --------------------------------------------------------------------------------------------------
# HTML (PostgreSQL docs)

_BLOCK_TAGS = {
    "p",
    "div",
    "li",
    "dt",
    "dd",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "ul",
    "ol",
    "dl",
    "br",
    "td",
    "th",
    "tr",
    "title",
    "body",
    "hr",
}
_SKIP_TAGS = {"pre", "table", "script", "style", "head"}
_SKIP_CLASSES = {
    "navheader",
    "navfooter",
    "toc",
    "calloutlist",
    "synopsis",
    "funcsynopsis",
    "cmdsynopsis",
    "refsynopsisdiv",
    "programlisting",
    "screen",
    "literallayout",
}


class _HTMLProse(html.parser.HTMLParser):
    """Collects the text of block elements outside <pre>, tables, navigation and synopses."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip_stack: list[str] = []  # tag names of open skipped elements (outermost first)

    def _flush(self) -> None:
        if self._buf:
            self.paragraphs.append(squash("".join(self._buf)))
            self._buf = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self._skip_stack:
            if tag == self._skip_stack[0]:
                self._skip_stack.append(tag)
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in _SKIP_TAGS or (classes & _SKIP_CLASSES):
            self._flush()
            self._skip_stack.append(tag)
            return
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if not self._skip_stack and tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_stack:
            if tag == self._skip_stack[0]:
                self._skip_stack.pop()
            return
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip_stack:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of one HTML page (PostgreSQL docs)."""
    parser = _HTMLProse()
    parser.feed(source)
    parser.close()
    return [p for p in parser.paragraphs if is_prose(p)]


# --------------------------------------------------------------------------------------------------
# documents


def split_sections(paragraphs: list[str], max_chars: int) -> list[str]:
    """Join paragraphs with blank lines into documents of at most ~max_chars characters each."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paragraphs:
        if cur and size + len(p) + 2 > max_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _mtime(path: Path) -> str:
    ts = _dt.datetime.fromtimestamp(int(path.stat().st_mtime), tz=_dt.timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


#: Python doc pages left out: release changelogs (bug-number lists) and licence/copyright boilerplate
PY_EXCLUDE = {
    "whatsnew/changelog.rst.txt",
    "license.rst.txt",
    "copyright.rst.txt",
    "contents.rst.txt",
    "bugs.rst.txt",
    "about.rst.txt",
}
PG_EXCLUDE = {"legalnotice.html", "bookindex.html", "index.html", "release.html"}


def collect_labels(files: list[Path]) -> dict[str, str]:
    """Map reST labels (``.. _name:``) that precede a section title to that title's text."""
    labels: dict[str, str] = {}
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^\.\.\s+_([^:]+):\s*$", line)
            if not m:
                continue
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or re.match(r"^\.\.\s+_[^:]+:\s*$", lines[j])):
                j += 1
            if j + 1 < len(lines) and _SECTION_UNDERLINE.match(lines[j].strip()):
                j += 1  # overline
            if j + 1 < len(lines) and _SECTION_UNDERLINE.match(lines[j + 1].strip()):
                labels[m.group(1).strip().lower()] = rst_inline(lines[j].strip())
    return labels


def collect(max_doc_chars: int, py_root: Path, pg_root: Path) -> list[dict]:
    """All documents from both packages, as FineWeb-schema rows, in a fixed order."""
    rows: list[dict] = []
    py_files = sorted(p for p in py_root.rglob("*.rst.txt") if p.relative_to(py_root).as_posix() not in PY_EXCLUDE)
    REF_TITLES.clear()
    REF_TITLES.update(collect_labels(py_files))
    for path in py_files:
        rel = path.relative_to(py_root).as_posix()
        pars = rst_paragraphs(path.read_text(encoding="utf-8"))
        page = rel[: -len(".rst.txt")]
        for n, text in enumerate(split_sections(pars, max_doc_chars)):
            rows.append(_row(text, f"pydoc/{page}#{n}", "python-3.11-docs", PY_URL.format(page), path))
    pg_files = sorted(
        p for p in pg_root.glob("*.html") if p.name not in PG_EXCLUDE and not p.name.startswith("release-")
    )
    for path in pg_files:
        pars = html_paragraphs(path.read_text(encoding="utf-8"))
        for n, text in enumerate(split_sections(pars, max_doc_chars)):
            rows.append(_row(text, f"pgdoc/{path.stem}#{n}", "postgresql-15-docs", PG_URL.format(path.name), path))
    return rows


def _row(text: str, doc_id: str, dump: str, url: str, path: Path) -> dict:
    return {
        "text": text,
        "id": doc_id,
        "dump": dump,
        "url": url,
        "date": _mtime(path),
        "file_path": str(path),
        "language": "en",
        "language_score": 1.0,
        "token_count": len(text.split()),
    }


def write_parquet(rows: list[dict], out: Path, level: int) -> None:
    """Write rows with FineWeb's column types, zstd-compressed, in fixed-size row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("text", pa.string()),
            ("id", pa.string()),
            ("dump", pa.string()),
            ("url", pa.string()),
            ("date", pa.string()),
            ("file_path", pa.string()),
            ("language", pa.string()),
            ("language_score", pa.float64()),
            ("token_count", pa.int64()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    pq.write_table(
        table,
        tmp,
        compression="zstd",
        compression_level=level,
        row_group_size=1024,
        use_dictionary=["dump", "url", "date", "file_path", "language"],
        write_statistics=False,
    )
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    """Build the corpus parquet; returns an exit code (2 if a documentation package is missing)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="memtrain/data/demo/demo-corpus.parquet")
    ap.add_argument(
        "--max-doc-chars",
        type=int,
        default=20000,
        help="pages longer than this are split into sections (default 20000)",
    )
    ap.add_argument("--zstd-level", type=int, default=19)
    ap.add_argument("--py-root", type=Path, default=PY_ROOT)
    ap.add_argument("--pg-root", type=Path, default=PG_ROOT)
    args = ap.parse_args(argv)
    for root, pkg in ((args.py_root, "python3.11-doc"), (args.pg_root, "postgresql-doc-15")):
        if not root.is_dir():
            print(
                f"{root}: not found; install it with `apt-get install -y --no-install-recommends {pkg}`",
                file=sys.stderr,
            )
            return 2
    rows = collect(args.max_doc_chars, args.py_root, args.pg_root)
    out = Path(args.out)
    write_parquet(rows, out, args.zstd_level)
    text_bytes = sum(len(r["text"].encode("utf-8")) for r in rows)
    for dump in ("python-3.11-docs", "postgresql-15-docs"):
        sub = [r for r in rows if r["dump"] == dump]
        print(
            f"{dump}: {len(sub)} documents, {sum(len(r['text'].encode()) for r in sub) / 1e6:.2f} MB text, "
            f"{sum(r['token_count'] for r in sub):,} words"
        )
    print(f"{out}: {len(rows)} documents, {text_bytes / 1e6:.2f} MB text, {out.stat().st_size / 1e6:.2f} MB parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
