"""A first-order scaling model: predicted step time and efficiency on N nodes from one measured GPU.

Weak scaling (the per-GPU batch stays fixed). Per step, every rank computes for ``t1`` seconds (measured on
one GPU) and the ranks exchange, with ring / hierarchical collectives:

====================  ==========================================================
engine                bytes each rank moves per step (Ψ parameters, b bytes each)
====================  ==========================================================
DDP, ZeRO-0/1         all-reduce of the gradients: 2(n-1)/n Ψb
ZeRO-2                reduce-scatter of gradients + all-gather of updated
                      parameters: also 2(n-1)/n Ψb
ZeRO-3                all-gather parameters in forward and in backward, then
                      reduce-scatter gradients: 3(n-1)/n Ψb
====================  ==========================================================

A collective over ``nodes x gpus`` ranks is timed hierarchically: the intra-node part over the per-GPU
NVLink bandwidth and the inter-node part over each node's network bandwidth, each as a ring all-reduce of
``latency + 2(n-1)/n x bytes / bandwidth`` (:func:`allreduce_time`). A pipeline of ``p`` stages
adds the bubble ``(p - 1) / m`` of ``m`` micro-batches and divides the model (and its collective volume)
among the stages. ``overlap`` is the fraction of the communication hidden behind backward compute.

Calibration: :func:`fit_allreduce` fits one link's latency and bandwidth to timed all-reduces;
``tools/calibrate_scaling.py`` measures them (and training step times) and writes a calibration file that
:func:`load_calibration` reads back as a :class:`Network`; :func:`resolve_network` picks the network of
``memtrain scale`` (a preset, a calibration file, single-value overrides).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from memtrain.errors import UserError
from memtrain.tables import markdown_table

#: the ``format`` of a calibration file (tools/calibrate_scaling.py writes it, :func:`load_calibration` reads it)
CALIBRATION_FORMAT = "memtrain-scaling-calibration/1"


@dataclass(frozen=True)
class Network:
    name: str
    #: per-GPU NVLink bus bandwidth inside a node, GB/s
    intra_gbps: float
    #: network bandwidth per node, GB/s (e.g. 8 x 400 Gb/s InfiniBand = 400 GB/s)
    inter_gbps: float
    #: per-collective latency, seconds (of the intra-node collective; also of the inter-node one unless
    #: ``inter_latency_s`` is given)
    latency_s: float = 20e-6
    #: per-collective latency across nodes, seconds (None: ``latency_s``)
    inter_latency_s: float | None = None

    @property
    def inter_latency(self) -> float:
        return self.latency_s if self.inter_latency_s is None else self.inter_latency_s


NETWORKS = {
    "h100-nvlink-ib8x400": Network("h100-nvlink-ib8x400", intra_gbps=370.0, inter_gbps=400.0),
    "a100-nvlink-ib4x200": Network("a100-nvlink-ib4x200", intra_gbps=230.0, inter_gbps=100.0),
    "ethernet-100g": Network("ethernet-100g", intra_gbps=230.0, inter_gbps=12.5, latency_s=50e-6),
}


def collective_factor(zero_stage: int) -> float:
    """Multiples of (n-1)/n Ψb each rank moves per step."""
    return 3.0 if zero_stage == 3 else 2.0


def ring_factor(ranks: int) -> float:
    """Bytes a rank sends in a ring all-reduce, per byte of the buffer: 2(n-1)/n."""
    return 2.0 * (ranks - 1) / ranks


def allreduce_time(nbytes: float, ranks: int, gbps: float, latency_s: float) -> float:
    """Seconds for a ring all-reduce of ``nbytes`` over ``ranks`` ranks on links of ``gbps`` GB/s (0 on one rank)."""
    if ranks <= 1:
        return 0.0
    return latency_s + ring_factor(ranks) * nbytes / (gbps * 1e9)


def comm_time(
    n_params: float, bytes_per_param: float, zero_stage: int, nodes: int, gpus_per_node: int, net: Network
) -> float:
    """Seconds of communication per step for the data-parallel collectives."""
    volume = n_params * bytes_per_param * collective_factor(zero_stage) / 2.0  # per all-reduce-equivalent
    return allreduce_time(volume, gpus_per_node, net.intra_gbps, net.latency_s) + allreduce_time(
        volume, nodes, net.inter_gbps, net.inter_latency
    )


def predict(
    step_time_1gpu: float,
    n_params: float,
    nodes: int,
    gpus_per_node: int,
    net: Network,
    zero_stage: int = 0,
    bytes_per_param: float = 2.0,
    pipeline_stages: int = 1,
    micro_batches: int = 1,
    overlap: float = 0.0,
    tokens_per_step_1gpu: float | None = None,
) -> dict:
    """Predicted step time, efficiency and throughput on ``nodes x gpus_per_node`` GPUs."""
    ranks = nodes * gpus_per_node
    p = max(pipeline_stages, 1)
    dp = max(ranks // p, 1)
    compute = step_time_1gpu / p * (micro_batches + p - 1) / max(micro_batches, 1)
    if dp > 1:
        dp_nodes = max(nodes // p, 1) if p <= nodes else 1
        dp_gpus = max(dp // dp_nodes, 1)
        comm = comm_time(n_params / p, bytes_per_param, zero_stage, dp_nodes, dp_gpus, net)
    else:
        comm = 0.0
    step = compute + (1.0 - overlap) * comm
    # ideal: each GPU holds 1/p of the model and computes t1/p per step, with no bubble or communication
    out = {
        "nodes": nodes,
        "gpus": ranks,
        "zero_stage": zero_stage,
        "pipeline_stages": p,
        "compute_s": compute,
        "comm_s": comm,
        "step_s": step,
        "efficiency": (step_time_1gpu / p) / step,
    }
    if tokens_per_step_1gpu:
        out["tokens_per_s"] = tokens_per_step_1gpu * dp / step
    return out


def table(rows: list[dict]) -> str:
    cols = ["nodes", "gpus", "zero_stage", "pipeline_stages", "compute_s", "comm_s", "step_s", "efficiency"]
    if rows and "tokens_per_s" in rows[0]:
        cols.append("tokens_per_s")
    return markdown_table(cols, ([f"{r[c]:.4g}" if isinstance(r[c], float) else r[c] for c in cols] for r in rows))


def network_summary(net: Network) -> dict:
    return asdict(net)


# ----------------------------------------------------------------------------------------------------
# calibration


@dataclass(frozen=True)
class LinkFit:
    """One link's all-reduce terms fitted to measurements: ``t = latency_s + 2(n-1)/n x bytes / (gbps 1e9)``."""

    latency_s: float
    gbps: float
    #: median relative error of the fit over the measured points
    median_rel_error: float
    points: int


def fit_allreduce(sizes_bytes: list[float], times_s: list[float], ranks: int) -> LinkFit:
    """Least-squares latency and bandwidth of a ring all-reduce over ``ranks`` ranks from timed all-reduces of
    ``sizes_bytes`` (at least two distinct sizes). Each point is weighted by 1/t, so that the small
    (latency-bound) sizes count as much as the large (bandwidth-bound) ones; a negative latency is clamped to
    0 and the bandwidth refitted through the origin."""
    if ranks < 2:
        raise ValueError("an all-reduce needs at least 2 ranks")
    if len(sizes_bytes) != len(times_s) or len(set(sizes_bytes)) < 2:
        raise ValueError("fit_allreduce needs times for at least two distinct sizes")
    if any(t <= 0 for t in times_s) or any(b <= 0 for b in sizes_bytes):
        raise ValueError("all-reduce sizes and times must be positive")
    xs = [ring_factor(ranks) * b for b in sizes_bytes]
    ws = [1.0 / t**2 for t in times_s]  # relative residuals: minimise sum(((a + x s - t) / t)^2)
    sw = sum(ws)
    sx = sum(w * x for w, x in zip(ws, xs))
    st = sum(w * t for w, t in zip(ws, times_s))
    sxx = sum(w * x * x for w, x in zip(ws, xs))
    sxt = sum(w * x * t for w, x, t in zip(ws, xs, times_s))
    det = sw * sxx - sx * sx
    slope = (sw * sxt - sx * st) / det  # seconds per byte sent
    latency = (st - slope * sx) / sw
    if latency < 0:
        latency, slope = 0.0, sxt / sxx
    if slope <= 0:
        raise ValueError("the all-reduce times do not grow with size: no bandwidth can be fitted")
    errors = sorted(abs(latency + x * slope - t) / t for x, t in zip(xs, times_s))
    return LinkFit(latency_s=latency, gbps=1.0 / slope / 1e9, median_rel_error=_median(errors), points=len(xs))


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def calibration_network(name: str, intra: LinkFit, inter: LinkFit) -> Network:
    """The :class:`Network` of fitted intra-node and inter-node links."""
    return Network(name, intra.gbps, inter.gbps, latency_s=intra.latency_s, inter_latency_s=inter.latency_s)


def calibration_dict(net: Network, measured: dict | None = None) -> dict:
    """What a calibration file holds: the network's terms and what they were measured on (free-form)."""
    return {
        "format": CALIBRATION_FORMAT,
        "name": net.name,
        "intra": {"gbps": net.intra_gbps, "latency_s": net.latency_s},
        "inter": {"gbps": net.inter_gbps, "latency_s": net.inter_latency},
        "measured": measured or {},
    }


def _positive(data: dict, link: str, key: str, source: str) -> float:
    part = data.get(link)
    if not isinstance(part, dict):
        raise UserError(f"{source}: '{link}' must be a mapping with 'gbps' and 'latency_s'")
    value = part.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{source}: {link}.{key} must be a number, got {value!r}")
    if value < 0 or (key == "gbps" and value == 0):
        raise UserError(f"{source}: {link}.{key} must be {'> 0' if key == 'gbps' else '>= 0'}, got {value}")
    return float(value)


def network_from_calibration(data: object, source: str = "calibration") -> Network:
    """The :class:`Network` of a calibration file's contents; :class:`UserError` naming the field if malformed."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object (a calibration file of tools/calibrate_scaling.py)")
    if data.get("format") != CALIBRATION_FORMAT:
        raise UserError(f"{source}: format must be {CALIBRATION_FORMAT!r}, got {data.get('format')!r}")
    name = data.get("name", "calibrated")
    if not isinstance(name, str) or not name:
        raise UserError(f"{source}: name must be a non-empty string, got {name!r}")
    return Network(
        name,
        intra_gbps=_positive(data, "intra", "gbps", source),
        inter_gbps=_positive(data, "inter", "gbps", source),
        latency_s=_positive(data, "intra", "latency_s", source),
        inter_latency_s=_positive(data, "inter", "latency_s", source),
    )


def load_calibration(path: str | Path) -> Network:
    """Read a calibration file (JSON, written by ``tools/calibrate_scaling.py``) as a :class:`Network`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: calibration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: cannot read the calibration file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return network_from_calibration(data, str(p))


def resolve_network(
    name: str = "h100-nvlink-ib8x400",
    intra_gbps: float | None = None,
    inter_gbps: float | None = None,
    latency_us: float | None = None,
    calibration: str | Path | None = None,
) -> Network:
    """The network ``memtrain scale`` predicts for: the calibration file if given, else the preset ``name``;
    then each given value overrides its term (``latency_us`` both latencies, in microseconds)."""
    if calibration is not None:
        net = load_calibration(calibration)
    elif name in NETWORKS:
        net = NETWORKS[name]
    else:
        raise UserError(f"--net: unknown network {name!r} (known: {', '.join(NETWORKS)})")
    for flag, value in (("--intra-gbps", intra_gbps), ("--inter-gbps", inter_gbps), ("--latency-us", latency_us)):
        if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and flag != "--latency-us")):
            raise UserError(f"{flag}: must be {'>= 0' if flag == '--latency-us' else '> 0'}, got {value}")
    if intra_gbps is None and inter_gbps is None and latency_us is None:
        return net
    latency = net.latency_s if latency_us is None else latency_us * 1e-6
    return Network(
        "custom" if calibration is None else f"{net.name} (overridden)",
        intra_gbps=net.intra_gbps if intra_gbps is None else intra_gbps,
        inter_gbps=net.inter_gbps if inter_gbps is None else inter_gbps,
        latency_s=latency,
        inter_latency_s=net.inter_latency_s if latency_us is None else latency,
    )


def describe_network(net: Network) -> str:
    """One line for ``memtrain scale``: the network's bandwidths, then its latencies."""
    lat = f"{net.latency_s * 1e6:.3g} us"
    if net.inter_latency != net.latency_s:
        lat = f"{net.latency_s * 1e6:.3g} us in a node, {net.inter_latency * 1e6:.3g} us across nodes"
    gbps = f"{net.intra_gbps:.4g} GB/s per GPU in a node, {net.inter_gbps:.4g} GB/s per node"
    return f"network {net.name}: {gbps}; latency {lat}"
