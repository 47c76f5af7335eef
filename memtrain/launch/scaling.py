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
NVLink bandwidth and the inter-node part over each node's network bandwidth. A pipeline of ``p`` stages
adds the bubble ``(p - 1) / m`` of ``m`` micro-batches and divides the model (and its collective volume)
among the stages. ``overlap`` is the fraction of the communication hidden behind backward compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memtrain.tables import markdown_table


@dataclass(frozen=True)
class Network:
    name: str
    #: per-GPU NVLink bus bandwidth inside a node, GB/s
    intra_gbps: float
    #: network bandwidth per node, GB/s (e.g. 8 x 400 Gb/s InfiniBand = 400 GB/s)
    inter_gbps: float
    #: per-collective latency, seconds
    latency_s: float = 20e-6


NETWORKS = {
    "h100-nvlink-ib8x400": Network("h100-nvlink-ib8x400", intra_gbps=370.0, inter_gbps=400.0),
    "a100-nvlink-ib4x200": Network("a100-nvlink-ib4x200", intra_gbps=230.0, inter_gbps=100.0),
    "ethernet-100g": Network("ethernet-100g", intra_gbps=230.0, inter_gbps=12.5, latency_s=50e-6),
}


def collective_factor(zero_stage: int) -> float:
    """Multiples of (n-1)/n Ψb each rank moves per step."""
    return 3.0 if zero_stage == 3 else 2.0


def comm_time(
    n_params: float, bytes_per_param: float, zero_stage: int, nodes: int, gpus_per_node: int, net: Network
) -> float:
    """Seconds of communication per step for the data-parallel collectives."""
    volume = n_params * bytes_per_param * collective_factor(zero_stage) / 2.0  # per all-reduce-equivalent
    t = 0.0
    if gpus_per_node > 1:
        t += 2 * (gpus_per_node - 1) / gpus_per_node * volume / (net.intra_gbps * 1e9) + net.latency_s
    if nodes > 1:
        t += 2 * (nodes - 1) / nodes * volume / (net.inter_gbps * 1e9) + net.latency_s
    return t


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
