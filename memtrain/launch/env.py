"""Turning a Slurm task's environment into torch.distributed's.

Under ``srun`` each rank is a Slurm task: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` become
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, and the tasks on this node ``LOCAL_WORLD_SIZE``. ``MASTER_ADDR``/``MASTER_PORT`` come from the batch script (the first
node of the allocation and a port derived from the job id) or are derived here the same way. Variables that
are already set (torchrun, the deepspeed launcher) are left alone.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping


def node_label(environ: Mapping[str, str] | None = None) -> str:
    """This task's node as the logs name it: ``node 1 (gpu018)``: Slurm's node index within the job
    (``SLURM_NODEID``) and the node's name (``SLURMD_NODENAME``, else the hostname)."""
    env = os.environ if environ is None else environ
    name = env.get("SLURMD_NODENAME") or socket.gethostname()
    return f"node {env.get('SLURM_NODEID', '0')} ({name})"


def adopt_slurm_env(environ: dict | None = None) -> bool:
    """Set the torch.distributed variables from Slurm's when running as a multi-task srun step.

    Returns True when it set them. Does nothing outside a job step or when ``RANK`` is already set."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return False
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if ntasks < 2:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    # ranks on this node (mosaicml-streaming elects one leader per node from it): "2" or "2(x3)"
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(ntasks)
    leading = re.match(r"\d+", per_node)
    env["LOCAL_WORLD_SIZE"] = str(int(leading.group()) if leading else 1)
    env["NODE_RANK"] = env.get("SLURM_NODEID", "0")
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        try:
            first = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodes.split(",")[0]
        env["MASTER_ADDR"] = first
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return True
