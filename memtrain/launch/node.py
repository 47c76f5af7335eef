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

In a step over several nodes the first task of each node also keeps a watch on the other nodes
(:class:`NodeWatch`): the head node's wrapper listens on a TCP port, the other nodes' wrappers connect to it and
both sides exchange a line every few seconds. A node whose wrapper vanishes (its connection closes without a
goodbye, or it stays silent for :data:`SILENT_S` seconds: the machine died or froze) is named in the log of
every node that is left, e.g. ``memtrain: node 0 (gpu017): lost node 1 (gpu018): ...``; its ranks' peers fail
at their next collective anyway (at once when the connection resets, else within ``dist.timeout_s``), and
this line says which node it was. The port is ``MEMTRAIN_NODE_WATCH_PORT``, else ``MASTER_PORT`` + 20000 (or
- 20000 above 45535); ``MEMTRAIN_NODE_WATCH=0`` turns the watch off. A watch that cannot start only says so.

The exit status is ``COMMAND``'s (128 + N when it ended by signal N). Linux only (``/proc``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from memtrain.launch.env import node_label

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


#: seconds between two lines a node watch sends; a peer silent for SILENT_S seconds counts as lost
PING_S = 1.0
SILENT_S = 10.0
#: how long a node keeps trying to reach the head node's watch
CONNECT_S = 120.0


def _say(text: str) -> None:
    print(f"memtrain: {text}", file=sys.stderr, flush=True)


def watch_port(environ: Mapping[str, str] | None = None) -> int | None:
    """The node watch's TCP port, or None when it is off or the rendezvous port is unknown."""
    env = os.environ if environ is None else environ
    if env.get("MEMTRAIN_NODE_WATCH", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if env.get("MEMTRAIN_NODE_WATCH_PORT"):
        return int(env["MEMTRAIN_NODE_WATCH_PORT"])
    if not env.get("MASTER_PORT", "").isdigit():
        return None
    port = int(env["MASTER_PORT"])
    return port + 20000 if port + 20000 <= 65535 else port - 20000


class _Peer:
    """One connection of a node watch: the line reader, the other end's node and when it last spoke."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.node: str | None = None
        self.label = "a node"
        self.seen = time.monotonic()
        self.said_bye = False
        self._buf = b""
        self._send_lock = threading.Lock()

    def send(self, line: str) -> bool:
        try:
            with self._send_lock:
                self.sock.sendall(line.encode() + b"\n")
            return True
        except OSError:
            return False

    def lines(self):
        """Lines from the other end until it closes (or the connection breaks)."""
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.seen = time.monotonic()
            self._buf += data
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                yield line.decode(errors="replace")


class NodeWatch:
    """Each node of a multi-node step watches the others through the head node (see the module's text).

    ``lost`` collects the labels of the nodes found lost; :meth:`close` says goodbye (an orderly end is never
    reported as a loss)."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.node = env.get("SLURM_NODEID", "0")
        self.me = node_label(env)
        self.nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1")
        self.head = env.get("MASTER_ADDR", "")
        self.port = watch_port(env)
        self.lost: list[str] = []
        self.peers: list[_Peer] = []
        self._lock = threading.Lock()
        self._closing = False
        self._server: socket.socket | None = None

    @property
    def active(self) -> bool:
        return self.nodes > 1 and self.port is not None and bool(self.head)

    def start(self) -> bool:
        if not self.active:
            return False
        target = self._serve if self.node == "0" else self._join
        threading.Thread(target=target, name="memtrain-node-watch", daemon=True).start()
        threading.Thread(target=self._pinger, name="memtrain-node-ping", daemon=True).start()
        return True

    # the head node: every other node connects here
    def _serve(self) -> None:
        try:
            if socket.has_dualstack_ipv6():
                server = socket.create_server(("", self.port or 0), family=socket.AF_INET6, dualstack_ipv6=True)
            else:
                server = socket.create_server(("", self.port or 0))
        except OSError as exc:
            _say(f"{self.me}: node watch off (cannot listen on port {self.port}: {exc.strerror or exc})")
            return
        self._server = server
        while not self._closing:
            try:
                sock, _ = server.accept()
            except OSError:
                return
            peer = _Peer(sock)
            peer.send(f"hello {self.node} {self.me}")
            with self._lock:
                self.peers.append(peer)
            threading.Thread(target=self._listen, args=(peer,), daemon=True).start()

    # any other node: one connection to the head node
    def _join(self) -> None:
        deadline = time.monotonic() + CONNECT_S
        while not self._closing:
            try:
                sock = socket.create_connection((self.head, self.port or 0), timeout=5)
                sock.settimeout(None)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    _say(f"{self.me}: node watch off (the head node {self.head}:{self.port} is not answering: {exc})")
                    return
                time.sleep(1.0)
        else:
            return
        peer = _Peer(sock)
        peer.label = f"node 0 ({self.head})"
        peer.send(f"hello {self.node} {self.me}")
        with self._lock:
            self.peers.append(peer)
        self._listen(peer)

    def _listen(self, peer: _Peer) -> None:
        for line in peer.lines():
            word, _, rest = line.partition(" ")
            if word == "hello":
                peer.node, _, label = rest.partition(" ")
                peer.label = label or f"node {peer.node}"
            elif word == "bye":
                peer.said_bye = True
            elif word == "lost" and rest:  # the head node passes on a loss it saw
                self._report(rest, "reported by the head node", relay=False)
        if not peer.said_bye and not self._closing:
            self._report(peer.label, "its connection closed without a goodbye")
        with self._lock:
            if peer in self.peers:
                self.peers.remove(peer)

    def _pinger(self) -> None:
        while not self._closing:
            time.sleep(PING_S)
            now = time.monotonic()
            with self._lock:
                peers = list(self.peers)
            for peer in peers:
                peer.send("ping")
                if now - peer.seen > SILENT_S and not peer.said_bye and not self._closing:
                    peer.said_bye = True  # reported once; the connection is given up
                    self._report(peer.label, f"silent for {now - peer.seen:.0f} s")
                    try:
                        peer.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def _report(self, label: str, why: str, relay: bool = True) -> None:
        with self._lock:
            if label in self.lost or self._closing:
                return
            self.lost.append(label)
            peers = list(self.peers)
        _say(
            f"{self.me}: lost {label} at {time.strftime('%H:%M:%S')} ({why}); the ranks here fail at their "
            "next collective, within dist.timeout_s"
        )
        if relay and self.node == "0":
            for peer in peers:
                if peer.label != label:
                    peer.send(f"lost {label}")

    def close(self, rc: int) -> None:
        """Goodbye to every peer (this node ended in order, whatever ``rc``), then stop watching."""
        with self._lock:
            self._closing = True
            peers = list(self.peers)
        for peer in peers:
            peer.send(f"bye {rc}")
        if self.node == "0" and peers:
            time.sleep(0.2)  # let the goodbyes leave before the connections close
        for peer in peers:
            try:
                peer.sock.close()
            except OSError:
                pass
        if self._server is not None:
            self._server.close()


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
    watch = NodeWatch()
    if os.environ.get("SLURM_LOCALID", "0") == "0":
        watch.start()

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
    status = rc if rc >= 0 else 128 - rc
    if status and watch.lost:
        _say(f"{watch.me}: exit code {status} after losing {', '.join(watch.lost)}")
    watch.close(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
