"""Sweeps: a grid of config overrides expanded into one run directory per point.

A grid file::

    name: width                      # sweep name (run names are <name>-<index>)
    base: yaml/tiny.yaml             # the config every point starts from
    out_dir: runs/sweeps/width       # one run directory per point below this
    set: {train.steps: 30}           # overrides shared by every point
    grid:                            # dotted config fields -> values; the sweep is their product
      model.decoder.d_model: [32, 64]
      slurm.tasks_per_node: [1, 2]

``expand`` validates every key against the config schema and every point as a whole config before anything
runs or is submitted. Points run locally one after another (``torchrun`` when a point has several ranks),
or on Slurm as one job array per group of points that ask for the same resources.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memtrain.config import Config, apply_overrides, config_from_dict, dump_config, read_yaml
from memtrain.errors import UserError


class GridFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    base: str
    out_dir: str
    set: dict[str, Any] = {}
    grid: dict[str, list[Any]] = Field(..., min_length=1)


@dataclass
class Point:
    index: int
    name: str
    values: dict[str, Any]
    cfg: Config
    run_dir: Path

    @property
    def ranks(self) -> int:
        return self.cfg.slurm.nodes * self.cfg.slurm.ranks_per_node


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted field path of the config schema."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if sub is not None:
            out += config_fields(sub, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _check_key(key: str, where: str) -> None:
    fields = config_fields()
    if key in fields or any(f.startswith(key + ".") for f in fields):
        return
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"{where}: grid key '{key}' is not a config field{hint}")


def load_grid(path: str | Path) -> GridFile:
    raw = read_yaml(path)
    try:
        grid = GridFile.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        raise UserError(f"{path}: {loc}: {e['msg']}") from None
    for key in list(grid.grid) + list(grid.set):
        _check_key(key, str(path))
    for key, values in grid.grid.items():
        if not values:
            raise UserError(f"{path}: grid key '{key}' has no values")
    return grid


def _slug(values: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())


def expand(path: str | Path, flags: list | None = None) -> tuple[GridFile, list[Point]]:
    """Validate the grid and build one Config per point (run.name and run.out_dir set per point).

    ``flags``: overrides from the command line (``memtrain sweep --nodes 2 --set k=v ...``: ``"k=v"`` texts or
    ``(key, value)`` pairs), applied to every point after the grid's own values."""
    grid = load_grid(path)
    base = Path(grid.base)
    if not base.is_file() and (Path(path).parent / base).is_file():
        base = Path(path).parent / base
    base_raw = read_yaml(base)
    keys = list(grid.grid)
    points = []
    for i, combo in enumerate(itertools.product(*(grid.grid[k] for k in keys))):
        values = dict(zip(keys, combo))
        name = f"{grid.name}-{i:03d}"
        run_dir = Path(grid.out_dir) / name
        # values are set as values: never written into YAML text and read back (an out_dir with ' #' in it,
        # a time of 10:00:00 or an account of 12345 stay what they are)
        overrides = [(k, copy.deepcopy(v)) for k, v in {**grid.set, **values}.items()]
        overrides += [*(flags or []), ("run.name", name), ("run.out_dir", str(run_dir))]
        raw = apply_overrides(copy.deepcopy(base_raw), overrides)
        cfg = config_from_dict(raw, source=f"{path} (point {i}: {_slug(values)})")
        points.append(Point(i, name, values, cfg, run_dir))
    return grid, points


def write_points(grid: GridFile, points: list[Point]) -> Path:
    """Write ``<out_dir>/sweep.json`` and each point's frozen ``<out_dir>/configs/<name>.yaml``."""
    root = Path(grid.out_dir)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    for p in points:
        (root / "configs" / f"{p.name}.yaml").write_text(dump_config(p.cfg))
    (root / "sweep.json").write_text(
        json.dumps(
            {
                "name": grid.name,
                "base": grid.base,
                "set": grid.set,
                "grid": grid.grid,
                "points": [
                    {"index": p.index, "name": p.name, "values": p.values, "run_dir": str(p.run_dir), "ranks": p.ranks}
                    for p in points
                ],
            },
            indent=2,
            default=str,
        )
    )
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(grid: GridFile, points: list[Point], threads_per_rank: int = 1) -> list[int]:
    """Run every point here, one after another; a point with several ranks runs under torchrun (gloo)."""
    root = write_points(grid, points)
    codes = []
    for p in points:
        cfg_file = root / "configs" / f"{p.name}.yaml"
        cmd = [sys.executable, "-m", "memtrain", "train", str(cfg_file), "--resume"]
        if p.ranks > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(p.ranks),
                "--master_port",
                str(_free_port()),
                "-m",
                "memtrain",
                "train",
                str(cfg_file),
                "--resume",
            ]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank))
        print(
            f"sweep {grid.name}: point {p.index + 1}/{len(points)} {p.name} ({_slug(p.values)}), {p.ranks} rank(s)",
            flush=True,
        )
        codes.append(subprocess.run(cmd, env=env).returncode)
    return codes


def resource_groups(points: list[Point]) -> dict[str, list[Point]]:
    """Points that can share one job array: the same ``slurm`` section (resources, launcher, setup, container)."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(json.dumps(p.cfg.slurm.model_dump(mode="json"), sort_keys=True), []).append(p)
    return groups
