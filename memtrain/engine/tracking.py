"""Where training numbers go: TensorBoard scalars, a JSON-lines log, and the progress bar.

Only rank 0 writes. ``metrics.jsonl`` holds one record per logged step (the same scalars as TensorBoard) so
reports and plots can be made without TensorBoard.

A run that restarts at step k (resumed from the checkpoint of step k, or started afresh with k = 0 in a
directory left by a run killed before its first checkpoint) will log steps k+1, k+2, ... again, so records
after step k are dropped from both: TensorBoard purges them (``purge_step``) and ``metrics.jsonl`` is
rewritten without them. :meth:`Tracker.flush` (called at every checkpoint) makes both hold every step up to
the checkpoint even if the process is killed afterwards.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm import tqdm


class Tracker:
    """TensorBoard + JSONL sink. ``enabled=False`` (non-zero ranks) makes every call a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        restart = start_step > 0 or (run_dir / "tb").is_dir()
        self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1 if restart else None)
        jsonl = run_dir / "metrics.jsonl"
        _truncate_jsonl(jsonl, after_step=start_step)
        self._jsonl = open(jsonl, "a")
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, smoothing=0.1)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()

    def progress(self, steps: int) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def postfix(self, values: dict[str, str]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        """Write everything logged so far to disk (TensorBoard queues events for up to two minutes)."""
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._jsonl = None


def _truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop the records of steps after ``after_step`` (and a line cut short by a kill) from ``path``."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if (step := _step_of(ln)) is not None and step <= after_step]
    if len(kept) < len(lines):
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
