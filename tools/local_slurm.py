#!/usr/bin/env python
"""A Slurm cluster on localhost, for tests and for trying `memtrain submit` without a cluster.

    python tools/local_slurm.py start DIR [--nodes N]    # prints `export SLURM_CONF=DIR/slurm.conf`
    python tools/local_slurm.py stop DIR

Everything (munge key and socket, slurm.conf, state, spool, logs, PID files) lives under DIR; daemons are
stopped only through their PID files. Needs Debian's `slurmctld slurmd slurm-client munge` packages
(`install_hint()` says how) and root. The cluster has two partitions, `debug` (default) and `preempt`, and
by default one node, `localhost`, with this machine's CPUs.

With ``--nodes N`` (N > 1) it has N nodes, `node0` ... `node<N-1>`, each with this machine's CPUs: one slurmd
per node (`slurmd -N nodeK`, its own `Port`, spool, log and PID file: Debian's Slurm 22.05 runs several on one
host), each started in a mount and UTS namespace of its own (`unshare`), so that every job step on `nodeK`
sees the hostname `nodeK`, an empty `/dev/shm` of that node alone, an `/etc/hosts` in which `nodeK` is
`127.0.0.<K+1>`, and (through a TaskProlog) `TMPDIR=DIR/nodes/nodeK/tmp`, as on separate machines sharing a
file system.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def install_hint() -> str:
    return "apt-get update && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _node_line() -> str:
    out = subprocess.run([_bin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
    mem = max(int(int(fields.get("RealMemory", "2048")) * 0.9), 1024)
    return (
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={fields.get('CPUs', '2')} "
        f"Boards={fields.get('Boards', '1')} SocketsPerBoard={fields.get('SocketsPerBoard', '1')} "
        f"CoresPerSocket={fields.get('CoresPerSocket', '2')} ThreadsPerCore={fields.get('ThreadsPerCore', '1')} "
        f"RealMemory={mem} State=UNKNOWN"
    )


def node_names(nodes: int) -> list[str]:
    return ["localhost"] if nodes == 1 else [f"node{k}" for k in range(nodes)]


def _nodes_lines(root: Path, nodes: int, d_port: int) -> list[str]:
    """Per-node settings, node lines and partitions (``nodes`` > 1: one slurmd per node, ports from ``d_port``)."""
    if nodes == 1:
        return [
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmdPidFile={root}/run/slurmd.pid",
            f"SlurmdLogFile={root}/log/slurmd.log",
            _node_line(),
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "PartitionName=preempt Nodes=localhost MaxTime=INFINITE State=UP",
        ]
    hw = _node_line().split(" ", 2)[2]  # CPUs=... RealMemory=... State=UNKNOWN
    names = node_names(nodes)
    prolog = root / "task_prolog.sh"
    prolog.write_text(f'#!/bin/sh\necho "export TMPDIR={root}/nodes/$SLURMD_NODENAME/tmp"\n')
    prolog.chmod(0o755)
    return [
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        f"TaskProlog={prolog}",
        *(f"NodeName={n} NodeAddr=127.0.0.{k + 1} Port={d_port + k} {hw}" for k, n in enumerate(names)),
        f"PartitionName=debug Nodes=node[0-{nodes - 1}] Default=YES MaxTime=INFINITE State=UP",
        f"PartitionName=preempt Nodes=node[0-{nodes - 1}] MaxTime=INFINITE State=UP",
    ]


def write_conf(root: Path, ctld_port: int, d_port: int, nodes: int = 1) -> Path:
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o755)
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=memtrain-local",
                "SlurmctldHost=localhost",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={ctld_port}",
                f"SlurmdPort={d_port}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={root}/munge/munge.socket,cred_expire=5",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SchedulerParameters=bf_interval=1,sched_interval=1",
                "ReturnToService=2",
                "MailProg=/bin/true",
                "KillWait=10",
                "MinJobAge=300",
                f"StateSaveLocation={root}/state",
                f"SlurmctldPidFile={root}/run/slurmctld.pid",
                f"SlurmctldLogFile={root}/log/slurmctld.log",
                *_nodes_lines(root, nodes, d_port),
                "",
            ]
        )
    )
    return conf


def _node_namespace(root: Path, name: str, names: list[str]) -> list[str]:
    """The command prefix that runs a node's slurmd in its own mount + UTS namespaces (hostname ``name``, a
    fresh ``/dev/shm``, an ``/etc/hosts`` naming every node)."""
    if shutil.which("unshare") is None:
        raise RuntimeError("a cluster of several nodes on one machine needs unshare (util-linux)")
    where = root / "nodes" / name
    (where / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(where / "tmp", 0o1777)
    hosts = "".join(f"127.0.0.{k + 1} {n}\n" for k, n in enumerate(names)) + "127.0.0.1 localhost\n"
    try:
        hosts += Path("/etc/hosts").read_text()
    except OSError:
        pass
    (where / "hosts").write_text(hosts)
    setup = (
        'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && mount --bind "$1" /etc/hosts && hostname "$2" && '
        'shift 2 && exec "$@"'
    )
    return [
        "unshare",
        "--mount",
        "--uts",
        "--propagation",
        "private",
        "sh",
        "-c",
        setup,
        "sh",
        str(where / "hosts"),
        name,
    ]


def start(root: str | Path, ctld_port: int = 16817, d_port: int = 16818, timeout: float = 30.0, nodes: int = 1) -> dict:
    """Start munged, slurmctld and one slurmd per node under ``root``; returns the environment clients need."""
    root = Path(root).resolve()
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"Slurm/munge binaries missing ({', '.join(missing)}); install with: {install_hint()}")
    stop(root)
    conf = write_conf(root, ctld_port, d_port, nodes)
    key = root / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    subprocess.run(
        [
            _bin("munged"),
            f"--socket={root}/munge/munge.socket",
            f"--key-file={key}",
            f"--pid-file={root}/run/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/munged.seed",
            "--force",
        ],
        check=True,
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    subprocess.run([_bin("slurmctld"), "-i"], env=env, check=True)
    names = node_names(nodes)
    for name in names:
        if nodes == 1:
            subprocess.run([_bin("slurmd"), "-N", name], env=env, check=True)
            continue
        (root / "spool" / name).mkdir(parents=True, exist_ok=True)
        subprocess.run([*_node_namespace(root, name, names), _bin("slurmd"), "-N", name], env=env, check=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([_bin("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        if (
            out.returncode == 0
            and out.stdout.strip()
            and all(s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.split())
        ):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.3)
    raise RuntimeError(f"local Slurm did not come up within {timeout:.0f} s; see {root}/log/")


def stop(root: str | Path) -> None:
    """Stop the daemons started by :func:`start` (by their PID files only)."""
    root = Path(root).resolve()
    slurmds = sorted(p.name[:-4] for p in (root / "run").glob("slurmd-*.pid")) if (root / "run").is_dir() else []
    for name in ("slurmd", *slurmds, "slurmctld", "munged"):
        pidfile = root / "run" / f"{name}.pid"
        if not pidfile.exists():
            continue
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        pidfile.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    nodes = 1
    if len(argv) == 4 and argv[0] == "start" and argv[2] == "--nodes" and argv[3].isdigit() and int(argv[3]) >= 1:
        nodes, argv = int(argv[3]), argv[:2]
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__)
        return 2
    if argv[0] == "start":
        env = start(argv[1], nodes=nodes)
        print(f"export SLURM_CONF={env['SLURM_CONF']}")
    else:
        stop(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
