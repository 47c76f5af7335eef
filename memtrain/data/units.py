"""Jobs made of units, written by any number of slices and merged into one dataset: the mechanics that
``memtrain data shards`` and ``memtrain precompute`` share.

A job's directory holds a plan file (the job's settings: written atomically by whichever slice gets there
first, and compared by every other slice and every resumed run) and, per split, one folder per unit. A unit
is written by streaming's ``MDSWriter`` into ``<split>/.unit_NNNNN.tmp-<pid>`` together with its record
(``memtrain_unit.json``: samples, and size and sha256 of its one shard), and renamed to
``<split>/unit_NNNNN`` when complete: a unit folder exists only complete, and a killed slice leaves at most
temporary folders, which the next run of that unit removes. Units are dealt round-robin to ``world`` slices
(:func:`resolve_slice`). When every unit is complete, a merge joins the units' ``index.json`` files into
``<split>/index.json`` (:func:`merge_split`); merging is idempotent, so two slices finishing together do no
harm. Nothing here holds a timestamp, so a resumed or sliced job writes the same bytes as one uninterrupted
process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memtrain.data.index_check import read_index
from memtrain.data.memory_manifest import UNIT_FILE, canonical_json, first_difference, lookup, read_json, unit_name
from memtrain.data.streaming_compat import import_streaming
from memtrain.data.tokenizer import file_sha256
from memtrain.errors import UserError

#: streaming's MDS format stores shard offsets as 32-bit numbers
MDS_MAX_SHARD_BYTES = 2**32


def resolve_slice(
    rank: int | None,
    world: int | None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """This process's slice ``(rank, world)``: the flags if given, else a Slurm array's
    ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``, else torchrun's
    ``RANK`` of ``WORLD_SIZE``, else 0 of 1."""
    env = os.environ if env is None else env
    if rank is None and world is None:
        if env.get("SLURM_ARRAY_TASK_COUNT"):
            rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            world = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif env.get("WORLD_SIZE"):
            rank, world = int(env.get("RANK", 0)), int(env["WORLD_SIZE"])
        else:
            rank, world = 0, 1
    elif rank is None or world is None:
        raise UserError("--rank and --world go together (slice RANK of WORLD)")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"--rank {rank} --world {world}: expected 0 <= rank < world")
    return rank, world


def claim_plan(
    out: Path,
    plan_file: str,
    plan: dict,
    settings: Callable[[dict], dict],
    validate: Callable[[Any, str], Any],
    what: str,
) -> None:
    """Create ``out/<plan_file>`` holding ``plan``, or check that the existing one (an earlier run or another
    slice of this job) has the same ``settings(plan)``; UserError naming the first differing field.
    ``what``: how the error names the directory's kind ("this memory directory")."""
    path = out / plan_file
    if not path.exists():
        tmp = out / f".{plan_file}.tmp-{os.getpid()}"
        tmp.write_text(canonical_json(plan))
        try:
            os.link(tmp, path)  # atomic and exclusive: the first slice to get here writes the plan
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: exclusive create, readers retry below
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(canonical_json(plan))
        finally:
            tmp.unlink()
    for _attempt in range(20):  # another slice may still be writing it (the no-hard-link case)
        try:
            old = json.loads(path.read_text())
            break
        except ValueError:
            time.sleep(0.1)
    else:
        old = read_json(path)  # a one-line error naming the file
    validate(old, str(path))
    a, b = settings(old), settings(plan)
    where = first_difference(a, b)
    if where:
        raise UserError(
            f"{out}: {what} was started with {where} = {json.dumps(lookup(old, where))}, this job has "
            f"{json.dumps(lookup(plan, where))}; use another --out, or the same settings to resume it"
        )


def unit_done(unit_dir: Path) -> bool:
    """A renamed unit folder is complete by construction; its shards must still have the recorded sizes."""
    try:
        rec = json.loads((unit_dir / UNIT_FILE).read_text())
        if "shards" in rec:
            return all((unit_dir / s["shard"]).stat().st_size == s["bytes"] for s in rec["shards"])
        if rec["shard"] is None:
            return rec["samples"] == 0
        return (unit_dir / rec["shard"]).stat().st_size == rec["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def start_unit(split_dir: Path, name: str) -> Path:
    """The temporary folder to write unit ``name`` of ``split_dir`` into, after removing what a killed run of
    that unit left."""
    split_dir.mkdir(parents=True, exist_ok=True)
    clear_leftovers(split_dir, name)
    return split_dir / f".{name}.tmp-{os.getpid()}"


def clear_leftovers(split_dir: Path, name: str) -> None:
    """Remove the temporary folders killed runs of unit ``name`` left in ``split_dir``. A resumed slice calls it
    for its finished units too: one a killed run completed has no later start to clean up after it."""
    for stale in split_dir.glob(f".{name}.*"):
        shutil.rmtree(stale, ignore_errors=True)


def finish_unit(tmp: Path, final: Path, extra: Mapping[str, Any] | None = None, one_shard: bool = True) -> dict:
    """Record the finished MDS folder ``tmp`` and rename it to ``final``; returns the record: ``unit``,
    ``samples`` and, with ``one_shard`` (the writer made at most one shard), ``shard``, ``bytes`` and
    ``sha256``, else ``shards``, a list of those; plus ``extra``. UserError if a shard exceeds the MDS
    format's 4 GiB."""
    index = json.loads((tmp / "index.json").read_text())
    shards = []
    for info in index["shards"]:
        name = (info.get("zip_data") or info["raw_data"])["basename"]
        size = (tmp / name).stat().st_size
        if size >= MDS_MAX_SHARD_BYTES:
            raise UserError(f"{final}: a shard of {size} bytes exceeds the MDS format's 4 GiB limit; use smaller units")
        shards.append({"shard": name, "bytes": size, "sha256": file_sha256(tmp / name)})
    record: dict[str, Any] = {"unit": final.name, "samples": sum(int(i["samples"]) for i in index["shards"])}
    if one_shard:
        if len(shards) > 1:
            raise RuntimeError(f"{tmp}: a unit holds one shard, its writer made {len(shards)}")
        record.update(shards[0] if shards else {"shard": None, "bytes": 0, "sha256": None})
    else:
        record["shards"] = shards
    record.update(extra or {})
    (tmp / UNIT_FILE).write_text(canonical_json(record))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists() and not unit_done(final):  # a finished unit damaged since: replace it
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same unit meanwhile (identical content)
        if not unit_done(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def missing(job_dir: Path, units: Mapping[str, int]) -> list[str]:
    """``split/unit_NNNNN`` of every unit that is not complete; ``units``: split -> number of units."""
    return [
        f"{split}/{unit_name(i)}"
        for split, n in units.items()
        for i in range(n)
        if not unit_done(job_dir / split / unit_name(i))
    ]


def read_records(split_dir: Path, n: int) -> list[dict]:
    """The records of units ``0..n-1`` of ``split_dir``."""
    return [read_json(split_dir / unit_name(i) / UNIT_FILE) for i in range(n)]


def merge_split(split_dir: Path, unit_dirs: Sequence[Path]) -> None:
    """Join the ``index.json`` of ``unit_dirs`` (in order; those without samples are left out) into
    ``split_dir/index.json``, written through a rename. Every unit index is checked first."""
    import_streaming()
    from streaming.base.util import merge_index

    used = [u for u in unit_dirs if read_json(u / UNIT_FILE)["samples"] > 0]
    if not used:
        raise UserError(f"{split_dir}: none of its {len(unit_dirs)} units holds a sample")
    for u in used:  # merge_index copies their shard names into the split's index: check them first
        read_index(u / "index.json")
    staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=split_dir))
    try:
        logging.disable(logging.WARNING)  # merge_index announces its temporary folder on the root logger
        try:
            merge_index([str(u / "index.json") for u in used], str(staging))
        finally:
            logging.disable(logging.NOTSET)
        os.replace(staging / "index.json", split_dir / "index.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
