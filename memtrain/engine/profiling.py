"""``train.profile``: a torch.profiler trace of a few training steps, and on CUDA a memory snapshot.

Every rank profiles optimizer steps ``start`` .. ``start + steps - 1`` and writes, under ``<run>/profile/``:

``trace-rank{R}-steps{S}-{E}.json``   Chrome trace format: open it in https://ui.perfetto.dev or
                                      chrome://tracing (CPU ops, and CUDA kernels on a GPU, with shapes)
``ops-rank{R}-steps{S}-{E}.txt``      the operators with the most self time, as a table
``memory-rank{R}-steps{S}-{E}.pickle`` (CUDA, ``memory: true``) the caching allocator's history: drag it into
                                      https://pytorch.org/memory_viz

Each file appears complete or not at all (written beside, then renamed). The profiled steps run slower than
the others; the time spent writing the files is not counted in the logged throughput. A run resumed past
``start`` does not profile again; one that stops inside the window writes what it recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from memtrain.engine.distributed import DistInfo
from memtrain.fileio import write_atomic


class StepProfiler:
    """Call :meth:`before_step` (with the number of the step about to run) and :meth:`after_step` (the number
    of the step just finished) around every step, and :meth:`close` at the end."""

    def __init__(
        self,
        cfg,
        run_dir: Path,
        info: DistInfo,
        start_step: int,
        pause: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        announce: Callable[[str], None] = print,
    ):
        self.cfg = cfg if cfg is not None and start_step < cfg.start else None
        self.dir = run_dir / "profile"
        self.info = info
        self.pause, self.announce = pause, announce
        self._prof: torch.profiler.profile | None = None
        self._first = 0
        self._memory = False

    def before_step(self, step: int) -> None:
        if self.cfg is None or step != self.cfg.start or self._prof is not None:
            return
        cuda = self.info.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._memory = cuda and self.cfg.memory
        if self._memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._prof.start()
        self._first = step

    def after_step(self, step: int) -> None:
        if self._prof is not None and self.cfg is not None and step >= self.cfg.start + self.cfg.steps - 1:
            self._finish(step)

    def close(self) -> None:
        """Write what was recorded if the run ended inside the profiled steps."""
        if self._prof is not None:
            self._finish(None)

    def _finish(self, last: int | None) -> None:
        prof, self._prof = self._prof, None
        assert prof is not None  # callers check self._prof first
        with self.pause():
            if self.info.device.type == "cuda":
                torch.cuda.synchronize(self.info.device)
            prof.stop()
            stem = f"rank{self.info.rank}-steps{self._first}-{last if last is not None else 'end'}"
            trace = self.dir / f"trace-{stem}.json"
            write_atomic(trace, prof.export_chrome_trace)
            cuda = self.info.device.type == "cuda"
            table = prof.key_averages().table(
                sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30
            )
            write_atomic(self.dir / f"ops-{stem}.txt", lambda p: Path(p).write_text(table + "\n"))
            written = [trace.name, f"ops-{stem}.txt"]
            if self._memory:
                write_atomic(self.dir / f"memory-{stem}.pickle", torch.cuda.memory._dump_snapshot)
                torch.cuda.memory._record_memory_history(enabled=None)
                written.append(f"memory-{stem}.pickle")
            self.cfg = None  # once per run
        if self.info.is_main:
            self.announce(
                f"profile: steps {stem.split('-steps')[1]} of rank 0 written to {self.dir}: "
                + ", ".join(written)
                + " (docs/observability.md says how to read them)"
            )
