"""Reading text corpora and writing them as packed, tokenized MDS shards.

Sources are parquet files in FineWeb's schema (``text``, ``id``, ...), jsonl files (one
``{"text": ..., "id": ...}`` object per line) or plain text files (documents separated by blank lines),
given as files, directories (searched recursively by extension) or glob patterns.

:func:`build_shards` writes::

    OUT/train/         MDS shards (index.json + shard.*.mds.zstd), column input_ids: ndarray uint16[row_len]
    OUT/val/           the same for the validation split (absent when val_fraction is 0)
    OUT/tokenizer.model
    OUT/memtrain_shards.json

Every document is tokenized, followed by EOS, and the stream of each split is cut into rows of exactly
``row_len`` tokens (a row may span documents; the split's last partial row is dropped and counted). A
document goes to validation when a stable hash of its id falls below ``val_fraction``, so membership does
not depend on document order, worker count or which other documents exist.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memtrain import fileio
from memtrain.data import tokenize_units, units
from memtrain.data.documents import expand_sources, plan_units
from memtrain.data.mds_rows import row_writer
from memtrain.data.memory_manifest import read_json, unit_name
from memtrain.errors import UserError

FORMAT_VERSION = 1
INFO_FILE = "memtrain_shards.json"
#: the plan of a build in progress (its settings), in ``<out>.partial``
PLAN_FILE = "memtrain_shards.plan.json"
PARTIAL_SUFFIX = ".partial"
SPLITS = ("train", "val")

# ----------------------------------------------------------------------------------------------------
# Writing rows


def _write_unit(job_dir: Path, index: int, result: dict, plan: dict) -> None:
    """Write the rows :func:`memtrain.data.tokenize_units.tokenize_unit` made of unit ``index`` into every split
    of ``job_dir``. Each split's unit folder appears only complete (:func:`memtrain.data.units.finish_unit`);
    its record keeps the documents and the tail tokens that did not fill a row, for the merge."""
    name = unit_name(index)
    for split, part in result["splits"].items():
        tmp = units.start_unit(job_dir / split, name)
        try:
            writer = row_writer(tmp, plan["row_len"], plan["dtype"], plan["shard_size"])
            writer.write_rows(part["rows"])
            writer.finish()
            extra = {"documents": part["documents"], "tail": part["tail"].tolist()}
            units.finish_unit(tmp, job_dir / split / name, extra, one_shard=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def publish_shards(
    tmp: Path,
    out: Path,
    info: dict,
    *,
    val_fraction: float,
    seed: int,
    sources: Sequence,
    files: Sequence,
    overwrite: bool,
) -> None:
    """Complete ``info`` with what every shard manifest records (split settings, sources, time, version), write
    it into the finished temporary directory ``tmp`` and move that to ``out`` (checked again first: nothing
    may have appeared there meanwhile)."""
    info.update(
        {
            "val_fraction": val_fraction,
            "seed": seed,
            "sources": [str(s) for s in sources],
            "files": len(files),
            "memtrain_version": _version(),
        }
    )
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    _check_out_dir(out, overwrite)
    _replace_dir(tmp, out)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out}: output directory exists and is not empty; choose another --out or pass "
                "--overwrite to replace it"
            )
        if not (out / INFO_FILE).is_file():
            raise UserError(
                f"{out}: refusing to overwrite a directory that is not a memtrain shard directory "
                f"(it has no {INFO_FILE})"
            )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place as ``out``; an old ``out`` is removed only after the move."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _size(value: int | str, what: str) -> int:
    """Bytes of ``"32mb"``, ``"1gb"``, ``4096`` ... (streaming's units); UserError naming ``what``."""
    from memtrain.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base.util import bytes_to_int

    try:
        n = bytes_to_int(value)
    except (ValueError, TypeError):
        n = 0
    if n < 1:
        raise UserError(f"{what}: expected a size such as 64mb or 1gb, got {value!r}")
    return n


def _settings(plan: dict) -> dict:
    """What slices and resumed runs of one build must share: not how the sources were spelled, nor the version."""
    return {k: v for k, v in plan.items() if k not in ("sources", "memtrain_version")}


def _validate_plan(raw: object, where: str) -> dict:
    need = {
        "format_version": int,
        "tokenizer_sha256": str,
        "row_len": int,
        "dtype": str,
        "units": int,
        "splits": list,
        "files": list,
        "eos_id": int,
        "shard_size": int,
        "val_fraction": float,
        "seed": int,
    }
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object")
    for key, kind in need.items():
        value = raw.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise UserError(f"{where}: field {key!r} missing or not a {kind.__name__}")
    if raw["format_version"] != FORMAT_VERSION or not set(raw["splits"]) <= set(SPLITS):
        raise UserError(f"{where}: not a plan of this memtrain's shard format {FORMAT_VERSION}")
    return raw


def partial_dir(out: Path) -> Path:
    """Where a build of ``out`` keeps its units until it is published: ``<out>.partial``."""
    return out.parent / f"{out.name}{PARTIAL_SUFFIX}"


def _run_units(job: Path, todo: list[int], unit_list: list, plan: dict, model_bytes: bytes, workers: int, bar) -> int:
    """Write units ``todo`` with ``workers`` processes (this one and ``workers - 1`` helpers); returns the
    tokens written.

    Helpers (:mod:`memtrain.data.tokenize_units`) read, tokenize and pack units and send the rows back; this
    process writes every unit's files, and tokenizes units itself while it waits: it starts at once, while
    the helpers (fresh interpreters, safe whatever threads this process runs) are still starting."""
    tasks = collections.deque((i, unit_list[i], plan) for i in todo)
    tokens = 0

    def write(result: dict) -> None:
        nonlocal tokens
        _write_unit(job, result["index"], result, plan)
        tokens += result["tokens"]
        bar.update(1)
        bar.set_postfix_str(f"{tokens / 1e6:.2f}M tokens", refresh=False)

    tokenize_units.init_tokenizer(model_bytes)
    helpers = min(workers, len(tasks)) - 1
    if helpers < 1:
        while tasks:
            write(tokenize_units.tokenize_unit(tasks.popleft()))
        return tokens
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["memtrain.data.tokenize_units"])
    with ctx.Pool(helpers, initializer=tokenize_units.init_tokenizer, initargs=(model_bytes,)) as pool:
        up = [pool.apply_async(tokenize_units.ready) for _ in range(helpers)]
        inflight: list = []
        while tasks or inflight:
            for res in [r for r in inflight if r.ready()]:
                inflight.remove(res)
                write(res.get())
            if all(u.ready() for u in up):
                while tasks and len(inflight) < helpers:
                    inflight.append(pool.apply_async(tokenize_units.tokenize_unit, (tasks.popleft(),)))
            if tasks:
                write(tokenize_units.tokenize_unit(tasks.popleft()))
            elif inflight:
                inflight[0].wait(0.05)
    return tokens


def build_shards(
    sources: Sequence[str],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    row_len: int,
    val_fraction: float = 0.01,
    workers: int = 2,
    shard_size: str | int = "32mb",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    unit_size: str | int = "256mb",
    rank: int | None = None,
    world: int | None = None,
    merge: bool = True,
) -> dict:
    """Tokenize ``sources`` and write train/val MDS shards of ``row_len``-token rows to ``out_dir``.

    Args:
        sources: parquet / jsonl / txt files, directories or globs.
        tokenizer_path: a memtrain ``tokenizer.model`` (or a directory holding one).
        out_dir: the shard directory to create. It must not exist or be empty, unless ``overwrite`` (then it
            must be an earlier shard directory, replaced only when the new one is complete).
        row_len: tokens per row (= model.chunk_len * model.n_chunks), >= 2.
        val_fraction: expected fraction of documents in the validation split (by a stable hash of the id
            salted with ``seed``); 0 writes no validation split.
        workers: processes, each writing whole units; the output is identical for any value.
        shard_size: MDS shard size limit (bytes, or a string such as ``"32mb"``).
        unit_size: text per unit (:func:`memtrain.data.documents.plan_units`).
        rank, world: this slice of the build (:func:`memtrain.data.units.resolve_slice`: the flags, a Slurm
            array task, torchrun's RANK/WORLD_SIZE, else the whole build). Slices write their units into
            ``<out_dir>.partial``; whichever finds every unit complete merges and publishes ``out_dir``.
        merge: merge and publish when every unit is complete.
        progress: show a tqdm bar (units and tokens).

    Each unit's rows are packed from its own documents in order; the tokens left over at the end of each
    unit (fewer than a row) are packed, in unit order, into the split's last rows at the merge. Rows are
    ``ndarray:uint16:<row_len>`` (``int32`` when the vocabulary exceeds 65536 ids), zstd-compressed.
    Returns the summary written to ``out_dir/memtrain_shards.json`` plus ``out_dir`` and ``seconds``, or, for
    a slice that left units to others, ``{"merged": False, ...}`` with its counts.
    Raises :class:`UserError` for bad arguments or input, an empty corpus, or an empty split.
    """
    from memtrain.data.tokenizer import TOKENIZER_FILE, Tokenizer

    t0 = time.time()
    if int(row_len) != row_len or row_len < 2:
        raise UserError(f"--row-len: rows must hold at least 2 tokens, got {row_len}")
    row_len = int(row_len)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    if workers < 1:
        raise UserError(f"--workers: expected >= 1, got {workers}")
    unit_bytes = _size(unit_size, "--unit-size")
    shard_bytes = _size(shard_size, "--shard-size")
    rank, world = units.resolve_slice(rank, world)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    files = expand_sources(sources)
    tok = Tokenizer.load(tokenizer_path)
    unit_list = plan_units(files, unit_bytes)
    if not unit_list:
        raise UserError(f"{', '.join(map(str, sources))}: no documents found (empty corpus)")
    plan = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "special_ids": tok.special_ids,
        "eos_id": tok.eos_id,
        "row_len": row_len,
        "dtype": "uint16" if tok.vocab_size <= 65536 else "int32",
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "splits": ["train", "val"] if val_fraction > 0 else ["train"],
        "unit_bytes": unit_bytes,
        "shard_size": shard_bytes,
        "units": len(unit_list),
        "files": [{"name": f.name, "bytes": f.path.stat().st_size} for f in files],
        "sources": [str(s) for s in sources],
        "memtrain_version": _version(),
    }
    job = partial_dir(out)
    if job.exists() and (not job.is_dir() or (any(job.iterdir()) and not (job / PLAN_FILE).is_file())):
        raise UserError(f"{job}: exists and is not a partial shard build; remove it or choose another --out")
    job.mkdir(parents=True, exist_ok=True)
    try:
        units.claim_plan(job, PLAN_FILE, plan, _settings, _validate_plan, "this partial shard build")
        if not (job / TOKENIZER_FILE).is_file():
            fileio.write_atomic(job / TOKENIZER_FILE, lambda tmp: shutil.copyfile(tok.path, tmp))
        mine = list(range(rank, len(unit_list), world))
        todo = [i for i in mine if not all(units.unit_done(job / s / unit_name(i)) for s in plan["splits"])]
        for i in mine:  # including finished units: a killed run may have completed one after leaving a folder
            for s in plan["splits"]:
                units.clear_leftovers(job / s, unit_name(i))
        from tqdm import tqdm

        bar = tqdm(
            total=len(todo),
            desc=f"shards {rank}/{world}" if world > 1 else "shards",
            unit=" units",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        try:
            tokens = _run_units(job, todo, unit_list, plan, tok.path.read_bytes(), workers, bar)
        finally:
            bar.close()
        info = merge_shards(out, overwrite=overwrite) if merge else None
    except UserError:
        if world == 1:  # input the user must fix: no half-made build is kept for a resume that cannot help
            shutil.rmtree(job, ignore_errors=True)
        raise
    summary = {"rank": rank, "world": world, "units": len(mine), "written": len(todo), "tokens_written": tokens}
    if info is None:
        left = {m.split("/")[1] for m in units.missing(job, {s: len(unit_list) for s in plan["splits"]})}
        return {
            **summary,
            "merged": False,
            "out_dir": str(out),
            "partial": str(job),
            "missing": len(left),
            "seconds": time.time() - t0,
        }
    return {**info, **summary, "merged": True, "out_dir": str(out), "seconds": time.time() - t0}


def merge_shards(out_dir: str | Path, overwrite: bool = False) -> dict | None:
    """Publish the build in ``<out_dir>.partial`` as ``out_dir`` once every unit is complete: pack each
    split's unit tails into its last rows, join the units' indexes, write ``memtrain_shards.json`` and rename
    the folder into place. Returns the manifest, or None while units are missing. Idempotent: a second
    slice finishing at the same moment finds the build already published."""
    from memtrain.data.tokenizer import TOKENIZER_FILE, file_sha256

    out = Path(out_dir)
    job = partial_dir(out)
    try:
        plan = _validate_plan(read_json(job / PLAN_FILE), str(job / PLAN_FILE))
        n, row_len = plan["units"], plan["row_len"]
        if units.missing(job, {s: n for s in plan["splits"]}):
            return None
        if file_sha256(job / TOKENIZER_FILE) != plan["tokenizer_sha256"]:
            raise UserError(f"{job / TOKENIZER_FILE}: not the tokenizer this build was started with")
        counts = {}
        for split in plan["splits"]:
            split_dir = job / split
            records = units.read_records(split_dir, n)
            tail = np.fromiter(itertools.chain.from_iterable(r["tail"] for r in records), dtype=plan["dtype"])
            n_rows = tail.size // row_len
            unit_dirs = [split_dir / unit_name(i) for i in range(n)]
            if n_rows:
                tail_dir = split_dir / unit_name(n)
                if not units.unit_done(tail_dir):
                    tmp = units.start_unit(split_dir, tail_dir.name)
                    try:
                        writer = row_writer(tmp, row_len, plan["dtype"], plan["shard_size"])
                        writer.write_rows(tail[: n_rows * row_len].reshape(n_rows, row_len))
                        writer.finish()
                        units.finish_unit(tmp, tail_dir, {"documents": 0, "tail": []}, one_shard=False)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
                unit_dirs.append(tail_dir)
            rows = sum(r["samples"] for r in records) + n_rows
            counts[split] = {
                "rows": rows,
                "tokens": rows * row_len,
                "documents": sum(r["documents"] for r in records),
                "dropped_tail_tokens": int(tail.size - n_rows * row_len),
            }
            if rows:
                units.merge_split(split_dir, unit_dirs)
        _check_splits(counts, row_len, plan["val_fraction"], plan["sources"])
        info = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": plan["tokenizer_sha256"],
            "vocab_size": plan["vocab_size"],
            "row_len": row_len,
            "dtype": plan["dtype"],
            "special_ids": plan["special_ids"],
            "splits": counts,
            "dropped_tail_tokens": sum(c["dropped_tail_tokens"] for c in counts.values()),
            "units": n,
        }
        publish_shards(
            job,
            out,
            info,
            val_fraction=plan["val_fraction"],
            seed=plan["seed"],
            sources=plan["sources"],
            files=plan["files"],
            overwrite=overwrite,
        )
        return info
    except (FileNotFoundError, UserError):
        published = out / INFO_FILE
        if not job.exists() and published.is_file():  # another slice published it meanwhile
            return json.loads(published.read_text())
        raise


def _check_splits(counts: dict, row_len: int, val_fraction: float, sources: Sequence) -> None:
    """UserError for an empty corpus or an empty split."""
    n_docs = sum(c["documents"] for c in counts.values())
    if n_docs == 0:
        raise UserError(f"{', '.join(map(str, sources))}: no documents found (empty corpus)")
    tr = counts["train"]
    if tr["rows"] == 0:
        raise UserError(
            f"train split is empty: its {tr['documents']} documents hold {tr['dropped_tail_tokens']} "
            f"tokens, fewer than one row of --row-len {row_len}; add text or use a shorter row"
        )
    if "val" in counts and counts["val"]["rows"] == 0:
        v = counts["val"]
        all_tokens = sum(c["rows"] * row_len + c["dropped_tail_tokens"] for c in counts.values())
        need = max(2 * val_fraction, 8 * row_len / max(1, all_tokens))  # aim at ~8 rows
        raise UserError(
            f"validation split would be empty: {v['documents']} of {n_docs} documents fell in it "
            f"({v['dropped_tail_tokens']} tokens, less than one row of {row_len}); use a larger "
            f"--val-fraction (e.g. {min(0.5, need):.3g}) or pass --val-fraction 0 for no validation split"
        )


def _version() -> str:
    try:
        from memtrain import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def format_summary(summary: dict) -> str:
    """A few human-readable lines: rows, tokens and documents per split, dropped tail, time; for a slice that
    left units to others, what it wrote and how to finish."""
    if summary.get("merged") is False:
        return (
            f"slice {summary['rank']}/{summary['world']}: wrote {summary['written']} of its {summary['units']} "
            f"units ({summary['tokens_written']:,} tokens) into {summary['partial']} in "
            f"{summary['seconds']:.1f} s; {summary['missing']} unit(s) of the build still to write, then "
            f"`memtrain data merge --out {summary['out_dir']}` (the last slice merges by itself)"
        )
    lines = [
        f"{summary['out_dir']}: rows of {summary['row_len']} tokens, vocab {summary['vocab_size']}, "
        f"tokenizer {summary['tokenizer_sha256'][:12]}"
    ]
    for name, c in summary["splits"].items():
        lines.append(
            f"  {name:5s} {c['rows']:>10,} rows  {c['tokens']:>13,} tokens  {c['documents']:>9,} docs  "
            f"(dropped tail {c['dropped_tail_tokens']:,} tokens)"
        )
    if "seconds" in summary:
        lines.append(f"  done in {summary['seconds']:.1f} s")
    return "\n".join(lines)
