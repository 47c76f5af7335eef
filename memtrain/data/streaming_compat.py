"""The one way memtrain imports mosaicml-streaming.

``streaming/__init__.py`` eagerly imports ``streaming.vision`` and ``streaming.multimodal``, which need
torchvision. memtrain installs mosaicml-streaming with ``--no-deps`` (torchvision would replace the CPU
torch with a CUDA build), so those two subpackages are replaced by empty modules before the import.
Text datasets (``MDSWriter``, ``StreamingDataset``, ``StreamingDataLoader``) do not need them.

Everything in memtrain imports streaming through :func:`import_streaming`, which also makes streaming's
reads of a dataset's resume state release their shared-memory attachment (:func:`_free_resume_reads`).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

_lock = threading.Lock()
_patch_lock = threading.Lock()
_cleaned = False

#: set to "0" to skip the once-per-process clean-up of leaked streaming shared memory
CLEAN_ENV = "MEMTRAIN_STREAMING_CLEAN"
_SHM_DIR = Path("/dev/shm")
_SEGMENT = re.compile(r"^\d{6}_[a-z_]+$")
#: streaming's two lock files per dataset, in the temporary directory, named by the dataset's prefix
_LOCK_FILE = re.compile(r"^(\d{6})_(?:barrier|cache)_filelock$")
#: a segment younger than this may be in the middle of being created and mapped; never touch it
_MIN_STALE_AGE_S = 30.0


def import_streaming() -> types.ModuleType:
    """Return the ``streaming`` package, installing the ``sys.modules`` shim it needs first.

    The shim registers empty ``streaming.vision`` and ``streaming.multimodal`` modules unless real ones
    are already importable as such (``sys.modules.setdefault``), so an environment with torchvision and a
    full streaming install keeps working.
    """
    if "streaming" in sys.modules and hasattr(sys.modules["streaming"], "StreamingDataset"):
        _free_resume_reads()
        return sys.modules["streaming"]
    for name in ("streaming.vision", "streaming.multimodal"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import streaming  # deliberately late, after the shim

    _free_resume_reads()
    return streaming


def _free_resume_reads() -> None:
    """Make ``StreamingDataset._resume`` free the shared memory it attaches to (idempotent).

    ``_resume`` reads the dataset's resume state (written by ``load_state_dict``) by attaching to the
    ``NNNNNN_resume`` segment, copying its bytes and dropping the object; but streaming's ``SharedMemory``
    registers every attachment with ``atexit``, which keeps it, its file descriptor and its mapping for the life
    of the process. A resumed loader calls ``_resume`` at the start of every epoch and in every
    ``state_dict()`` (each checkpoint), so a resumed run, or a process running many of them, gathers one
    descriptor per call. Attach-only reads of a resume segment are made without the ``atexit`` registration
    here, so they are closed as soon as ``_resume`` drops them. Other segments are untouched."""
    import streaming.base.dataset as sd

    base = sd.SharedMemory  # pyright: ignore[reportPrivateImportUsage]  (streaming exposes SharedMemory without listing it)
    if getattr(base, "memtrain_frees_resume_reads", False):
        return
    from streaming.base.constant import RESUME

    suffix = f"_{RESUME}"

    class SharedMemory(base):  # type: ignore[misc, valid-type]
        memtrain_frees_resume_reads = True

        def __init__(
            self, name: str | None = None, create: bool | None = None, size: int = 0, auto_cleanup: bool = True
        ) -> None:
            if create is False and name is not None and str(name).endswith(suffix):
                auto_cleanup = False  # read once and dropped: closed with the object, not at exit
            super().__init__(name=name, create=create, size=size, auto_cleanup=auto_cleanup)

    with _patch_lock:  # not _lock: the clean-up holds that one while it imports streaming
        if not getattr(sd.SharedMemory, "memtrain_frees_resume_reads", False):  # pyright: ignore[reportPrivateImportUsage]  (streaming exposes SharedMemory without listing it)
            sd.SharedMemory = SharedMemory  # pyright: ignore[reportPrivateImportUsage]  (streaming exposes SharedMemory without listing it)


def _mapped_segments() -> set[str] | None:
    """Names of streaming /dev/shm segments that some live process maps (None if /proc is unreadable)."""
    proc = Path("/proc")
    if not proc.is_dir() or not _SHM_DIR.is_dir():
        return None
    pattern = re.compile(r"/dev/shm/(\d{6}_[a-z_]+)")
    mapped: set[str] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps", errors="replace") as f:
                mapped.update(pattern.findall(f.read()))
        except OSError:  # exited meanwhile, or another user's process
            continue
    return mapped


def _streaming_segments() -> list[Path]:
    try:
        return [p for p in _SHM_DIR.iterdir() if _SEGMENT.match(p.name)]
    except OSError:
        return []


def clean_stale_shared_memory_once() -> str:
    """Remove leaked streaming shared memory, the first time it is called in this process.

    Streaming keeps each dataset's state in ``/dev/shm`` segments named by a small integer prefix; a
    process killed without its resource tracker leaves them behind, and a later remote-backed dataset
    with the same cache directory then fails with "Reused local directory".

    ``streaming.base.util.clean_stale_shared_memory()`` removes *every* streaming segment, including
    those of other jobs running on the same machine (an evaluation next to a training run, two pytest
    runs), and synchronises ranks with a barrier. So it is called only where that is appropriate: a
    single-process run (WORLD_SIZE 1) on a machine where no live process maps any streaming segment
    (checked through ``/proc/*/maps``). Otherwise only segments that no live process maps and that are
    older than 30 s are unlinked, which is safe on every rank and next to other jobs. Without ``/proc``
    nothing is removed. ``MEMTRAIN_STREAMING_CLEAN=0`` turns the clean-up off.

    Returns what was done: ``"disabled"``, ``"done"`` (already ran in this process), ``"streaming"``,
    ``"stale-only: N removed"`` or ``"skipped: ..."``.
    """
    global _cleaned
    with _lock:
        if _cleaned:
            return "done"
        _cleaned = True
        if os.environ.get(CLEAN_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
            return "disabled"
        # Under several ranks, only each node's first rank cleans, and every rank waits for it: streaming's
        # ranks each pick the shared-memory prefix from the segments they see, so a clean-up running on one
        # rank while another looks would make them pick different prefixes.
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            import torch.distributed as dist

            result = "skipped: not the node's first rank"
            if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
                result = clean_stale_shared_memory_safely()
                remove_stale_lock_files()
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            return result
        result = clean_stale_shared_memory_safely()
        remove_stale_lock_files()
        return result


def clean_stale_shared_memory_safely() -> str:
    """The clean-up of :func:`clean_stale_shared_memory_once`, every time it is called."""
    segments = _streaming_segments()
    if not segments:
        return "skipped: no streaming segments"
    mapped = _mapped_segments()
    if mapped is None:
        return "skipped: cannot see which processes map shared memory"
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if not mapped and world == 1:
        import_streaming()
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return "streaming"
    removed = 0
    now = time.time()
    for seg in segments:
        if seg.name in mapped:
            continue
        try:
            if now - seg.stat().st_mtime < _MIN_STALE_AGE_S:
                continue
            seg.unlink()
            removed += 1
        except OSError:
            continue
    return f"stale-only: {removed} removed"


_probe_lock = threading.Lock()


class closing_prefix_probes:
    """Context manager around the construction of a ``StreamingDataset``: closes the shared-memory segments
    streaming opens only to look at other datasets' prefixes.

    ``streaming.base.shared.prefix._check_and_find`` attaches to the ``locals`` segment of every live
    dataset of the machine to pick a free prefix, and never closes those attachments (each one is also held
    by an ``atexit`` handler, so not even garbage collection frees it): every new dataset costs one file
    descriptor and one mapping per dataset alive at that moment, for the life of the process. Inside this
    context the probes are recorded; :meth:`release` closes those the new dataset does not keep (the one it
    keeps is its own ``_locals_shm``)."""

    def __enter__(self) -> closing_prefix_probes:
        import_streaming()
        import streaming.base.shared.prefix as prefix

        self._prefix = prefix
        self._probes: list = []
        base = prefix.SharedMemory  # pyright: ignore[reportPrivateImportUsage]  (streaming exposes SharedMemory without listing it)
        probes = self._probes

        class _Recorded(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                probes.append(self)

        _probe_lock.acquire()
        self._base = base
        prefix.SharedMemory = _Recorded  # pyright: ignore[reportPrivateImportUsage]  (streaming exposes SharedMemory without listing it)
        return self

    def __exit__(self, *exc) -> None:
        self._prefix.SharedMemory = self._base  # pyright: ignore[reportPrivateImportUsage]  (streaming exposes SharedMemory without listing it)
        _probe_lock.release()

    def release(self, keep: object = None) -> int:
        """Close every recorded attach-only probe except ``keep``; returns how many were closed."""
        import atexit

        closed = 0
        for shm in self._probes:
            if shm is keep or shm.created_shms:
                continue
            atexit.unregister(shm.cleanup)
            try:
                shm.cleanup()  # attach-only: closes, never unlinks
                closed += 1
            except (BufferError, OSError):
                atexit.register(shm.cleanup)
        self._probes.clear()
        return closed


def remove_stale_lock_files(prefix: int | None = None, directory: str | Path | None = None) -> int:
    """Remove streaming's lock files (``NNNNNN_barrier_filelock``, ``NNNNNN_cache_filelock``) of datasets
    that no longer exist; returns how many were removed. ``prefix``: only that dataset's.

    Streaming creates two lock files per dataset in the temporary directory and never removes them; while
    they exist, no new dataset takes their prefix, and every new dataset of the machine tests each prefix in
    turn, so a machine that has opened thousands of datasets (a test suite, a long sweep) spends seconds
    scanning per dataset. A lock file is stale when no ``/dev/shm`` segment with its prefix exists (a dataset
    creates its segments before its lock files and removes them when closed). One is removed only if this
    process can open it, no process holds its lock (taken without waiting while it is unlinked), and it is
    still the same file; files of other users and lock files on machines without ``/dev/shm`` are left."""
    if not _SHM_DIR.is_dir():
        return 0
    live = {p.name[:6] for p in _streaming_segments()}
    root = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        match = _LOCK_FILE.match(entry.name)
        if match is None or match.group(1) in live or (prefix is not None and int(match.group(1)) != prefix):
            continue
        removed += _unlink_unheld(entry.path)
    return removed


def _unlink_unheld(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # gone meanwhile, another user's, or a link
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.lstat(path).st_ino:
            return False
        os.unlink(path)
        return True
    except OSError:  # held by a live process, or removed meanwhile
        return False
    finally:
        os.close(fd)  # also releases the lock


def release_dataset(dataset: object) -> None:
    """Free what a ``StreamingDataset`` holds now rather than at interpreter exit: close (and, where this
    process created them, unlink) its shared-memory segments, drop streaming's ``atexit`` references to them
    (about a dozen descriptors and mappings per dataset), and remove its lock files once its segments are
    gone (:func:`remove_stale_lock_files`)."""
    import_streaming()
    from streaming.base.shared import SharedMemory

    found: list = []
    seen: set[int] = set()

    def walk(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, SharedMemory):
            found.append(obj)
            return
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            for v in list(d.values()):
                if isinstance(v, SharedMemory) or hasattr(v, "__dict__"):
                    walk(v, depth + 1)

    walk(dataset, 0)
    state = getattr(dataset, "__dict__", {})
    locals_shm = state.get("_locals_shm")
    if locals_shm is not None:  # what streaming's __del__ does: mark its local directories released
        try:
            locals_shm.buf[:4] = (0).to_bytes(4, sys.byteorder)
        except Exception:  # noqa: BLE001
            pass
    for shm in found:
        atexit.unregister(shm.cleanup)
        try:
            shm.cleanup()
        except (BufferError, OSError):  # a numpy view still maps it: leave it to interpreter exit
            atexit.register(shm.cleanup)
    prefix = state.get("_shm_prefix_int")
    if isinstance(prefix, int):
        remove_stale_lock_files(prefix)
