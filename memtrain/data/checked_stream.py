"""The streaming ``Stream`` and ``StreamingDataset`` memtrain reads shards through.

:class:`CheckedStream` reads only an ``index.json`` memtrain has checked. ``streaming.Stream.get_shards``
downloads ``<split>/index.json`` (for a remote, to ``index.json.tmp``: one name shared by every process of the
node) and builds shard readers from whatever it names. This subclass fetches the index itself (a temporary file
of this process, then an atomic rename, so concurrent starts never race), reads the bytes once, passes them
through :func:`memtrain.data.index_check.parse_index` and builds the readers from exactly the object it
checked. Nothing else in streaming reads the index. It also downloads every shard file under a name of its own
and renames it into place only once it has the size the index records, retrying with a growing pause: a
download cut short never leaves a file that a later run would take for a complete shard.

:class:`CheckedDataset` is ``streaming.StreamingDataset`` with two changes:

* a shard that cannot be downloaded ends iteration with one :class:`~memtrain.errors.UserError` naming its URL
  (streaming itself logs the error from a background thread and ends the epoch early, silently), and the shard
  is marked missing again, so that other ranks of the node and later runs download it afresh;
* samples of shards whose columns all have a fixed size (memtrain's token rows) are read with one ``pread``
  from a descriptor kept open per shard, and shards already prepared are not locked again for every sample.
  Streaming opens, seeks, reads and closes the shard file for every sample and takes its cache file lock for
  every sample in its download thread; that cost more than all the rest of loading a row.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from memtrain.data.index_check import INDEX_FILE, NDARRAY_DTYPES, read_index
from memtrain.data.streaming_compat import import_streaming
from memtrain.errors import UserError
from memtrain.fileio import private_temp_name

streaming = import_streaming()
from streaming.base.compression import decompress  # noqa: E402
from streaming.base.dataset import _ShardState  # noqa: E402 (after the import shim)
from streaming.base.format import reader_from_json  # noqa: E402
from streaming.base.hashing import get_hash  # noqa: E402

#: default re-attempts of a failed shard download (after the first attempt), and seconds each may take
DOWNLOAD_RETRY = 2
DOWNLOAD_TIMEOUT = 60.0
#: pause before re-attempt k (k = 0, 1, ...): BACKOFF_S * 2**k seconds plus up to half a second, at most 30 s
BACKOFF_S = 1.0
#: shard files a process keeps open for reading (least recently used ones are closed beyond that)
MAX_OPEN_SHARDS = 64

_STATIC_NDARRAY = re.compile(r"^ndarray:([a-z0-9]+):(\d+(?:,\d+)*)$")
#: set in streaming's download and ready threads, whose exceptions streaming only logs
_background = threading.local()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class CheckedStream(streaming.Stream):
    """``streaming.Stream`` whose index is checked before any shard name or encoding in it is used, and whose
    shard downloads are atomic, checked against the index's sizes and retried.

    ``where``: how errors name the shard directory (the ``data.shards`` value); ``fetch``: a callable
    ``fetch(remote_file, local_file)`` downloading one file atomically (for a remote stream).
    ``download_retry``: re-attempts after a failed download; ``download_timeout``: the storage client's timeout
    (for S3, seconds a read may stay silent).
    """

    def __init__(self, *, where: str, fetch: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memtrain_where = where
        self.memtrain_fetch = fetch
        self.memtrain_sizes: dict[str, int] = {}

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list:
        filename = Path(self.local) / (self.split or "") / INDEX_FILE
        where = (
            f"{self.memtrain_where.rstrip('/')}/{self.split}/{INDEX_FILE}"
            if self.split
            else f"{self.memtrain_where.rstrip('/')}/{INDEX_FILE}"
        )
        if self.remote and not filename.is_file():
            remote_file = os.path.join(self.remote, self.split or "", INDEX_FILE)  # as streaming joins it
            self.memtrain_fetch(remote_file, filename)
        obj = read_index(filename, where)
        shards = []
        for info in obj["shards"]:
            shard = reader_from_json(self.local, self.split, info)
            shard.validate(allow_unsafe_types)
            for raw, zipped in shard.file_pairs:
                for part in (raw, zipped):
                    if part is not None:
                        self.memtrain_sizes[part.basename] = int(part.bytes)
            shards.append(shard)
        return shards

    def remote_url(self, basename: str) -> str:
        """Where shard file ``basename`` is downloaded from (as the error messages name it)."""
        return os.path.join(self.remote or "", self.split or "", basename)

    def _decompress_shard_part(self, zip_info: Any, zip_filename: str, raw_filename: str, compression: Any) -> None:
        """Check and decompress a downloaded compressed shard, as streaming does, but through a temporary file of
        this process's own: the ranks of several nodes that share a cache directory on one file system may
        decompress the same shard at the same moment, and streaming's one ``<shard>.tmp`` name would let one
        rename away the other's file. Whoever renames last wins with identical bytes; a compressed file that
        another process already decompressed and removed is no error."""
        try:
            data = Path(zip_filename).read_bytes()
        except FileNotFoundError:
            if os.path.isfile(raw_filename):
                return
            raise
        if self.validate_hash:
            if self.validate_hash not in zip_info.hashes:
                raise ValueError(
                    f"no {self.validate_hash} hash for {zip_filename} in the index (it has: "
                    f"{', '.join(sorted(zip_info.hashes)) or 'none'})"
                )
            if get_hash(self.validate_hash, data) != zip_info.hashes[self.validate_hash]:
                raise ValueError(f"checksum failure: {zip_filename}")
        tmp = private_temp_name(raw_filename)
        try:
            tmp.write_bytes(decompress(compression, data))
            os.replace(tmp, raw_filename)
        finally:
            tmp.unlink(missing_ok=True)
        if not self.safe_keep_zip:
            Path(zip_filename).unlink(missing_ok=True)

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        """Download one file of the split into the cache, atomically: into a name of this process and thread,
        checked against the size the index records, then renamed into place. Retried ``download_retry`` times
        with a growing pause; then a :class:`UserError` naming the URL."""
        if self.remote is None:
            return super()._download_file(from_basename, to_basename)
        remote = self.remote_url(from_basename)
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        if os.path.isfile(local):
            return local
        os.makedirs(os.path.dirname(local), exist_ok=True)
        expected = self.memtrain_sizes.get(from_basename)
        attempts = 1 + int(self.download_retry)
        last: BaseException | None = None
        for k in range(attempts):
            tmp = str(private_temp_name(local))
            try:
                self._downloader.download(remote, tmp, self.download_timeout)
                size = os.path.getsize(tmp)
                if expected is not None and size != expected:
                    raise OSError(f"got {size} bytes, the index says {expected}")
                os.replace(tmp, local)
                return local
            except Exception as err:  # noqa: BLE001 (storage clients raise their own types; all are retried)
                last = err
                try:
                    self._downloader.clean_up()
                except Exception:  # noqa: BLE001
                    pass
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if k + 1 < attempts:
                time.sleep(min(30.0, BACKOFF_S * 2**k) + random.random() * 0.5)
        assert last is not None
        raise UserError(
            f"{remote}: download failed {attempts} time(s) ({_one_line(last)}); check that the storage is "
            f"reachable and holds the shards of "
            f"{self.memtrain_where}, then run again (a resumed run continues where it stopped)"
        )


class _FixedRows:
    """Samples of one raw MDS shard whose columns all have a fixed size, read with one ``pread`` each.

    An MDS shard is ``num_samples`` (uint32), ``num_samples + 1`` offsets (uint32), the writer's config, then the
    samples; with fixed-size columns a sample is its columns' bytes one after the other, at a constant stride.
    """

    def __init__(self, path: str, reader: Any, columns: list[tuple[str, np.dtype, tuple[int, ...], int]]) -> None:
        self.columns = columns
        self.stride = sum(c[3] for c in columns)
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (kept open; closed by close() or collection)
        try:
            fd = self.file.fileno()
            n = int(np.frombuffer(os.pread(fd, 4, 0), np.uint32)[0])
            first = int(np.frombuffer(os.pread(fd, 4, 4), np.uint32)[0])
            last = int(np.frombuffer(os.pread(fd, 4, 4 + 4 * n), np.uint32)[0])
            size = os.fstat(fd).st_size
            if n != reader.samples or last - first != n * self.stride or last != size:
                raise ValueError(f"{path}: not a shard of {reader.samples} samples of {self.stride} bytes")
        except BaseException:
            self.file.close()
            raise
        self.fd = fd
        self.first = first

    def sample(self, idx: int) -> dict[str, np.ndarray]:
        data = os.pread(self.fd, self.stride, self.first + idx * self.stride)
        if len(data) != self.stride:
            raise IndexError(f"sample {idx} is not in {self.file.name}")
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, dtype, shape, nbytes in self.columns:
            out[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize, offset).reshape(shape)
            offset += nbytes
        return out

    def close(self) -> None:
        self.file.close()


def _fixed_columns(reader: Any) -> list[tuple[str, np.dtype, tuple[int, ...], int]] | None:
    """(name, dtype, shape, bytes) of each column when every column of an MDS shard is a fixed-shape
    ``ndarray``, else None (such shards are read by streaming's own reader)."""
    names = getattr(reader, "column_names", None)
    encodings = getattr(reader, "column_encodings", None)
    sizes = getattr(reader, "column_sizes", None)
    if not names or encodings is None or sizes is None or getattr(reader, "raw_data", None) is None:
        return None
    columns = []
    for name, encoding, size in zip(names, encodings, sizes):
        match = _STATIC_NDARRAY.match(encoding)
        if match is None or not size or match.group(1) not in NDARRAY_DTYPES:
            return None
        dtype = np.dtype(match.group(1))
        shape = tuple(int(d) for d in match.group(2).split(","))
        if int(np.prod(shape)) * dtype.itemsize != int(size):
            return None
        columns.append((name, dtype, shape, int(size)))
    return columns


class CheckedDataset(streaming.StreamingDataset):
    """``streaming.StreamingDataset`` that ends iteration with one :class:`UserError` naming the URL of a shard
    it could not download, and reads fixed-size samples straight from the shard file (see the module
    docstring). Iterates, partitions, shuffles and resumes exactly as streaming does."""

    # -- download failures -----------------------------------------------------------------------------
    def _memtrain_fail(self, message: str, shard_id: int) -> None:
        """Record the first failure, mark the shard missing again and stop streaming's background threads."""
        if self.__dict__.get("memtrain_failure") is None:
            self.memtrain_failure = message
        lock = getattr(self, "_cache_filelock", None)
        try:
            if lock is not None:
                lock.acquire()
            if self._shard_states[shard_id] == _ShardState.PREPARING:
                self._shard_states[shard_id] = _ShardState.REMOTE
        finally:
            if lock is not None:
                lock.release()
        event = getattr(self, "_event", None)
        if event is not None:
            event.set()

    def _memtrain_raise(self) -> None:
        failure = self.__dict__.get("memtrain_failure")
        if failure is not None:
            raise UserError(failure)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        ready: set[int] = self.__dict__.setdefault("_memtrain_ready", set())
        if shard_id in ready and not self.cache_limit:
            return  # downloaded and decompressed before, and nothing evicts shards without a cache limit
        if self.__dict__.get("memtrain_failure") is not None:
            if getattr(_background, "active", False):
                return  # streaming's threads stop on the event; the iterating thread raises
            self._memtrain_raise()
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:  # noqa: BLE001 (any failure to get a shard ends iteration with one line)
            if isinstance(err, UserError):
                message = str(err)
            else:
                stream = self.streams[self.stream_per_shard[shard_id]]
                raw, zipped = self.shards[shard_id].file_pairs[0]
                name = (zipped or raw).basename
                if isinstance(stream, CheckedStream) and stream.remote:
                    url = stream.remote_url(name)
                    # downloaded whole but unusable (it does not decompress): not kept, a later run fetches it again
                    for raw_info, zip_info in self.shards[shard_id].file_pairs:
                        for part in (zip_info, raw_info):
                            path = os.path.join(stream.local, stream.split, part.basename) if part else None
                            for leftover in (path, f"{path}.tmp") if path else ():
                                try:
                                    os.unlink(leftover)
                                except OSError:
                                    pass
                else:
                    url = os.path.join(stream.local, stream.split, name)
                message = f"{url}: cannot prepare this shard ({_one_line(err)})"
            self._memtrain_fail(message, shard_id)
            if getattr(_background, "active", False):
                return
            raise UserError(self.__dict__["memtrain_failure"]) from None
        if self._shard_states[shard_id] == _ShardState.LOCAL:
            stream = self.streams[self.stream_per_shard[shard_id]]
            raw, _ = self.shards[shard_id].file_pairs[0]
            if os.path.isfile(os.path.join(stream.local, stream.split, raw.basename)):
                ready.add(shard_id)

    def _prepare_thread(self, it: Any) -> None:
        _background.active = True
        try:
            super()._prepare_thread(it)
        finally:
            _background.active = False

    def _ready_thread(self, it: Any) -> None:
        _background.active = True
        try:
            super()._ready_thread(it)
        finally:
            _background.active = False

    def __iter__(self) -> Any:
        self._memtrain_raise()
        yield from super().__iter__()
        self._memtrain_raise()
        event = getattr(self, "_event", None)
        if event is not None and event.is_set():
            raise RuntimeError("streaming's download thread failed; its error was logged above")

    # -- fast reads ------------------------------------------------------------------------------------
    def _memtrain_rows(self, shard_id: int) -> _FixedRows | None:
        cache: OrderedDict[int, _FixedRows | None] = self.__dict__.setdefault("_memtrain_open", OrderedDict())
        if shard_id in cache:
            cache.move_to_end(shard_id)
            return cache[shard_id]
        reader = self.shards[shard_id]
        columns = _fixed_columns(reader)
        rows = None
        if columns is not None:
            stream = self.streams[self.stream_per_shard[shard_id]]
            path = os.path.join(stream.local, stream.split, reader.raw_data.basename)
            try:
                rows = _FixedRows(path, reader, columns)
            except FileNotFoundError:
                return None  # not downloaded or decompressed yet: streaming's reader prepares it
            except (OSError, ValueError, IndexError):
                rows = None  # read by streaming's reader from now on
        cache[shard_id] = rows
        while len(cache) > MAX_OPEN_SHARDS:
            _, old = cache.popitem(last=False)
            if old is not None:
                old.close()
        return rows

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        if self.cache_limit or (hasattr(self, "_event") and self._event.is_set()):
            self._memtrain_raise()
            return super().get_item(sample_id, retry)
        shard_id, idx = self.spanner[sample_id]
        rows = self._memtrain_rows(shard_id)
        if rows is None:
            return super().get_item(sample_id, retry)
        return rows.sample(idx)

    def memtrain_close(self) -> None:
        """Close the shard files kept open for reading (they reopen when read again)."""
        cache = self.__dict__.get("_memtrain_open")
        if cache:
            for rows in cache.values():
                if rows is not None:
                    rows.close()
            cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_memtrain_open", None)  # open files stay with their process
        return state


_variants: dict[type, type] = {}
_variants_lock = threading.Lock()


def checked_dataset_class(base: type) -> type:
    """``base`` (a ``StreamingDataset`` subclass) with :class:`CheckedDataset`'s behaviour underneath it:
    ``base``'s own methods run first and reach CheckedDataset's through ``super()``. Registered in this module
    under its name so that it pickles."""
    if base is streaming.StreamingDataset or issubclass(base, CheckedDataset):
        return CheckedDataset if base is streaming.StreamingDataset else base
    with _variants_lock:
        cls = _variants.get(base)
        if cls is None:
            name = f"Checked{base.__name__}"
            cls = type(name, (base, CheckedDataset), {"__module__": __name__, "__qualname__": name})
            globals()[name] = cls
            _variants[base] = cls
        return cls


class CheckedDataLoader(streaming.StreamingDataLoader):
    """``StreamingDataLoader`` that keeps the iterator of its current pass (``memtrain_iterator``), so that its
    worker processes can be shut down when the pass ends with an exception (:meth:`shutdown_workers`).

    torch shuts a pass's workers down when the pass ends or its iterator is collected; a traceback that is kept
    (an error being reported, a test inspecting it) keeps the iterator, and memtrain's workers ignore SIGTERM (the
    main process handles preemption), so the interpreter would wait for them forever when it exits."""

    memtrain_iterator: Any = None

    def _get_iterator(self) -> Any:
        self.memtrain_iterator = super()._get_iterator()
        return self.memtrain_iterator

    def shutdown_workers(self) -> None:
        """Stop the worker processes of the current pass, if any (idempotent)."""
        it, self.memtrain_iterator = self.memtrain_iterator, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 (best effort, may run at interpreter shutdown)
                pass
