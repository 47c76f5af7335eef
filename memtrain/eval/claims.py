"""The paper's claims checked on the numbers of a reproduction, with the spread over seeds.

Every quantity a claim rests on is measured once per seed. A claim is a list of conditions, each a *margin*
that is positive when the condition holds (e.g. ``a - b - 0.1`` for "a exceeds b by 0.1"), computed seed by
seed; the claim agrees when every margin's mean is positive and exceeds two standard deviations of it over
the seeds. With one seed there is no spread to compare with: the mean margin alone decides, and the document
says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeGuard


def _is_num(x: Any) -> TypeGuard[int | float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation) of ``values``; sd is None for fewer than two."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, None
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def pm(values: Sequence[float], digits: int = 3) -> str:
    """``values`` as text: "0.581 ± 0.004" over several seeds, "0.581" for one."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def aggregate(results: Sequence[Any]) -> Any:
    """The mean over seeds of like-shaped results (dicts and lists nest): every measured number gets its mean,
    and a number under key ``k`` of a dict a sibling ``k_sd`` (None for one seed); a whole number the same in
    every result (a setting) and anything else (text, flags, lists of different lengths) is taken from the
    first result."""
    first = results[0]
    if isinstance(first, dict):
        out: dict[str, Any] = {}
        for k, v in first.items():
            vals = [r.get(k) if isinstance(r, dict) else None for r in results]
            if isinstance(v, int) and not isinstance(v, bool) and all(x == v for x in vals):
                out[k] = v  # a setting (width, steps, vocabulary), the same for every seed
            elif _is_num(v) and len(nums := [x for x in vals if _is_num(x)]) == len(vals):
                out[k], out[f"{k}_sd"] = mean_sd(nums)
            elif isinstance(v, (dict, list)) and all(isinstance(x, type(v)) for x in vals):
                out[k] = aggregate(vals)
            else:
                out[k] = v
        return out
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in results):
        if first and all(isinstance(x, dict) for x in first):
            return [aggregate([r[i] for r in results]) for i in range(len(first))]
    return first


def per_seed(*series: Sequence[float]) -> list[tuple[float, ...]]:
    """Seed-by-seed tuples of several measured quantities: one value per seed each, or one value for a model
    trained once (it is paired with every seed of the others). Series of different lengths are paired up to
    the shortest."""
    longer = [len(s) for s in series if len(s) > 1]
    n = min(longer) if longer else 1
    return [tuple(s[i] if len(s) > 1 else s[0] for s in series) for i in range(n)]


def condition(what: str, margins: Sequence[float], digits: int = 3, over: str = "seed") -> dict:
    """One condition of a claim: ``margins`` per seed (> 0 when it holds); ``over`` names what they are
    measured per ("seed", or "timing round" for a throughput). Holds when the mean margin is > 0 and > 2
    standard deviations (any positive mean with one)."""
    mean, sd = mean_sd(margins)
    holds = math.isfinite(mean) and mean > 0 and (sd is None or mean > 2 * sd)
    return {
        "what": what,
        "margin": mean,
        "sd": sd,
        "seeds": len(margins),
        "over": over,
        "holds": holds,
        "digits": digits,
    }


def claim(text: str, conditions: list[dict], evidence: str) -> dict:
    """A claim of the paper: agrees when every condition holds."""
    return {
        "claim": text,
        "holds": all(c["holds"] for c in conditions),
        "conditions": conditions,
        "seeds": max((c["seeds"] for c in conditions), default=0),
        "over": conditions[0].get("over", "seed") if conditions else "seed",
        "evidence": evidence,
    }


def condition_text(c: dict) -> str:
    """ "<what>: +0.430 ± 0.010 (> 2 sd)" for the document: the mean margin, its spread over the seeds and why
    it holds or not."""
    d = c.get("digits", 3)
    value = f"{c['margin']:+.{d}f}" + (f" ± {c['sd']:.{d}f}" if c["sd"] is not None else "")
    if not c["margin"] > 0:
        why = "not above 0"
    elif c["sd"] is None:
        why = f"above 0, one {c.get('over', 'seed')}"
    else:
        why = "> 2 sd" if c["holds"] else "within 2 sd of 0"
    return f"{c['what']}: {value} ({why})"


# ----------------------------------------------------------------------------------------------------
# The claims


def probe_claims(probes: dict[str, list[float]]) -> list[dict]:
    """Claims on the retention probes. ``probes``: probe label -> token accuracy per seed (labels "<arch>
    autoencoder", "<arch> causal LM", "<arch> untrained" for arch mixer and transformer)."""
    checks = []
    for arch in ("mixer", "transformer"):
        ae, clm, raw = (probes[f"{arch} {w}"] for w in ("autoencoder", "causal LM", "untrained"))
        seeds = per_seed(ae, clm, raw)
        conditions = [
            condition("autoencoder - 2 x max(causal LM, untrained)", [a - 2 * max(c, r) for a, c, r in seeds]),
            condition("autoencoder - max(causal LM, untrained) - 0.1", [a - max(c, r) - 0.1 for a, c, r in seeds]),
            condition(
                "max(0.05, max(causal LM, untrained) / 2) - |causal LM - untrained|",
                [max(0.05, 0.5 * max(c, r)) - abs(c - r) for a, c, r in seeds],
            ),
        ]
        checks.append(
            claim(
                f"{arch}: autoencoder memories >> causal-LM memories ~ untrained",
                conditions,
                f"token accuracy {pm(ae)} (autoencoder) vs {pm(clm)} (causal LM) and {pm(raw)} (untrained)",
            )
        )
    mix, tr = probes["mixer autoencoder"], probes["transformer autoencoder"]
    checks.append(
        claim(
            "mixer autoencoders >= transformer autoencoders at equal width and depth",
            [condition("mixer - transformer + 0.01", [m - t + 0.01 for m, t in per_seed(mix, tr)])],
            f"token accuracy {pm(mix)} (mixer) vs {pm(tr)} (transformer)",
        )
    )
    return checks


def copy_claim(causal: list[dict], combined: list[dict]) -> dict:
    """The copy claim on the memory models' evaluations, one per seed each ({result key: metrics})."""

    def acc(runs: list[dict], key: str) -> list[float]:
        return [r[key]["accuracy"] for r in runs]

    def uses(runs: list[dict]) -> list[float]:
        return [r["copy"]["accuracy"] - r["copy (memories shuffle)"]["accuracy"] for r in runs]

    c_copy, m_copy, c_uses, m_uses = acc(causal, "copy"), acc(combined, "copy"), uses(causal), uses(combined)
    conditions = [
        condition(
            "copy (causal + copy) - copy (causal only) - 0.1", [m - c - 0.1 for m, c in per_seed(m_copy, c_copy)]
        ),
        condition("shuffle cost (causal + copy) - 0.1", [u - 0.1 for u in m_uses]),
        condition("0.05 - shuffle cost (causal only)", [0.05 - u for u in c_uses]),
    ]
    return claim(
        "causal-only memory models fail copy; causal + copy models pass it (their memories carry the copied text)",
        conditions,
        f"copy accuracy {pm(c_copy)} (causal only) vs {pm(m_copy)} (causal + copy); shuffling memories across the "
        f"batch costs {pm(c_uses)} and {pm(m_uses)}; blank copy {pm(acc(causal, 'blank_copy'))} vs "
        f"{pm(acc(combined, 'blank_copy'))}",
    )


#: "close to full context": the memory model's per-step loss at most this fraction above the full-context model's
CLOSE = 0.02
#: "about as cheap per token": the memory model's training throughput at least this fraction of full context's
THROUGHPUT = 2 / 3


def e4_claims(group: dict) -> list[dict]:
    """The claims of the paper's E4 for one architecture. ``group``: ``arch``, ``models`` {"memory", "none",
    "full"} -> {label, seeds: [causal_by_chunk result per seed]}, and ``throughput`` {"memory", "full"} ->
    {tokens_per_s: [per round], flops_per_token}."""
    arch, models = group["arch"], group["models"]
    mem, none, full = (models[k]["seeds"] for k in ("memory", "none", "full"))
    n_chunks = len(mem[0]["per_chunk"])

    def ce(runs: list[dict], chunk: int | None = None) -> list[float]:
        return [r["ce"] if chunk is None else r["per_chunk"][chunk]["ce"] for r in runs]

    helps = [
        condition(f"CE chunk {c}: no memory - memory", [n - m for n, m in per_seed(ce(none, c), ce(mem, c))])
        for c in range(1, n_chunks)
    ]
    checks = [
        claim(
            f"{arch}: memories help next-token prediction (memory model < no-memory control in causal CE on chunks "
            f"1-{n_chunks - 1})",
            helps,
            "causal CE on chunks 1-"
            + f"{n_chunks - 1}: "
            + "; ".join(f"{pm(ce(mem, c))} vs {pm(ce(none, c))}" for c in range(1, n_chunks))
            + " (memory vs no memory)",
        )
    ]
    gap = [(n - m) / (n - f) if n != f else math.nan for m, n, f in per_seed(ce(mem), ce(none), ce(full))]
    checks.append(
        claim(
            f"{arch}: a memory model is close to a full-context causal LM at equal steps (per-step loss within "
            f"{CLOSE:.0%} of it, or below)",
            [
                condition(
                    f"{1 + CLOSE:g} x full-context CE - memory CE",
                    [(1 + CLOSE) * f - m for m, f in per_seed(ce(mem), ce(full))],
                )
            ],
            f"held-out causal CE {pm(ce(mem))} (memory) vs {pm(ce(full))} (full context) and {pm(ce(none))} (no "
            f"memory); the memories close {pm(gap, 2)} of the no-memory model's gap to full context",
        )
    )
    speed = group.get("throughput") or {}
    if "memory" in speed and "full" in speed:
        ratio = [m / f for m, f in per_seed(speed["memory"]["tokens_per_s"], speed["full"]["tokens_per_s"])]
        flops = speed["memory"]["flops_per_token"] / speed["full"]["flops_per_token"]
        checks.append(
            claim(
                f"{arch}: a memory model costs about as much per token as full context (paper: about 25% lower "
                f"throughput; checked: at least {THROUGHPUT:.2f} of the full-context throughput)",
                [
                    condition(
                        f"throughput ratio - {THROUGHPUT:.2f}", [r - THROUGHPUT for r in ratio], over="timing round"
                    )
                ],
                f"training throughput ratio memory / full context {pm(ratio, 2)} "
                f"({pm(speed['memory']['tokens_per_s'], 0)} vs {pm(speed['full']['tokens_per_s'], 0)} tokens/s); "
                f"FLOPs per token {flops:.2f}x",
            )
        )
    return checks
