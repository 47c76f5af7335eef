"""Small file helpers shared by the commands, benchmarks and tools."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` (parents created) through a temporary file and a rename, so a
    reader never sees half a file, also when a benchmark rewrites it after every measurement."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (parents created) through a temporary file beside it and a rename."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path`` (parents created), then rename it to ``path``: a file
    that exists is complete. The temporary file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def private_temp_name(path: str | Path) -> Path:
    """A temporary name beside ``path`` that no other process or thread uses (same directory, so the final
    ``os.replace`` is atomic): for files several processes of a node may write at the same moment."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}.part")
