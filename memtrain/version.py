"""Which memtrain is running, and on what: the package version, the git commit, library versions, devices.

describe()         -> "memtrain 0.1.0 (commit 0123ca8)"   or   "memtrain 0.1.0" for an installed wheel
provenance(...)    -> the run metadata recorded in every checkpoint's meta.json and in summary.json
describe_meta(m)   -> "memtrain 0.1.0, commit 0123ca8 (dirty)" from such metadata, for reports
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from memtrain import __version__

_CHECKOUT = Path(__file__).resolve().parents[1]
#: the libraries whose versions decide what a run computes (distribution names)
LIBRARIES = ("torch", "deepspeed", "mosaicml-streaming", "triton", "transformers", "numpy")


def _git(*args: str) -> str | None:
    # only memtrain's own checkout: a wheel installed into some other repository's folder reports no commit
    if not ((_CHECKOUT / ".git").exists() and (_CHECKOUT / "pyproject.toml").is_file()):
        return None
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=_CHECKOUT, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """``MEMTRAIN_COMMIT`` if set (a copied tree without ``.git``), else the short HEAD of the memtrain checkout
    this module runs from, else None (an installed wheel, or no git)."""
    if os.environ.get("MEMTRAIN_COMMIT"):
        return os.environ["MEMTRAIN_COMMIT"]
    out = (_git("rev-parse", "--short", "HEAD") or "").strip()
    return out or None


@functools.lru_cache(maxsize=1)
def git_dirty() -> bool | None:
    """Whether tracked files of the checkout differ from HEAD (None: not a checkout, or unknown)."""
    if os.environ.get("MEMTRAIN_COMMIT"):
        return None
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def describe() -> str:
    commit = git_commit()
    return f"memtrain {__version__}" + (f" (commit {commit})" if commit else "")


def library_versions() -> dict[str, str | None]:
    """Python and the :data:`LIBRARIES` as installed (None: not installed); reads metadata, imports nothing."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def launcher(environ: dict | None = None) -> str:
    """How this process was started: torchrun, deepspeed, srun or single process."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:  # deepspeed.launcher.launch sets both
        return "deepspeed"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return "srun"
    return "env" if "RANK" in env else "single process"


def device_names(device_type: str) -> list[str]:
    """The names of this node's devices of ``device_type`` (CUDA GPUs by name, else the CPU)."""
    if device_type == "cuda":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [_cpu_name()]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def provenance(world_size: int, device_type: str) -> dict:
    """What produced a run: memtrain version, commit and dirty flag, library versions, devices, world size,
    launcher and host. Recorded in every checkpoint's ``meta.json`` and in ``summary.json``."""
    return {
        "memtrain": __version__,
        "commit": git_commit(),
        "dirty": git_dirty(),
        "versions": library_versions(),
        "devices": device_names(device_type),
        "world_size": world_size,
        "launcher": launcher(),
        "host": platform.node(),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def describe_meta(meta: dict) -> str:
    """``memtrain 0.1.0, commit 0123ca8 (dirty)`` from a checkpoint's ``meta.json``; ``unrecorded`` when it
    predates provenance."""
    p = meta.get("provenance")
    if not isinstance(p, dict):
        return "memtrain version unrecorded"
    commit = p.get("commit") or "unknown commit"
    dirty = " (dirty)" if p.get("dirty") else ""
    return f"memtrain {p.get('memtrain', '?')}, commit {commit}{dirty}"
