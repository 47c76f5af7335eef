"""A streaming ``Stream`` that reads only an ``index.json`` memtrain has checked.

``streaming.Stream.get_shards`` downloads ``<split>/index.json`` (for a remote, to ``index.json.tmp``: one
name shared by every process of the node) and builds shard readers from whatever it names. This subclass
fetches the index itself (a temporary file of this process, then an atomic rename, so concurrent starts
never race), reads the bytes once, passes them through :func:`memtrain.data.index_check.parse_index` and
builds the readers from exactly the object it checked. Nothing else in streaming reads the index.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memtrain.data.index_check import INDEX_FILE, read_index
from memtrain.data.streaming_compat import import_streaming

streaming = import_streaming()
from streaming.base.format import reader_from_json  # noqa: E402 (after the import shim)


class CheckedStream(streaming.Stream):
    """``streaming.Stream`` whose index is checked before any shard name or encoding in it is used.

    ``where``: how errors name the shard directory (the ``data.shards`` value); ``fetch``: a callable
    ``fetch(remote_file, local_file)`` downloading one file atomically (for a remote stream).
    """

    def __init__(self, *, where: str, fetch: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memtrain_where = where
        self.memtrain_fetch = fetch

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list:
        filename = Path(self.local) / (self.split or "") / INDEX_FILE
        where = f"{self.memtrain_where.rstrip('/')}/{self.split}/{INDEX_FILE}" if self.split else \
            f"{self.memtrain_where.rstrip('/')}/{INDEX_FILE}"
        if self.remote and not filename.is_file():
            remote_file = os.path.join(self.remote, self.split or "", INDEX_FILE)  # as streaming joins it
            self.memtrain_fetch(remote_file, filename)
        obj = read_index(filename, where)
        shards = []
        for info in obj["shards"]:
            shard = reader_from_json(self.local, self.split, info)
            shard.validate(allow_unsafe_types)
            shards.append(shard)
        return shards
