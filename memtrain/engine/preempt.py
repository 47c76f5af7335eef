"""Preemption: a signal asks every rank to finish its step, checkpoint and exit; the job then requeues.

Slurm sends ``USR1`` (``--signal=USR1@T``, ``scancel --signal=USR1``) or ``TERM`` (preemption, time limit,
torchrun forwarding). The handler only records the request; the training loop asks :meth:`Preemption.
should_stop` after every step. In a multi-rank run the ranks agree (an all-reduce of one flag, which waits for
the device) only every ``train.stop_check_every`` steps, at checkpoint steps and at the last step, the same
steps on every rank, so all ranks stop after the same step even when the signal reached them at different
moments; a single process reads its own flag after every step. The loop then writes a complete
checkpoint, leaves a ``PREEMPTED`` marker in the run directory and exits with code 75; the batch script sees
the marker and requeues the job, which resumes from the newest complete checkpoint.

The handler is installed first thing in :func:`memtrain.engine.trainer.train`, before the process group, the
data or the model: a signal received during start-up is remembered and the run stops at the first point where
all ranks can agree (before the first step: exit 75 without a new checkpoint, so the job still requeues).
The marker names the attempt that wrote it (``MEMTRAIN_ATTEMPT``: job id and restart count, set by the batch
script), so a later attempt never requeues on the strength of an old marker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

PREEMPTED_EXIT_CODE = 75
MARKER = "PREEMPTED"


class Preemption:
    """Records USR1/TERM while installed; :meth:`should_stop` is the collective decision."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.requested: str | None = None
        self._old: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._old[sig] = signal.signal(sig, self._handle)
            _start_resource_tracker(signals)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def should_stop(self, distributed: bool, device, collective: bool = True) -> bool:
        """True on every rank when any rank has received a signal (collective when ``distributed``).

        ``collective=False`` in a multi-rank run: False without communicating (the flag stays recorded for the
        next collective check); every rank must pass the same ``collective`` at the same step. A single process
        always answers from its own flag, which costs nothing."""
        if not distributed:
            return self.requested is not None
        if not collective:
            return False
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())  # the one wait for the device
        if stop and self.requested is None:
            self.requested = "peer"
        return stop

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _start_resource_tracker(signals: tuple[int, ...]) -> None:
    """Start multiprocessing's resource tracker (it keeps the loader's shared memory) with ``signals`` blocked.

    Slurm delivers the preemption signal to every process of the job step, the tracker included, and a
    tracker that dies of it is restarted by the next user and prints a KeyError for every segment at exit. A
    blocked signal stays blocked through ``exec``, so this tracker never sees them; a signal that arrives
    meanwhile waits and reaches this process's handler when the mask is restored."""
    from multiprocessing import resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_marker(run_dir: Path, step: int, reason: str) -> None:
    """``PREEMPTED``: the step of the newest checkpoint, the signal, and this attempt (the batch script
    requeues only for a marker of its own attempt)."""
    (Path(run_dir) / MARKER).write_text(
        json.dumps(
            {
                "step": step,
                "signal": reason,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "attempt": os.environ.get("MEMTRAIN_ATTEMPT", ""),
            }
        )
    )


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
