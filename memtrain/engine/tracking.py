"""Where training numbers go: TensorBoard scalars, a JSON-lines log, and the progress bar.

Only rank 0 writes. ``metrics.jsonl`` holds one record per logged step (the same scalars as TensorBoard) so
reports and plots can be made without TensorBoard.
"""
from __future__ import annotations

import json
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

        self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step if start_step else None)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
