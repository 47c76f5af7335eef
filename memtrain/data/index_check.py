"""The one check every MDS ``index.json`` passes before memtrain (or mosaicml-streaming underneath) uses it.

A shard directory's ``<split>/index.json`` names its shard files and says how to decode their columns.
Streaming joins those names to the shard and cache directories and writes, decompresses, evicts and
deletes files under them, and it decodes columns with whatever encoding the index names (``pkl`` runs
code). So an index is data from whoever wrote the shards, and it is checked before anything reads it:

* ``version`` 2, ``shards`` a non-empty list; each shard ``format`` ``mds``, ``version`` 2;
* every ``raw_data.basename`` / ``zip_data.basename`` a plain file name, or ``<unit>/<file>`` (the names
  ``memtrain data shards`` and ``memtrain precompute`` write: at most one folder level): each part has no
  ``/`` or ``\\``, is not ``.`` or ``..``, has no NUL or control characters and at most
  :data:`MAX_NAME_LEN` characters; no two shards share a file name;
* ``column_encodings`` only those memtrain writes (:data:`INT_ENCODINGS` and ``ndarray:<dtype>[:<shape>]``
  with a numeric dtype of :data:`NDARRAY_DTYPES`); ``column_names`` plain identifiers;
* ``compression`` none or one of streaming's algorithms (``zstd`` is what memtrain writes), optionally with
  a level; ``hashes`` among streaming's hash names; sizes and counts non-negative integers.

A bad index raises :class:`UserError` naming the file and the entry, e.g.
``shards/train/index.json: shards[3].raw_data.basename '../../x' is not a plain file name``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeGuard

from memtrain.errors import UserError

INDEX_FILE = "index.json"
#: longest shard file name accepted (streaming writes ``shard.00000.mds.zstd``)
MAX_NAME_LEN = 200
#: largest index.json read (a memtrain index holds a few hundred bytes per shard)
MAX_INDEX_BYTES = 64 << 20
#: scalar encodings memtrain writes (``idx`` of memory shards)
INT_ENCODINGS = frozenset({"int"})
#: value dtypes of ``ndarray:`` columns memtrain writes (token ids, masks, stored memories)
NDARRAY_DTYPES = frozenset(
    {"uint8", "uint16", "uint32", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
)
_NDARRAY = re.compile(r"^ndarray:([a-z0-9]+)(?::(\d{1,9}(?:,\d{1,9}){0,7}))?$")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_COMPRESSIONS = ("br", "bz2", "gz", "snappy", "zstd")
_SHARD_KEYS = {
    "column_encodings",
    "column_names",
    "column_sizes",
    "compression",
    "format",
    "hashes",
    "raw_data",
    "samples",
    "size_limit",
    "version",
    "zip_data",
}


def allowed_encoding(encoding: Any) -> bool:
    """Whether ``encoding`` is an MDS column encoding memtrain writes (never ``pkl``, ``json``, ``str``...)."""
    if not isinstance(encoding, str):
        return False
    if encoding in INT_ENCODINGS:
        return True
    m = _NDARRAY.match(encoding)
    return bool(m) and m.group(1) in NDARRAY_DTYPES


def _plain_name(name: str) -> bool:
    return (
        0 < len(name) <= MAX_NAME_LEN
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
        and ":" not in name
    )


def plain_basename(name: Any, max_depth: int = 2) -> TypeGuard[str]:
    """Whether ``name`` is a relative file name of at most ``max_depth`` plain ``/``-separated parts."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        return False
    parts = name.split("/")
    return len(parts) <= max_depth and all(_plain_name(p) for p in parts)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _compression_ok(c: Any) -> bool:
    if c is None:
        return True
    if not isinstance(c, str):
        return False
    algo, _, level = c.partition(":")
    return algo in _COMPRESSIONS and (not level or (level.lstrip("-").isdigit() and len(level) <= 3))


def _hash_names_ok(names: Any) -> bool:
    from memtrain.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base.hashing import get_hashes

    known = get_hashes()
    return isinstance(names, list) and all(isinstance(n, str) and n in known for n in names)


def validate_index(obj: Any, where: str, *, max_depth: int = 2) -> dict:
    """Check a parsed ``index.json`` (see the module doc); returns it. ``where`` names the file in errors.
    ``max_depth`` 2 (the default) admits ``<unit>/<file>``; 1 only plain file names."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a streaming index (expected a JSON object)")
    if obj.get("version") != 2:
        raise UserError(f"{where}: version {obj.get('version')!r}, expected 2 (a streaming MDS index)")
    shards = obj.get("shards")
    if not isinstance(shards, list) or not shards:
        raise UserError(f"{where}: 'shards' must be a non-empty list")
    seen: dict[str, str] = {}
    for i, shard in enumerate(shards):
        at = f"shards[{i}]"
        if not isinstance(shard, dict):
            raise UserError(f"{where}: {at} is not an object")
        extra = set(shard) - _SHARD_KEYS
        if extra:
            raise UserError(f"{where}: {at} has unexpected field '{sorted(extra)[0]}'")
        if shard.get("format") != "mds":
            raise UserError(f"{where}: {at}.format {shard.get('format')!r}, expected 'mds'")
        if shard.get("version") != 2:
            raise UserError(f"{where}: {at}.version {shard.get('version')!r}, expected 2")
        names, encs, sizes = shard.get("column_names"), shard.get("column_encodings"), shard.get("column_sizes")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and _COLUMN.match(n) for n in names):
            raise UserError(f"{where}: {at}.column_names must be a non-empty list of plain column names")
        if not isinstance(encs, list) or len(encs) != len(names):
            raise UserError(f"{where}: {at}.column_encodings must list one encoding per column")
        for j, enc in enumerate(encs):
            if not allowed_encoding(enc):
                raise UserError(
                    f"{where}: {at}.column_encodings[{j}] {str(enc)[:60]!r} is not an encoding memtrain "
                    "writes (int or ndarray:<numeric dtype>[:<shape>])"
                )
        if not isinstance(sizes, list) or len(sizes) != len(names) or not all(s is None or _is_int(s) for s in sizes):
            raise UserError(f"{where}: {at}.column_sizes must list one size (integer or null) per column")
        if not _compression_ok(shard.get("compression")):
            raise UserError(
                f"{where}: {at}.compression {str(shard.get('compression'))[:40]!r} is not a known "
                f"compression ({', '.join(_COMPRESSIONS)} or null)"
            )
        if not _hash_names_ok(shard.get("hashes", [])):
            raise UserError(f"{where}: {at}.hashes must list streaming hash algorithm names")
        if not _is_int(shard.get("samples")):
            raise UserError(f"{where}: {at}.samples must be a non-negative integer")
        if shard.get("size_limit") is not None and not _is_int(shard.get("size_limit")):
            raise UserError(f"{where}: {at}.size_limit must be a non-negative integer or null")
        for key in ("raw_data", "zip_data"):
            part = shard.get(key)
            if part is None and key == "zip_data":
                if shard.get("compression") is not None:
                    raise UserError(
                        f"{where}: {at}.zip_data is missing but compression is {shard.get('compression')!r}"
                    )
                continue
            if not isinstance(part, dict):
                raise UserError(f"{where}: {at}.{key} must be an object")
            name = part.get("basename")
            if not plain_basename(name, max_depth):
                shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
                raise UserError(f"{where}: {at}.{key}.basename {shown} is not a plain file name")
            if name in seen:
                raise UserError(f"{where}: {at}.{key}.basename {name!r} is also {seen[name]}")
            seen[name] = f"{at}.{key}.basename"
            if not _is_int(part.get("bytes")):
                raise UserError(f"{where}: {at}.{key}.bytes must be a non-negative integer")
            hashes = part.get("hashes", {})
            if (
                not isinstance(hashes, dict)
                or not _hash_names_ok(list(hashes))
                or not all(isinstance(v, str) for v in hashes.values())
            ):
                raise UserError(f"{where}: {at}.{key}.hashes must map streaming hash names to strings")
        if shard.get("zip_data") is not None and shard.get("compression") is None:
            raise UserError(f"{where}: {at}.zip_data is given but compression is null")
    return obj


def parse_index(data: bytes, where: str, *, max_depth: int = 2) -> dict:
    """Parse and check the bytes of an ``index.json``."""
    if len(data) > MAX_INDEX_BYTES:
        raise UserError(f"{where}: {len(data)} bytes, larger than any memtrain index ({MAX_INDEX_BYTES} bytes)")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"{where}: not a valid JSON index ({str(err).splitlines()[0][:120]})") from None
    return validate_index(obj, where, max_depth=max_depth)


def read_index(path: str | Path, where: str | None = None, *, max_depth: int = 2) -> dict:
    """Read and check ``path`` (an ``index.json``); raises :class:`UserError` naming ``where`` (default: the
    path) when it is missing, unreadable or not a safe memtrain index."""
    path = Path(path)
    where = where or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{where}: missing") from None
    except OSError as err:
        raise UserError(f"{where}: cannot read ({err.strerror or err})") from None
    return parse_index(data, where, max_depth=max_depth)
