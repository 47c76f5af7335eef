"""Data for measurements: shards of another row length, the random-token control, and the information-less
baseline a retention probe is compared with.

Shapes: B rows, T tokens per row, V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from memtrain.data.ingest import INFO_FILE, build_shards
from memtrain.data.loader import ShardInfo, read_shard_info
from memtrain.errors import UserError
from memtrain.metrics import uniform_logit_ce


def shards_with_row_len(
    shards: str | Path, row_len: int, cache_dir: str | Path | None = None, progress: bool = False
) -> str:
    """A shard directory with rows of ``row_len`` tokens made from the same corpus and tokenizer as ``shards``.

    ``shards`` itself when its rows already hold ``row_len`` tokens. Otherwise the corpus named in its
    ``memtrain_shards.json`` is re-packed with its tokenizer (same validation split and seed) into
    ``cache_dir`` (default: beside ``shards``) as ``<name>-rows<row_len>-<key>``, once: a later call finds it.
    Raises UserError when the corpus is no longer where the shards say it was.
    """
    info = read_shard_info(shards)
    if info.row_len == row_len:
        return str(shards)
    sources = [str(s) for s in info.raw.get("sources", [])]
    missing = [s for s in sources if not Path(s).exists()]
    if not sources or missing:
        raise UserError(
            f"{shards}: rows hold {info.row_len} tokens, not {row_len}, and the corpus they were made "
            f"from ({', '.join(missing) or 'not recorded'}) is not there to re-pack; pass shards with "
            f"rows of {row_len} tokens (`memtrain data shards --row-len {row_len}`)"
        )
    val_fraction = float(info.raw.get("val_fraction", 0.01))
    seed = int(info.raw.get("seed", 0))
    key = hashlib.sha256(json.dumps([info.tokenizer_sha256, sources, row_len, val_fraction, seed]).encode())
    base = Path(cache_dir) if cache_dir is not None else info.local_dir.parent
    out = base / f"{info.local_dir.name}-rows{row_len}-{key.hexdigest()[:8]}"
    if not (out / INFO_FILE).is_file():
        build_shards(
            sources,
            info.tokenizer_path,
            out,
            row_len=row_len,
            val_fraction=val_fraction,
            seed=seed,
            workers=1,
            progress=progress,
        )
    return str(out)


class RunStopped(UserError):
    """A run of a measurement stopped before its last step (preempted by USR1/TERM, or ``--stop-after``): its
    checkpoint is written and running the same command again continues it. Exit code 75, as a preempted
    ``memtrain train``, so a Slurm job is requeued."""

    exit_code = 75


def finished(summary: dict, run_dir) -> dict:
    """The trainer's ``summary`` if the run completed; raises :class:`RunStopped` otherwise."""
    if not summary.get("complete"):
        raise RunStopped(
            f"{run_dir}: stopped at step {summary.get('step')} before the end of the run; run the "
            "same command again to continue"
        )
    return summary


def n_special(info: ShardInfo) -> int:
    """Ids below this are special tokens (pad, unk, bos, eos, <sep>, <blank>): 1 + the largest special id."""
    return 1 + max((i for i in info.special_ids.values() if i is not None), default=-1)


class RandomTokens:
    """Batch transform for the random-token control: token ids [B, T] -> ids [B, T] drawn uniformly from
    ``[low, vocab_size)`` (no special token, so nothing is masked out of the loss).

    The draw is seeded by the batch's content (and ``seed``), so it is a pure function of the batch: the same
    data order gives the same random rows, a resumed run continues exactly, and the global RNG is untouched.
    The information-less CE of such rows is exactly ``ln(vocab_size - low)``.
    """

    def __init__(self, vocab_size: int, low: int, seed: int = 0):
        if not 0 <= low < vocab_size - 1:
            raise ValueError(f"random tokens need low ({low}) < vocab_size - 1 ({vocab_size - 1})")
        self.vocab_size, self.low, self.seed = int(vocab_size), int(low), int(seed)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        digest = hashlib.blake2b(
            ids.detach().cpu().numpy().tobytes(), digest_size=8, salt=self.seed.to_bytes(8, "little", signed=True)
        ).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        return torch.randint(self.low, self.vocab_size, tuple(ids.shape), generator=gen, dtype=ids.dtype)

    @property
    def baseline_ce(self) -> float:
        """CE (nats) of the best prediction that knows nothing about a row: the uniform over its values."""
        return math.log(self.vocab_size - self.low)


def unigram_baseline(
    fit_rows: list[torch.Tensor], eval_rows: list[torch.Tensor], vocab_size: int, pad_id: int | None
) -> dict[str, float]:
    """The information-less baseline measured on the data: every position predicted by the token frequencies.

    ``fit_rows``: batches [B, T] the frequencies are counted on (add-1/2 smoothing over all V ids);
    ``eval_rows``: batches [B, T] scored (pad tokens excluded, as the reconstruction targets exclude them).
    Returns ``{"ce": nats, "accuracy": rate of the most frequent token}``. A decoder that receives no
    information about its input can learn at best about this (the per-position marginals it can also learn
    differ little from one position to the next in packed text).
    """
    counts = torch.full((vocab_size,), 0.5, dtype=torch.float64)
    for rows in fit_rows:
        flat = rows.reshape(-1)
        if pad_id is not None:
            flat = flat[flat != pad_id]
        counts += torch.bincount(flat, minlength=vocab_size)[:vocab_size].double()
    logp = (counts / counts.sum()).log()
    ce_sum, n, hits = 0.0, 0, 0
    top = int(counts.argmax())
    for rows in eval_rows:
        flat = rows.reshape(-1)
        if pad_id is not None:
            flat = flat[flat != pad_id]
        ce_sum -= float(logp[flat].sum())
        n += flat.numel()
        hits += int((flat == top).sum())
    if n == 0:
        return {"ce": float("nan"), "accuracy": float("nan")}
    return {"ce": ce_sum / n, "accuracy": hits / n}


def retained_bits(ce: float, baseline_ce: float, tokens: int) -> dict[str, float]:
    """How much a memory carries beyond the information-less baseline.

    ``bits_per_token`` = (baseline CE - CE) / ln 2, and ``bits_per_memory`` = that x ``tokens`` (the chunk
    length): an estimate of the information one vector holds about its chunk.
    """
    per_token = (baseline_ce - ce) / math.log(2.0)
    return {"bits_per_token": per_token, "bits_per_memory": per_token * tokens}


#: training batches whose token frequencies give the information-less baseline
BASELINE_FIT_BATCHES = 64


def run_baseline(cfg, transform=None) -> dict[str, float]:
    """:func:`unigram_baseline` for a run config: frequencies from the first ``BASELINE_FIT_BATCHES`` training
    batches, scored on the held-out batches the run is evaluated on (both through ``transform`` if given;
    random tokens then have no padding). Adds ``information_less_ce``: the uniform CE of a
    :class:`RandomTokens` transform, else the frequency baseline."""
    from memtrain.evaluation import take_batches

    def rows(split: str, n: int) -> list[torch.Tensor]:
        batches = take_batches(cfg.data.shards, split, cfg.data.batch_size, n, cfg.data.cache_dir)
        return [transform(b) for b in batches] if transform else batches

    info = read_shard_info(cfg.data.shards, cfg.data.cache_dir)
    uni = unigram_baseline(
        rows("train", BASELINE_FIT_BATCHES),
        rows("val", cfg.train.eval_batches),
        info.vocab_size,
        None if transform else info.pad_id,
    )
    info_less = transform.baseline_ce if isinstance(transform, RandomTokens) else uni["ce"]
    return {
        "ln_V": math.log(info.vocab_size),
        "uniform_logits": uniform_logit_ce(info.vocab_size),
        "unigram_ce": uni["ce"],
        "unigram_accuracy": uni["accuracy"],
        "information_less_ce": info_less,
    }
