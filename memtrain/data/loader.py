"""Reading memtrain MDS shards: shard-directory metadata, compatibility checks and the batch loader.

A shard directory (local, or remote for any scheme mosaicml-streaming downloads from: ``s3://``, ``gs://``,
``oci://``, ``azure://``, ``hf://``, ``dbfs:/``, ``sftp://``, ... and ``file://`` for a shared filesystem
read through a local cache) is what :func:`memtrain.data.ingest.build_shards` writes: ``train/`` and
``val/`` MDS splits, ``tokenizer.model`` and ``memtrain_shards.json``.

:func:`make_loader` wraps ``streaming.StreamingDataset`` + ``StreamingDataLoader`` (through
:mod:`memtrain.data.checked_stream`: checked indexes, atomic retried downloads, fast fixed-size reads):
deterministic order (shuffled by ``seed`` or not), rows partitioned across ``torch.distributed`` ranks by
streaming itself (from the RANK / WORLD_SIZE / LOCAL_WORLD_SIZE environment), batches of ``torch.long``
``[batch_size, row_len]``, cycling over epochs forever, and exact mid-epoch resume through ``state_dict()`` /
``load_state_dict()``.

Note: streaming decompresses the zstd shards it reads next to them (``shard.*.mds`` beside
``shard.*.mds.zstd``), so a local shard directory must be writable. For a read-only or shared directory use
``file:///path/to/shards`` with a ``cache_dir`` (``docs/remote-shards.md``).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memtrain.data.ingest import FORMAT_VERSION, INFO_FILE
from memtrain.data.streaming_compat import (
    clean_stale_shared_memory_once,
    closing_prefix_probes,
    import_streaming,
    release_dataset,
)
from memtrain.data.tokenizer import TOKENIZER_FILE, file_sha256
from memtrain.errors import UserError
from memtrain.fileio import private_temp_name

NOT_SHARDS_HINT = "not a memtrain shard directory; make one with `memtrain data shards`"
_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# memtrain_shards.json


class _SplitCounts(BaseModel):
    model_config = ConfigDict(extra="allow")
    rows: int = Field(..., ge=0)
    tokens: int = Field(..., ge=0)
    documents: int = Field(..., ge=0)
    dropped_tail_tokens: int = Field(0, ge=0)


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    format_version: int = Field(..., ge=1)
    tokenizer_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    vocab_size: int = Field(..., ge=8)
    row_len: int = Field(..., ge=2)
    dtype: Literal["uint16", "int32"] = "uint16"
    special_ids: dict[str, int | None]
    splits: dict[str, _SplitCounts]
    dropped_tail_tokens: int = Field(0, ge=0)
    sources: list[str] = []
    created: str = ""


@dataclass(frozen=True)
class ShardInfo:
    """What ``memtrain_shards.json`` says about a shard directory, plus where it lives.

    ``path``: the directory or URL as given; ``local_dir``: the local directory holding
    ``memtrain_shards.json`` and ``tokenizer.model`` (the shard directory itself, or its cache when remote);
    ``remote``: the location streaming downloads shards from (None for a local directory).
    ``splits``: ``{"train": {"rows", "tokens", "documents", "dropped_tail_tokens"}, "val": {...}}``.
    """

    path: str
    local_dir: Path
    remote: str | None
    format_version: int
    tokenizer_sha256: str
    vocab_size: int
    row_len: int
    dtype: str
    special_ids: dict[str, int | None]
    splits: dict[str, dict[str, int]]
    dropped_tail_tokens: int
    sources: list[str]
    created: str
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def tokenizer_path(self) -> Path:
        """Local path of the tokenizer the shards were made with."""
        return self.local_dir / TOKENIZER_FILE

    @property
    def pad_id(self) -> int | None:
        """Padding id (0)."""
        return self.special_ids.get("pad")

    @property
    def eos_id(self) -> int | None:
        """End-of-document id (3)."""
        return self.special_ids.get("eos")

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id (2)."""
        return self.special_ids.get("bos")

    @property
    def unk_id(self) -> int | None:
        """Unknown-piece id (1)."""
        return self.special_ids.get("unk")

    @property
    def sep_id(self) -> int | None:
        """Copy delimiter <sep> id (4)."""
        return self.special_ids.get("sep")

    @property
    def blank_id(self) -> int | None:
        """Blank-copy filler <blank> id (5)."""
        return self.special_ids.get("blank")

    def rows(self, split: str) -> int:
        """Rows in ``split`` (0 if the split does not exist)."""
        return int(self.splits.get(split, {}).get("rows", 0))


def _remote_location(shards: str) -> str | None:
    """The streaming ``remote`` for a URL (a plain path for ``file://``), or None for a local path."""
    parsed = urllib.parse.urlparse(shards)
    scheme = parsed.scheme
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter
        return None
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UserError(f"{shards}: file:// URLs must name a local path (file:///abs/path)")
        return urllib.parse.unquote(parsed.path)
    import_streaming()
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS

    known = "dbfs-uc" if scheme == "dbfs" and shards.startswith("dbfs:/Volumes") else scheme
    if known not in DOWNLOADER_MAPPINGS:
        supported = sorted(k for k in DOWNLOADER_MAPPINGS if k) + ["file"]
        raise UserError(
            f"{shards}: unsupported remote scheme '{scheme}://' (supported: {', '.join(s + '://' for s in supported)})"
        )
    return shards


def _remote_join(remote: str, name: str) -> str:
    return remote.rstrip("/") + "/" + name if "://" in remote else os.path.join(remote, name)


def _download(remote_file: str, local_file: Path, what: str, shards: str) -> None:
    """Download one file with streaming's downloader into ``local_file``: into a temporary file of this
    process and thread first, then renamed into place (atomic, so concurrent starts never see or remove
    each other's partial files)."""
    import_streaming()
    from streaming.base.storage import CloudDownloader

    local_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = private_temp_name(local_file)
    try:
        CloudDownloader.direct_download(remote_file, str(tmp))
        os.replace(tmp, local_file)
    except FileNotFoundError:
        raise UserError(f"{shards}: no {what} there; {NOT_SHARDS_HINT}") from None
    except Exception as err:  # boto/gcs/... errors, missing client libraries
        raise UserError(f"{shards}: cannot download {what} ({type(err).__name__}: {err})") from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def _default_cache_dir() -> Path:
    """The default remote-shard cache: ``memtrain-<uid>/shard-cache`` in the system temp directory
    (``$TMPDIR``, else ``/tmp``): node-local (ranks of different nodes never share it) and private to the user
    (``memtrain-<uid>`` is created mode 0700 and checked by :func:`_private_cache_root`)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"memtrain-{uid}" / "shard-cache"


def _check_private_dir(path: Path, what: str) -> None:
    """Raise UserError unless ``path`` is a real directory (not a symlink) of this user that no one else can
    write to."""
    import stat

    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{what} {path}: is a symbolic link; refusing it as a cache (use a real directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path}: is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UserError(
            f"{what} {path}: is owned by another user (uid {st.st_uid}); refusing it as a cache, "
            "use a directory of your own"
        )
    if st.st_mode & 0o022:
        raise UserError(
            f"{what} {path}: is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"refusing it as a cache: `chmod go-w {path}` or use a private directory"
        )


def _private_cache_root(cache_dir: str | Path | None) -> Path:
    """The cache root for remote shards (``cache_dir``, or :func:`_default_cache_dir`), created mode 0700
    when missing. The root (and for the default, its ``memtrain-<uid>`` parent in the shared temp directory)
    must be a real directory owned by this user and not writable by group or others: another user could
    otherwise plant shards, indexes or symlinks in it."""
    explicit = cache_dir is not None and str(cache_dir) != ""
    root = Path(cache_dir) if explicit and cache_dir is not None else _default_cache_dir()
    what = "data.cache_dir" if explicit else "the shard cache"
    check = [root] if explicit else [root.parent, root]
    for d in check:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise UserError(f"{what} {d}: cannot create it ({err.strerror or err})") from None
        _check_private_dir(d, what)
    return root


def _parse_manifest(text: str, where: str) -> _Manifest:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: malformed {INFO_FILE}: {err.msg} at line {err.lineno}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: malformed {INFO_FILE}: expected a JSON object")
    try:
        return _Manifest.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        raise UserError(f"{where}: malformed {INFO_FILE}: field '{loc}': {e['msg']}") from None


def read_shard_info(shards: str | Path, cache_dir: str | Path | None = None) -> ShardInfo:
    """Read and validate a shard directory's ``memtrain_shards.json``.

    ``shards``: a local directory, or a URL streaming supports (``s3://…``, ``gs://…``, ``file://…``, …);
    for a URL the json and ``tokenizer.model`` are downloaded into ``cache_dir`` (default: the private
    ``memtrain-<uid>/shard-cache`` folder in the temp directory, see :func:`_private_cache_root`), in a subfolder specific to that URL and that
    version of the shards. Raises :class:`UserError` when the directory is missing, is not a shard
    directory, its json is malformed, or it was written by a newer memtrain.
    """
    shards = str(shards)
    remote = _remote_location(shards)
    if remote is None:
        local_dir = Path(shards)
        if not local_dir.exists():
            raise UserError(f"{shards}: shard directory not found; make one with `memtrain data shards`")
        if not local_dir.is_dir():
            raise UserError(f"{shards}: is a file, not a shard directory")
        info_path = local_dir / INFO_FILE
        if not info_path.is_file():
            raise UserError(f"{shards}: no {INFO_FILE}: {NOT_SHARDS_HINT}")
        text = info_path.read_text(encoding="utf-8", errors="replace")
        manifest = _parse_manifest(text, str(info_path))
    else:
        base = _private_cache_root(cache_dir)
        base = base / hashlib.blake2s(remote.encode("utf-8"), digest_size=8).hexdigest()
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        # fetched under a name of this process only: concurrent starts (ranks of a node) never share it
        fetched = private_temp_name(base / f"{INFO_FILE}.fetch")
        try:
            _download(_remote_join(remote, INFO_FILE), fetched, INFO_FILE, shards)
            text = fetched.read_text(encoding="utf-8", errors="replace")
            manifest = _parse_manifest(text, f"{shards}/{INFO_FILE}")
            # one cache folder per version of the shards, so a rebuilt remote never mixes with old cached shards
            local_dir = base / hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
            local_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(fetched, local_dir / INFO_FILE)
        finally:
            try:
                fetched.unlink()
            except OSError:
                pass
        tok = local_dir / TOKENIZER_FILE
        if not tok.is_file() or file_sha256(tok) != manifest.tokenizer_sha256:
            _download(_remote_join(remote, TOKENIZER_FILE), tok, TOKENIZER_FILE, shards)
    if manifest.format_version > FORMAT_VERSION:
        raise UserError(
            f"{shards}: shards use format version {manifest.format_version}, but this memtrain "
            f"reads version {FORMAT_VERSION} or older; upgrade memtrain"
        )
    return ShardInfo(
        path=shards,
        local_dir=local_dir,
        remote=remote,
        format_version=manifest.format_version,
        tokenizer_sha256=manifest.tokenizer_sha256,
        vocab_size=manifest.vocab_size,
        row_len=manifest.row_len,
        dtype=manifest.dtype,
        special_ids=dict(manifest.special_ids),
        splits={k: v.model_dump() for k, v in manifest.splits.items()},
        dropped_tail_tokens=manifest.dropped_tail_tokens,
        sources=list(manifest.sources),
        created=manifest.created,
        raw=json.loads(text),
    )


def check_compatible(
    info: ShardInfo,
    row_len: int | None = None,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    *,
    row_len_source: str = "the model's row length",
    tokenizer_source: str = "the checkpoint's tokenizer",
    vocab_source: str = "model.vocab_size",
    where: str = "data.shards",
) -> None:
    """Raise :class:`UserError` naming what differs between shards and a model/checkpoint.

    ``row_len``: tokens per row the model needs (chunk_len * n_chunks); ``row_len_source`` describes it,
    e.g. ``"model.chunk_len x model.n_chunks = 4 x 32"`` gives "... but model.chunk_len x model.n_chunks =
    4 x 32 = 128". ``tokenizer_sha256``: the checkpoint's tokenizer hash. ``vocab_size``: the model's
    vocabulary (must equal the shards' tokenizer's). None skips a check.
    """
    loc = f"{where} ({info.path})"
    if row_len is not None and int(row_len) != info.row_len:
        src = row_len_source if row_len_source.rstrip().endswith(str(row_len)) else f"{row_len_source} = {row_len}"
        raise UserError(
            f"{loc}: rows hold {info.row_len} tokens but {src}; make matching shards with "
            f"`memtrain data shards --row-len {row_len}` or change the model"
        )
    if tokenizer_sha256 is not None and tokenizer_sha256 != info.tokenizer_sha256:
        raise UserError(
            f"{loc}: shards were made with tokenizer sha256 {info.tokenizer_sha256[:12]}… but "
            f"{tokenizer_source} is {tokenizer_sha256[:12]}…; use shards made with the same tokenizer"
        )
    if vocab_size is not None and int(vocab_size) != info.vocab_size:
        raise UserError(
            f"{loc}: the shards' tokenizer has {info.vocab_size} ids but {vocab_source} is "
            f"{vocab_size}; set it to {info.vocab_size} or null (taken from the tokenizer)"
        )


# ----------------------------------------------------------------------------------------------------
# Loader


def collate_rows(samples: list[dict[str, Any]]) -> torch.Tensor:
    """Stack MDS samples ``{"input_ids": uint16/int32 [row_len]}`` into a ``torch.long [B, row_len]`` (samples of
    dual shards, which also hold the decoder's tokens, into dual rows: :func:`memtrain.data.dual.collate_dual`)."""
    if "dec_input_ids" in samples[0]:
        from memtrain.data.dual import collate_dual

        return collate_dual(samples)
    rows = [s["input_ids"] for s in samples]
    out = np.empty((len(rows),) + rows[0].shape, dtype=np.int64)
    np.stack(rows, out=out)  # one pass: gathered and widened together
    return torch.from_numpy(out)


class _StoredRows(dict):
    """A batch of token rows as a worker process sends it: ``{"input_ids": [B, row_len]}`` in the shards' own
    dtype (uint16 or int32). A numpy array crosses the worker's pipe as plain bytes, a quarter of the int64
    rows, where a tensor would be moved into a new shared-memory segment whose descriptor is then passed over a
    socket connection per batch (that cost more than reading the rows); the main process widens it to
    ``torch.long`` (:meth:`tensor`). A dict, so that streaming's loader counts its rows for ``state_dict``."""

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self["input_ids"]).to(torch.int64)


def collate_stored_rows(samples: list[dict[str, Any]]) -> Any:
    """:func:`collate_rows` for worker processes: token rows as :class:`_StoredRows` (anything else, such as dual
    rows, as :func:`collate_rows` makes it)."""
    if "dec_input_ids" in samples[0] or len(samples[0]) != 1:
        return collate_rows(samples)
    return _StoredRows(input_ids=np.stack([s["input_ids"] for s in samples]))


#: (local dir, split) pairs of live remote-backed datasets in this process (streaming forbids sharing one)
_live_locals: dict[tuple[str, str], int] = {}
_live_lock = threading.Lock()


def _claim_local(base: Path, split: str) -> tuple[str, tuple[str, str]]:
    """A cache directory for (remote, split) that no live dataset of this process uses (base, base-1, ...)."""
    key = (os.path.abspath(base), split)
    with _live_lock:
        taken = key in _live_locals
    if taken:
        gc.collect()  # an unreachable old loader may still hold it
    with _live_lock:
        k = 0
        while True:
            cand = str(base) if k == 0 else f"{base}-{k}"
            key = (os.path.abspath(cand), split)
            if key not in _live_locals:
                _live_locals[key] = 1
                return cand, key
            k += 1


def _release_local(key: tuple[str, str]) -> None:
    with _live_lock:
        _live_locals.pop(key, None)


def _worker_error_line(err: UserError) -> str:
    """The one-line message of a :class:`UserError` raised in a DataLoader worker process: torch re-raises it in
    the main process as ``UserError("Caught UserError in DataLoader worker process N. Original Traceback ...")``,
    whose last line holds the original message."""
    text = str(err)
    if not text.startswith("Caught UserError in DataLoader worker"):
        return text
    prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix) :]
    return text.splitlines()[0]


def _num_nodes() -> int:
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, world // max(1, local_world))


#: the node-wide lock file under which a job's local leader picks and registers its shared-memory prefix
PREFIX_LOCK = "memtrain-shm-prefix.lock"
#: how long a leader waits for another job's leader to finish registering before it goes on without the lock
PREFIX_LOCK_WAIT_S = 120.0


@contextlib.contextmanager
def node_prefix_lock() -> Iterator[None]:
    """Held by each job's local leader (``LOCAL_RANK`` 0) while streaming picks a free ``/dev/shm`` prefix and
    registers it. Streaming scans for a free prefix, passes a barrier of the job's ranks, then creates it: two
    jobs of one node starting together (the tasks of a job array landing on one node) can pick the same one,
    and the loser's ranks would stop at different points of that sequence. Under this lock the second job's
    leader scans only once the first one's prefix exists. The job's other ranks do not take it: their leader
    holds it across the barriers where they wait. A lock held longer than PREFIX_LOCK_WAIT_S (a stuck process)
    is not waited for beyond that."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        yield
        return
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    try:  # read-only and never through a link: the file only carries the lock, in a folder everyone writes
        fd = os.open(os.path.join(folder, PREFIX_LOCK), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + PREFIX_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _retry_shm_race(make, attempts: int = 5):
    """``make()`` under :func:`node_prefix_lock`, again after a FileExistsError: streaming picks a free
    shared-memory prefix by scanning /dev/shm and then creates it, so a process that does not take the lock
    (another program, or a lock given up on) can pick the same one at the same moment; the loser's next scan
    sees the winner's segments and picks another."""
    for k in range(attempts):
        try:
            with node_prefix_lock():
                return make()
        except FileExistsError:
            if k == attempts - 1:
                raise
            time.sleep(0.05 * (k + 1))


class ShardLoader:
    """Batches of one split of a shard directory: ``torch.long [batch_size, row_len]``.

    ``iter(loader)`` cycles over epochs forever (the trainer counts steps), or yields exactly
    ``max_batches`` batches when that was given (the same ones each time when unshuffled: a validation set).
    ``epoch()`` iterates over the rest of the current epoch only. ``len(loader)`` is batches per epoch on
    this rank. Use one iterator at a time.

    ``state_dict()`` taken after k batches and loaded into a fresh loader (before iterating it) makes that
    loader yield exactly batches k+1, k+2, ... of the uninterrupted sequence, across epoch boundaries too.
    """

    def __init__(
        self,
        info: ShardInfo,
        split: str,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_workers: int = 0,
        epoch_size: int | None = None,
        drop_last: bool = True,
        max_batches: int | None = None,
        memories: Any = None,
        num_canonical_nodes: int | None = None,
        download_retry: int | None = None,
        download_timeout: float | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"data.batch_size: expected >= 1, got {batch_size}")
        if num_canonical_nodes is not None and num_canonical_nodes < 1:
            raise UserError(f"data.num_canonical_nodes: expected >= 1 or null, got {num_canonical_nodes}")
        if download_retry is not None and download_retry < 0:
            raise UserError(f"download_retry: expected >= 0, got {download_retry}")
        if download_timeout is not None and not download_timeout > 0:
            raise UserError(f"download_timeout: expected seconds > 0, got {download_timeout}")
        if max_batches is not None and max_batches < 1:
            raise UserError(f"max_batches: expected >= 1, got {max_batches}")
        if split not in info.splits or info.rows(split) == 0:
            have = ", ".join(s for s in info.splits if info.rows(s)) or "none"
            raise UserError(f"{info.path}: has no '{split}' split (splits with rows: {have})")
        if info.remote is None:
            index = info.local_dir / split / "index.json"
            if not index.is_file():
                raise UserError(
                    f"{info.path}: {split}/index.json is missing; the shard directory is incomplete, "
                    "rebuild it with `memtrain data shards`"
                )
        self.info = info
        self.split = split
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.max_batches = max_batches
        clean_stale_shared_memory_once()
        import_streaming()
        if info.remote is None:
            remote, local, key = None, str(info.local_dir), None
        else:
            remote = info.remote
            local, key = _claim_local(info.local_dir, split)
        from memtrain.data.checked_stream import (
            DOWNLOAD_RETRY,
            DOWNLOAD_TIMEOUT,
            CheckedDataLoader,
            CheckedDataset,
            CheckedStream,
            checked_dataset_class,
        )

        dataset_cls, collate, extra = CheckedDataset, collate_rows, {}
        if memories is not None:  # precomputed memories ride along with each token sample
            from memtrain.data.memories import JoinedDataset

            dataset_cls, collate, extra = checked_dataset_class(JoinedDataset), memories.collate, {"memories": memories}
        nodes = int(num_canonical_nodes) if num_canonical_nodes is not None else _num_nodes()
        retry = DOWNLOAD_RETRY if download_retry is None else int(download_retry)
        timeout = DOWNLOAD_TIMEOUT if download_timeout is None else float(download_timeout)

        def fetch(remote_file: str, local_file: Path) -> None:
            _download(remote_file, Path(local_file), f"{split}/index.json", info.path)

        self._key = key
        self._closed = False
        try:
            # every index goes through memtrain's check before streaming uses a name or encoding in it
            with closing_prefix_probes() as probes:
                try:
                    self.dataset = _retry_shm_race(
                        lambda: dataset_cls(
                            streams=[
                                CheckedStream(
                                    remote=remote,
                                    local=local,
                                    split=split,
                                    where=info.path,
                                    fetch=fetch,
                                    download_retry=retry,
                                    download_timeout=timeout,
                                )
                            ],
                            batch_size=self.batch_size,
                            shuffle=self.shuffle,
                            shuffle_seed=self.seed,
                            epoch_size=epoch_size,
                            num_canonical_nodes=nodes,
                            **extra,
                        )
                    )
                finally:
                    probes.release(keep=getattr(getattr(self, "dataset", None), "_locals_shm", None))
        except UserError:
            if key:
                _release_local(key)
            raise
        except FileNotFoundError as err:
            if key:
                _release_local(key)
            raise UserError(f"{info.path}: cannot read split '{split}': {err}") from None
        except ValueError as err:
            if key:
                _release_local(key)
            msg = str(err).splitlines()[0]
            if "Reused local directory" in msg:
                raise UserError(
                    f"{info.path}: its cache {local} is in use by another running job; give this "
                    "one another data.cache_dir"
                ) from None
            raise UserError(f"{info.path}: cannot open split '{split}': {msg}") from None
        except Exception as err:  # remote storage clients raise their own error types
            if key:
                _release_local(key)
            if info.remote is None:
                raise
            raise UserError(f"{info.path}: cannot open split '{split}' ({type(err).__name__}: {err})") from None
        if key:
            weakref.finalize(self.dataset, _release_local, key)
        per_rank = len(self.dataset)
        if self.drop_last and per_rank < self.batch_size:
            self.close()  # the dataset's shared memory and descriptors, which nothing could close later
            raise UserError(
                f"{info.path}: split '{split}' has {per_rank} rows per rank, fewer than one batch of "
                f"{self.batch_size}; use a smaller data.batch_size or more data"
            )
        if collate is collate_rows and int(num_workers) > 0:
            collate = collate_stored_rows
        self.dataloader = CheckedDataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=int(num_workers),
            collate_fn=collate,
            drop_last=self.drop_last,
            persistent_workers=False,
            worker_init_fn=ignore_stop_signals if int(num_workers) > 0 else None,
        )

    @property
    def row_len(self) -> int:
        """Tokens per row."""
        return self.info.row_len

    def __len__(self) -> int:
        """Batches per epoch on this rank (``max_batches`` when given)."""
        if self.max_batches is not None:
            return self.max_batches
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _stop_prefetch(self) -> None:
        """Stop streaming's prefetch threads of an abandoned epoch (in-process iteration only).

        Streaming leaves them polling when an epoch is not read to its end; worker processes
        (``num_workers > 0``) are shut down by the DataLoader instead.
        """
        it = self.dataset.__dict__.get("_iterator")
        if it is not None:
            try:
                it.exit()
            except Exception:  # noqa: BLE001 (best effort, may run at interpreter shutdown)
                pass

    def _batches(self) -> Iterator[torch.Tensor]:
        """One pass of the DataLoader; a :class:`UserError` from a worker process keeps its one line."""
        try:
            for batch in self.dataloader:
                yield batch.tensor() if type(batch) is _StoredRows else batch
        except UserError as err:
            self.dataloader.shutdown_workers()
            raise UserError(_worker_error_line(err)) from None
        except Exception:
            self.dataloader.shutdown_workers()
            raise

    def epoch(self) -> Iterator[torch.Tensor]:
        """The remaining batches of the current epoch (from a loaded state's position, if any)."""
        try:
            yield from self._batches()
        finally:
            self._stop_prefetch()

    def infinite(self) -> Generator[torch.Tensor, None, None]:
        """Batches forever, epoch after epoch (each epoch reshuffled when ``shuffle``)."""
        empty_epochs = 0
        try:
            while True:
                n = 0
                for batch in self._batches():
                    n += 1
                    yield batch
                if n:
                    empty_epochs = 0
                    continue
                # an epoch resumed exactly at its end is empty once; two in a row means no batch ever fits
                empty_epochs += 1
                if empty_epochs >= 2:
                    raise UserError(
                        f"{self.info.path}: split '{self.split}' yields no complete batch of "
                        f"{self.batch_size} rows on this rank"
                    )
        finally:
            self._stop_prefetch()

    def close(self) -> None:
        """Release everything the loader holds: prefetch threads, worker processes, streaming's shared
        memory segments and their file descriptors, and its claim on a cache directory. Idempotent; the
        loader cannot be iterated afterwards. Also ``with make_loader(...) as loader:``."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._stop_prefetch()
        dl = getattr(self, "dataloader", None)
        it = getattr(dl, "_iterator", None) if dl is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            try:
                it._shutdown_workers()
            except Exception:  # noqa: BLE001 (best effort)
                pass
        if dl is not None:
            dl._iterator = None
            dl.shutdown_workers()  # the workers of a pass that ended with an error (its traceback may live on)
        closer = getattr(self.dataset, "memtrain_close", None)
        if closer is not None:
            closer()
        release_dataset(self.dataset)
        if self._key:
            _release_local(self._key)
            self._key = None
        gc.collect()

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise RuntimeError(f"{self.info.path}: this loader of split '{self.split}' was closed")

    def _take(self, n: int) -> Iterator[torch.Tensor]:
        it = self.infinite()
        try:
            for _ in range(n):
                yield next(it)
        finally:
            it.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches ``torch.long [batch_size, row_len]``: forever, or ``max_batches`` of them."""
        self._check_open()
        if self.max_batches is not None:
            return self._take(self.max_batches)
        return self.infinite()

    def state_dict(self) -> dict:
        """The position in the stream (epoch, sample in epoch, shuffle seed, ...) as a JSON-able dict."""
        return {
            "version": _STATE_VERSION,
            "split": self.split,
            "row_len": self.info.row_len,
            "tokenizer_sha256": self.info.tokenizer_sha256,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "streaming": self.dataloader.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` output; call before iterating. The saved shuffle seed wins."""
        if not isinstance(state, dict) or "streaming" not in state:
            raise UserError("loader state: not a memtrain loader state (no 'streaming' entry)")
        if state.get("split") != self.split:
            raise UserError(f"loader state: saved for split '{state.get('split')}', this loader reads '{self.split}'")
        if state.get("tokenizer_sha256") != self.info.tokenizer_sha256 or state.get("row_len") != self.info.row_len:
            raise UserError(
                f"loader state: saved for other shards (tokenizer {str(state.get('tokenizer_sha256'))[:12]}…, "
                f"rows of {state.get('row_len')}) than {self.info.path} (tokenizer "
                f"{self.info.tokenizer_sha256[:12]}…, rows of {self.info.row_len})"
            )
        self.dataloader.load_state_dict(dict(state["streaming"]))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: worker processes ignore SIGTERM, SIGINT and SIGUSR1.

    torchrun, the DeepSpeed launcher and Slurm send those to the whole process group; the main process
    handles them (checkpoint, then exit 75, :mod:`memtrain.engine.preempt`) and shuts its workers down itself,
    so a worker dying first would only turn a clean preemption into a crash."""
    import signal

    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def make_loader(
    shards: str | Path,
    split: str,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    epoch_size: int | None = None,
    drop_last: bool = True,
    max_batches: int | None = None,
    info: ShardInfo | None = None,
    memories: Any = None,
    num_canonical_nodes: int | None = None,
    download_retry: int | None = None,
    download_timeout: float | None = None,
) -> ShardLoader:
    """A :class:`ShardLoader` over ``split`` ("train" or "val") of the shard directory/URL ``shards``.

    Iterating yields ``torch.long [batch_size, row_len]`` batches forever (or ``max_batches`` of them).
    ``shuffle``/``seed``: streaming's deterministic shuffle (reshuffled each epoch); ``shuffle=False`` gives
    the stored order. ``num_workers``: DataLoader worker processes; they read as fast as the training
    process does on its own (``tools/bench_loader.py``) and take that work off it, and the batches and resume
    points are the same for any number. ``epoch_size``: rows per epoch (default: all). ``drop_last``: drop each
    rank's last partial batch. Under torch.distributed each rank gets its own part of every epoch (streaming
    reads RANK/WORLD_SIZE/LOCAL_WORLD_SIZE). ``num_canonical_nodes``: the node count the sample order is laid
    out for (``data.num_canonical_nodes``; None: the run's node count). For a validation set use
    ``shuffle=False, max_batches=N``. ``memories``: a :class:`memtrain.data.memories.MemoryShards` of the same
    split: batches are then :class:`~memtrain.data.memories.MemoryBatch` (token rows with their precomputed
    memories). For a remote ``shards``: ``download_retry`` re-attempts of a failed shard download (default
    :data:`~memtrain.data.checked_stream.DOWNLOAD_RETRY`) and ``download_timeout`` for the storage client
    (default :data:`~memtrain.data.checked_stream.DOWNLOAD_TIMEOUT` s); a shard that still cannot be
    downloaded ends iteration with one :class:`UserError` naming its URL.
    """
    info = info or read_shard_info(shards, cache_dir)
    return ShardLoader(
        info,
        split,
        batch_size,
        shuffle,
        seed,
        num_workers=num_workers,
        epoch_size=epoch_size,
        drop_last=drop_last,
        max_batches=max_batches,
        memories=memories,
        num_canonical_nodes=num_canonical_nodes,
        download_retry=download_retry,
        download_timeout=download_timeout,
    )
