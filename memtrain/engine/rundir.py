"""Guarding a run directory: one run per directory, never overwritten by a different one.

A run directory holds ``config.yaml`` (the run's identity), ``checkpoints/``, ``tb/``, ``metrics.jsonl`` and
``summary.json``. Starting a run in a directory that holds a *different* run, or the same run with
checkpoints but without ``--resume``, stops with a message before anything is written.

One process per directory: the process that writes the run (rank 0) holds an exclusive ``flock`` on
``<run>/.memtrain.lock`` from :func:`prepare_run_dir` until it exits (the kernel drops it when the process
dies, also on SIGKILL, so a stale lock file never blocks a restart). A second process on the same directory
stops with a message naming the holder's pid and host (written into the lock file) and changes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

import yaml
from memtrain.config import Config, dump_config
from memtrain.engine.checkpoint import latest_checkpoint
from memtrain.errors import UserError

#: the lock file inside a run directory
LOCK_NAME = ".memtrain.lock"
#: the Slurm jobs submitted for a run directory (``memtrain jobs``), written before the run starts
JOBS_NAME = ".memtrain-jobs.jsonl"
#: what a directory may hold and still count as empty
_OWN = (LOCK_NAME, JOBS_NAME)
#: resolved run directory -> open lock file descriptor held by this process
_held: dict[str, int] = {}

#: Sections and fields that define what a run computes; cadence, device and progress fields may change on resume.
IDENTITY = ("model", "objective", "curriculum", "data.shards", "optim", "run.seed", "train.steps")


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def identity_of(cfg_dict: dict) -> dict:
    flat = _flatten(cfg_dict)
    return {k: v for k, v in flat.items() if any(k == i or k.startswith(i + ".") for i in IDENTITY)}


def with_defaults(cfg_dict: dict) -> dict:
    """``cfg_dict`` with every field it lacks at its default: a run directory written before a setting existed
    holds the run that the setting's default computes (a new setting's default keeps the old behaviour). A
    dict that no longer validates is returned as it is, and then differs where it differs."""
    try:
        return Config.model_validate(cfg_dict).model_dump(mode="json")
    except ValueError:
        return cfg_dict


def first_difference(a: dict, b: dict) -> str | None:
    """The first identity field that differs between two config dicts, as 'field (old -> new)'; a field one of
    them lacks counts at its default (:func:`with_defaults`)."""
    ia, ib = identity_of(with_defaults(a)), identity_of(with_defaults(b))
    for k in sorted(set(ia) | set(ib)):
        if ia.get(k) != ib.get(k):
            return f"{k}: {ia.get(k)!r} in the directory, {ib.get(k)!r} now"
    return None


def _holder_error(run_dir: Path, fd: int) -> UserError:
    try:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").split()
    except OSError:
        holder = []
    who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "a process that is starting"
    return UserError(
        f"run.out_dir: {run_dir} is in use by another memtrain process ({who}, lock "
        f"{run_dir / LOCK_NAME}); wait for it to end, or choose another run.out_dir"
    )


def _check_not_held(run_dir: Path) -> None:
    """UserError naming the holder if another process holds ``run_dir``'s lock (nothing is created)."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _holder_error(run_dir, fd) from None
    finally:
        os.close(fd)


def lock_run_dir(run_dir: Path) -> None:
    """Take this process's exclusive lock on ``run_dir`` (created if missing), held until the process exits or
    :func:`release_run_dir`; a no-op if this process holds it already. Another holder is a one-line UserError
    naming it. On a file system without ``flock`` support a warning is printed and the run goes on unlocked."""
    key = str(Path(run_dir).resolve())
    path = run_dir / LOCK_NAME
    if key in _held:
        try:
            if os.fstat(_held[key]).st_ino == os.stat(path).st_ino:
                return
        except OSError:
            pass
        release_run_dir(run_dir)  # the directory was removed and made again: lock the new one
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            error = _holder_error(run_dir, fd)
            os.close(fd)
            raise error from None
        os.close(fd)
        print(
            f"memtrain: warning: run.out_dir: cannot lock {path} ({exc.strerror}); make sure no other "
            "process trains in this directory",
            file=sys.stderr,
            flush=True,
        )
        return
    text = f"{os.getpid()} {socket.gethostname()}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)
    _held[key] = fd


def release_run_dir(run_dir: Path) -> None:
    """Drop this process's lock on ``run_dir`` (if it holds one); the process's exit does the same."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Lock, create or validate ``run_dir`` for ``cfg``; write its ``config.yaml``. The lock is held until the
    process exits (:func:`lock_run_dir`)."""
    new = cfg.model_dump(mode="json")
    saved = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.out_dir: {run_dir} exists and is not a directory")
    if not saved.is_file() and run_dir.is_dir() and any(p.name not in _OWN for p in run_dir.iterdir()):
        raise UserError(
            f"run.out_dir: {run_dir} exists, is not empty and is not a memtrain run directory; "
            "choose another run.out_dir"
        )
    fresh = str(run_dir.resolve()) not in _held
    if run_dir.is_dir():
        if fresh:
            _check_not_held(run_dir)  # another process's run: say so before reading what it is writing
        _validate(run_dir, saved, new, resume)  # a refused start writes nothing, not even the lock file
    lock_run_dir(run_dir)
    try:
        _validate(run_dir, saved, new, resume)  # again under the lock: nobody else writes the directory now
    except BaseException:
        if fresh:  # a refused start leaves no lock behind in this process
            release_run_dir(run_dir)
        raise
    saved.write_text(dump_config(cfg))


def _validate(run_dir: Path, saved: Path, new: dict, resume: bool) -> None:
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"{saved}: unreadable run config; choose another run.out_dir") from None
        diff = first_difference(old, new)
        if diff is not None:
            raise UserError(
                f"run.out_dir: {run_dir} holds a different run ({diff}); choose another "
                "run.out_dir or remove that directory"
            )
        latest = latest_checkpoint(run_dir)
        if latest is not None and not resume:
            raise UserError(
                f"run.out_dir: {run_dir} already holds this run up to step {latest.step}; "
                "pass --resume to continue it, or choose another run.out_dir"
            )
    elif any(p.name not in _OWN for p in run_dir.iterdir()):
        raise UserError(
            f"run.out_dir: {run_dir} exists, is not empty and is not a memtrain run directory; "
            "choose another run.out_dir"
        )
