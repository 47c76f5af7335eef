"""Where training numbers go: the sinks of ``train.loggers`` and the console.

Only rank 0 writes. Every logged record goes to every sink:

``tensorboard``  ``<run>/tb/`` (TensorBoard scalars; the resolved config as text)
``jsonl``        ``<run>/metrics.jsonl``, one JSON object per record (``sweep collect``, plots and ``repro``
                 read it)
``wandb``        a Weights & Biases run (``train.wandb``), the resolved config as its config
``mlflow``       an MLflow run (``train.mlflow``), the resolved config as flattened parameters

On the console, rank 0 shows a tqdm bar when ``train.progress`` is on and stderr is a terminal; otherwise (a
Slurm batch log, ``progress: false``) it prints one plain line per logged step (:func:`format_line`).

Restarts. A run that restarts at step k (resumed from the checkpoint of step k, or started afresh with k = 0 in
a directory left by a run killed before its first checkpoint) logs steps k+1, k+2, ... again. TensorBoard
purges the records after step k (``purge_step``) and ``metrics.jsonl`` is rewritten without them. W&B and
MLflow continue the same run: their ids are kept in ``<run>/trackers.json``; the x axis of every W&B chart is
``trainer/step``, so steps logged again after a restart are drawn at their own step (an exact resume logs the
same values again). :meth:`Tracker.flush` (called at every checkpoint) makes the files hold every step up to
the checkpoint even if the process is killed afterwards.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memtrain.errors import UserError
from memtrain.fileio import write_json, write_text_atomic

#: What to install for each optional logger
INSTALL = {"wandb": "pip install wandb", "mlflow": "pip install mlflow-skinny (or the full mlflow)"}
IDS_FILE = "trackers.json"
#: The W&B x axis: every metric is charted against it, so a restarted run can log a step again
WANDB_STEP = "trainer/step"


def check_loggers(loggers: Sequence[str]) -> None:
    """UserError (exit 2) naming the install command when a logger of ``train.loggers`` is not installed."""
    for name in loggers:
        if name in INSTALL and importlib.util.find_spec(name) is None:
            raise UserError(
                f"train.loggers: {name} is not installed in this environment; install it with: {INSTALL[name]}"
            )


class Tracker:
    """The sinks of ``loggers`` plus the console. ``enabled=False`` (ranks other than 0) makes every call a
    no-op. ``config`` is the resolved run config (a dict), logged as hyperparameters."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
        loggers: Sequence[str] = ("tensorboard", "jsonl"),
        config: dict | None = None,
        run_name: str = "run",
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.sinks: list = []
        self._bar = None
        if not enabled:
            return
        config = config or {}
        ids = _read_ids(run_dir)
        try:
            for name in loggers:
                if name == "tensorboard":
                    self.sinks.append(_TensorBoard(run_dir, start_step, config))
                elif name == "jsonl":
                    self.sinks.append(_Jsonl(run_dir, start_step))
                elif name == "wandb":
                    self.sinks.append(_Wandb(run_dir, config, run_name, ids))
                elif name == "mlflow":
                    self.sinks.append(_Mlflow(run_dir, config, run_name, ids))
        except BaseException:
            self.close("failed")
            raise
        if progress and sys.stderr.isatty():
            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, smoothing=0.1
            )

    @property
    def lines(self) -> bool:
        """Whether logged steps are printed as plain lines (no progress bar)."""
        return self.enabled and self._bar is None

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        for sink in list(self.sinks):
            try:
                sink.scalars(step, values, kind)
            except Exception as err:  # a remote tracker that fails mid-run must not end the training run
                if isinstance(sink, (_TensorBoard, _Jsonl)):
                    raise
                self.sinks.remove(sink)
                self.write(
                    f"memtrain: warning: {sink.name} logging failed at step {step} ({_one_line(err)}); "
                    f"training continues without {sink.name} (metrics.jsonl and tb/ keep every step)"
                )

    def log_step(self, step: int, values: dict[str, float], weights: dict[str, float]) -> None:
        """A training record: to every sink, then to the bar's postfix or as one plain line."""
        self.scalars(step, values)
        if self._bar is not None:
            self._bar.set_postfix(
                {"loss": f"{values['loss/total']:.3f}", "tok/s": f"{values['tokens_per_s']:,.0f}"}, refresh=False
            )
        elif self.enabled:
            print(format_line(step, self.total_steps, values, weights), flush=True)

    def progress(self, steps: int) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        """Write everything logged so far to disk (TensorBoard queues events for up to two minutes)."""
        for sink in self.sinks:
            sink.flush()

    def close(self, status: str = "finished") -> None:
        """Close every sink once. ``status``: finished, stopped (``--stop-after``), preempted or failed; W&B and
        MLflow record it as the run's state."""
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(status)


# ---------------------------------------------------------------------------------------------------------
# The plain log line

#: The fields of the log line after the loss, in order: (record key, how the record shows it)
_LINE_PARTS = (
    ("lr", lambda r: f"lr {r['lr']:.2e}"),
    ("grad_norm", lambda r: f"gnorm {r['grad_norm']:.3g}"),
    ("tokens_per_s", lambda r: f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_rank']:,.0f}/rank)"),
    ("model_tflops_per_rank", lambda r: f"{r['model_tflops_per_rank']:.3g} TFLOP/s/rank"),
    ("mfu", lambda r: f"MFU {100 * r['mfu']:.1f}%"),
    ("memory/peak_alloc_gib", lambda r: f"mem {r['memory/peak_alloc_gib']:.2f} GiB"),
    ("memory/peak_rss_gib", lambda r: f"rss {r['memory/peak_rss_gib']:.2f} GiB"),
    ("step_time_s", lambda r: f"{r['step_time_s']:.3f} s/step"),
    ("eta_s", lambda r: f"ETA {datetime.timedelta(seconds=round(r['eta_s']))}"),
)


def format_line(step: int, total: int, v: dict[str, Any], weights: dict[str, float]) -> str:
    """One batch-log line of a training record ``v`` (the keys :func:`memtrain.engine.trainer.train` logs):

    ``step 120/2000 | loss 3.4120 (causal 3.0000, copy 0.8240) | lr 1.20e-03 | gnorm 0.84 | 45,210 tok/s
    (22,605/rank) | 123 TFLOP/s/rank | MFU 12.3% | mem 12.50 GiB | 0.350 s/step | ETA 0:11:02``
    """
    parts = [f"step {step}/{total}"]
    loss = f"loss {v['loss/total']:.4f}"
    per_obj = [f"{k[5:]} {v[k]:.4f}" for k in v if k.startswith("loss/") and k != "loss/total" and k[5:] in weights]
    if len(per_obj) > 1:
        loss += " (" + ", ".join(per_obj) + ")"
    parts.append(loss)
    if "memory/peak_alloc_gib" in v:  # the device's number when there is one, else the process's
        v = {k: x for k, x in v.items() if k != "memory/peak_rss_gib"}
    parts += [show(v) for key, show in _LINE_PARTS if key in v]
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Sinks: scalars(step, values, kind), flush(), close(status)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        restart = start_step > 0 or (run_dir / "tb").is_dir()
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1 if restart else None)
        if not restart and config:
            import yaml

            # four leading spaces: TensorBoard renders text as Markdown, and this makes it a code block
            text = "".join("    " + ln + "\n" for ln in yaml.safe_dump(config, sort_keys=False).splitlines())
            self.writer.add_text("config", text, 0)

    def scalars(self, step: int, values: dict, kind: str) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.flush()
        self.writer.close()


class _Jsonl:
    name = "jsonl"

    def __init__(self, run_dir: Path, start_step: int):
        path = run_dir / "metrics.jsonl"
        _truncate_jsonl(path, after_step=start_step)
        self.file = open(path, "a")

    def scalars(self, step: int, values: dict, kind: str) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()

    def flush(self) -> None:
        self.file.flush()

    def close(self, status: str) -> None:
        self.file.close()


class _Wandb:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, run_name: str, ids: dict):
        import wandb

        settings = config.get("train", {}).get("wandb", {})
        run_id = ids.get("wandb_id")
        if run_id is None:
            run_id = secrets.token_hex(6)  # W&B ids: up to 64 letters and digits
            write_json(run_dir / IDS_FILE, {**ids, "wandb_id": run_id})
            ids["wandb_id"] = run_id
        try:
            self.run = wandb.init(
                project=settings.get("project", "memtrain"),
                entity=settings.get("entity"),
                group=settings.get("group"),
                tags=settings.get("tags") or None,
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config,
                reinit="create_new",
            )
        except Exception as err:
            raise UserError(
                f"train.loggers: wandb could not start run {run_id} ({_one_line(err)}); log in with "
                "`wandb login`, or set WANDB_MODE=offline and sync later with `wandb sync`"
            ) from None
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP)

    def scalars(self, step: int, values: dict, kind: str) -> None:
        self.run.log({**values, WANDB_STEP: step})

    def flush(self) -> None:
        """W&B writes in its own service process."""

    def close(self, status: str) -> None:
        if status in ("preempted", "stopped"):
            self.run.mark_preempting()  # shown as preempted, not crashed, until the run resumes
        self.run.finish(exit_code=1 if status == "failed" else 0)


class _Mlflow:
    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "failed": "FAILED", "preempted": "KILLED", "stopped": "KILLED"}

    def __init__(self, run_dir: Path, config: dict, run_name: str, ids: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        settings = config.get("train", {}).get("mlflow", {})
        uri = settings.get("tracking_uri")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            run_id = ids.get("mlflow_run_id")
            if run_id is None:
                name = settings.get("experiment", "memtrain")
                exp = self.client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
                run_id = self.client.create_run(
                    exp_id, run_name=run_name, tags={"memtrain.run_dir": str(run_dir)}
                ).info.run_id
                write_json(run_dir / IDS_FILE, {**ids, "mlflow_run_id": run_id})
                ids["mlflow_run_id"] = run_id
                logged: dict = {}
            else:
                self.client.update_run(run_id, status="RUNNING")
                logged = self.client.get_run(run_id).data.params
            # a resume may change cadence fields; MLflow refuses to change a parameter, so the first value stays
            # (the run directory's config.yaml is the current one)
            params = [Param(k, v) for k, v in _flat_params(config).items() if k not in logged]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(run_id, params=params[i : i + 100])
        except UserError:
            raise
        except Exception as err:
            raise UserError(
                f"train.loggers: mlflow could not open a run at tracking URI "
                f"{uri or os.environ.get('MLFLOW_TRACKING_URI', '(MLflow default)')} "
                f"({_one_line(err)}); set train.mlflow.tracking_uri"
            ) from None
        self.run_id = run_id

    def scalars(self, step: int, values: dict, kind: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def flush(self) -> None:
        """Every batch is written when it is logged."""

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self._STATUS.get(status, "FINISHED"))


def _flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The config as MLflow parameters: nested keys joined with '.', lists as JSON, values cut to 6000 chars."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat_params(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            out[key] = text if len(text) <= 6000 else text[:5997] + "..."
    return out


_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _read_ids(run_dir: Path) -> dict:
    """The W&B and MLflow run ids of an earlier attempt of this run (``trackers.json``), checked."""
    path = run_dir / IDS_FILE
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable; remove it to start new W&B/MLflow runs for this run") from None
    if not isinstance(ids, dict) or not all(isinstance(v, str) and _ID.match(v) for v in ids.values()):
        raise UserError(
            f'{path}: expected {{"wandb_id": ID, "mlflow_run_id": ID}} with ids of letters, '
            "digits, '-' and '_'; remove it to start new W&B/MLflow runs for this run"
        )
    return {k: v for k, v in ids.items() if k in ("wandb_id", "mlflow_run_id")}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(err).__name__


def _truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop the records of steps after ``after_step`` (and a line cut short by a kill) from ``path``."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if (step := _step_of(ln)) is not None and step <= after_step]
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
