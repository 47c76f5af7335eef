"""``python -m memtrain.launch.node [--] COMMAND...``: what each Slurm task of a training job runs.

It starts ``COMMAND`` (a rank, ``torchrun`` or the DeepSpeed launcher) with ``SIGUSR1`` ignored, and forwards
every ``SIGUSR1`` it receives (Slurm's ``--signal=USR1@T`` or ``scancel --signal=USR1``) to the processes below
``COMMAND`` (itself included) that catch USR1: the ``memtrain train`` ranks, which install their preemption handler at the very
start. So:

* the launchers never act on the preemption signal. torchrun's agent turns SIGTERM into "signal the workers,
  SIGKILL them 30 s later" and the DeepSpeed launcher terminates its whole process tree; neither handles USR1,
  and an ignored USR1 is inherited through ``exec``, so they keep running while the ranks checkpoint, and the
  ranks get all of ``slurm.signal_seconds``;
* a signal that arrives while a rank is still starting (interpreter start, imports) is not fatal: the rank
  inherits the ignored disposition until it installs its handler, and the request is forwarded to it as soon
  as it has one (this process keeps looking until ``COMMAND`` ends). The rank then stops at its first
  possible point with exit code 75.

Loader worker processes ignore USR1 and are skipped; a process is signalled once. ``SIGTERM``/``SIGINT`` are
passed on to ``COMMAND`` itself. An argument that is exactly ``@SLURM_NODEID@`` is replaced by this task's
node index (the DeepSpeed launcher's ``--node_rank``), so the batch script never builds a shell string.

The exit status is ``COMMAND``'s (128 + N when it ended by signal N). Linux only (``/proc``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

USR1_BIT = 1 << (signal.SIGUSR1 - 1)
NODE_ID_ARG = "@SLURM_NODEID@"


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: only the command itself is reached
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # the command name may contain spaces or ')'
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    children = _children_map()
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def catches_usr1(pid: int) -> bool:
    """The process has a handler for SIGUSR1 (``SigCgt`` in ``/proc/PID/status``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & USR1_BIT)
    except (OSError, ValueError):
        pass
    return False


class Forwarder:
    def __init__(self, root: int):
        self.root = root
        self.pending = False
        self.signalled: set[int] = set()

    def forward(self) -> None:
        """USR1 to ``root`` and every process below it that catches it and has not had it yet."""
        if not self.pending:
            return
        for pid in [self.root, *descendants(self.root)]:
            if pid not in self.signalled and catches_usr1(pid):
                try:
                    os.kill(pid, signal.SIGUSR1)
                    self.signalled.add(pid)
                except ProcessLookupError:
                    pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("usage: python -m memtrain.launch.node [--] COMMAND...", file=sys.stderr)
        return 2
    node_id = os.environ.get("SLURM_NODEID", "0")
    args = [node_id if a == NODE_ID_ARG else a for a in args]
    received = {"usr1": False}
    # until the command is started, only remember a request
    signal.signal(signal.SIGUSR1, lambda *_: received.__setitem__("usr1", True))

    def ignore_usr1() -> None:  # in the child, before exec: the launcher (and its ranks) start ignoring it
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    try:
        proc = subprocess.Popen(args, preexec_fn=ignore_usr1)
    except OSError as exc:
        print(f"memtrain: cannot start {args[0]}: {exc}", file=sys.stderr)
        return 127
    fwd = Forwarder(proc.pid)

    def on_usr1(signum, frame) -> None:
        if not fwd.pending:
            print(
                f"memtrain: node {node_id}: SIGUSR1 received; forwarding it to the training ranks",
                file=sys.stderr,
                flush=True,
            )
        fwd.pending = True

    def on_stop(signum, frame) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if received["usr1"]:
        on_usr1(signal.SIGUSR1, None)
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            fwd.forward()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
