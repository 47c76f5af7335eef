#!/usr/bin/env python
"""A Slurm job on several "nodes" of this one machine: rendered batch scripts run for real, no cluster needed.

    python tools/fake_nodes.py run JOB.sbatch [--nodes 2] [--state DIR] [--usr1 | --kill-node K]

runs the job (requeues included) and prints its logs; ``--usr1`` sends USR1 to every task once the run has
logged a step (a preemption), ``--kill-node K`` SIGKILLs every process of node K at that moment.

Each simulated node is a mount and UTS namespace (``unshare``) with its own hostname (``node0``, ``node1``,
...), its own ``/dev/shm`` (a fresh tmpfs, as on separate machines: mosaicml-streaming elects one
shared-memory leader per node and names its segments by scanning ``/dev/shm``), its own ``TMPDIR`` and an
``/etc/hosts`` in which node ``k`` is ``127.0.0.{k+1}`` (every ``127/8`` address reaches the loopback
interface, so the nodes talk over TCP as separate hosts would). The file system is shared, as on a cluster.
As root the namespaces are plain ones; otherwise an unprivileged user namespace is used where the kernel
allows it (:func:`isolation`).

The batch script runs under bash with the job's environment (``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST`` as
``node[0-1]``, ``SLURM_NNODES``, ``SLURM_RESTART_COUNT``, ...) and fake ``srun`` and ``scontrol`` first on
``PATH``:

* ``srun`` starts one agent per node inside that node's namespaces (the agent plays slurmstepd: it starts
  the node's tasks, each in a session of its own, with ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``,
  ``SLURM_STEP_*``, ``SLURMD_NODENAME``; passes signals on to them; ends them with TERM then KILL when the
  step is cancelled, and reaps whatever they leave behind). ``--output`` patterns (``%x %j %n %t %N %s``),
  ``--ntasks-per-node`` and ``--kill-on-bad-exit`` behave as in Slurm. A node whose agent vanishes (the node
  died) is not reported by ``srun``: like a real step it waits for the tasks it can still see;
* ``scontrol show hostnames`` expands node lists; ``scontrol requeue JOB`` is recorded, and
  :meth:`Job.run` then starts the batch script again with ``SLURM_RESTART_COUNT`` one higher.

:meth:`Job.signal_tasks` delivers a signal the way ``#SBATCH --signal`` or ``scancel --signal`` does (to every
task of the running step, on every node); :meth:`Job.kill_node` SIGKILLs every process of one node.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from memtrain.launch.node import descendants

HERE = Path(__file__).resolve()
#: seconds between the TERM and the KILL that end a cancelled step's tasks (Slurm's KillWait)
KILL_WAIT = 5.0
_PR_SET_CHILD_SUBREAPER = 36


# ----------------------------------------------------------------------------------------------------
# node lists


def expand_nodelist(text: str) -> list[str]:
    """``node[0-1],login3`` -> ``["node0", "node1", "login3"]`` (what ``scontrol show hostnames`` prints)."""
    out: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?", text):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            out.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{prefix}{i:0{width}d}")
    return out


def compress_nodelist(names: list[str]) -> str:
    """``["node0", "node1"]`` -> ``node[0-1]`` (names of the form ``node<k>`` with consecutive k only)."""
    if len(names) > 1 and all(n == f"node{i}" for i, n in enumerate(names)):
        return f"node[0-{len(names) - 1}]"
    return ",".join(names)


def tasks_per_node_text(per_node: int, nodes: int) -> str:
    """Slurm's ``SLURM_TASKS_PER_NODE`` form: ``2`` on one node, ``2(x3)`` on three."""
    return str(per_node) if nodes == 1 else f"{per_node}(x{nodes})"


# ----------------------------------------------------------------------------------------------------
# isolation


def _unshare_prefix(user_ns: bool) -> list[str]:
    argv = [shutil.which("unshare") or "unshare"]
    if user_ns:
        argv += ["--user", "--map-root-user"]
    return argv + ["--mount", "--uts", "--propagation", "private"]


def isolation() -> tuple[list[str] | None, str]:
    """The command prefix that starts a process in a node's own mount + UTS namespaces, and what was found.

    As root (with CAP_SYS_ADMIN) plain namespaces; otherwise an unprivileged user namespace mapped to root.
    ``(None, reason)`` when neither works (no ``unshare``, a container whose seccomp profile forbids it,
    ``kernel.unprivileged_userns_clone=0``): then nodes cannot have their own ``/dev/shm`` or hostname."""
    if shutil.which("unshare") is None:
        return None, "unshare (util-linux) is not installed"
    probe = "mount -t tmpfs none /dev/shm && hostname fake-node-probe"
    errors = []
    for user_ns in [False, True] if os.geteuid() == 0 else [True]:
        argv = _unshare_prefix(user_ns) + ["sh", "-c", probe]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
            continue
        if done.returncode == 0:
            return _unshare_prefix(user_ns), "user namespace" if user_ns else "namespaces as root"
        said = (done.stderr or done.stdout).strip().splitlines()
        errors.append(said[-1] if said else f"exit code {done.returncode}")
    return None, "unshare cannot make a mount namespace here: " + "; ".join(e for e in errors if e)


# ----------------------------------------------------------------------------------------------------
# processes


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return signal.Signals(-rc).name.removeprefix("SIG").capitalize() if -rc != 9 else "Killed"
        except ValueError:
            return f"signal {-rc}"
    return f"Exited with exit code {rc}"


# ----------------------------------------------------------------------------------------------------
# the node agent (slurmstepd's part): runs inside the node's namespaces


def _setup_node(spec: dict) -> None:
    """Inside the fresh namespaces: this node's hostname, /etc/hosts and an empty /dev/shm."""
    if not spec.get("isolated"):
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm"], check=True)
    subprocess.run(["mount", "--bind", spec["hosts"], "/etc/hosts"], check=True)
    socket.sethostname(spec["name"])


def node_agent(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    step_dir = Path(spec["step_dir"])
    node = spec["node"]
    results = step_dir / f"node{node}.results"
    try:
        _setup_node(spec)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"fake srun: node {spec['name']}: cannot set up the node: {exc}", file=sys.stderr, flush=True)
        return 1
    try:  # orphans of the tasks (torchrun's workers, loader workers) come back to this process
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    tasks: dict[int, subprocess.Popen] = {}
    for task in spec["tasks"]:
        out = open(task["output"], "a") if task["output"] else None
        try:
            tasks[task["taskid"]] = subprocess.Popen(
                spec["argv"],
                env=task["env"],
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
            )
        except OSError as exc:
            print(f"fake srun: {spec['name']}: cannot start {spec['argv'][0]}: {exc}", file=sys.stderr, flush=True)
            with open(results, "a") as f:
                f.write(f"{task['taskid']} 2\n")
        finally:
            if out:
                out.close()
    (step_dir / f"node{node}.tasks").write_text("".join(f"{t} {p.pid}\n" for t, p in tasks.items()))
    cancel = {"at": None}

    def forward(signum, frame) -> None:
        for p in tasks.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass

    def on_cancel(signum, frame) -> None:
        if cancel["at"] is None:
            cancel["at"] = time.monotonic()
            forward(signal.SIGCONT, None)
            _kill([p for t in tasks.values() for p in [t.pid, *descendants(t.pid)]], signal.SIGTERM)

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, forward)
    signal.signal(signal.SIGTERM, on_cancel)
    live = dict(tasks)
    while live:
        for t, p in list(live.items()):
            rc = p.poll()
            if rc is not None:
                del live[t]
                with open(results, "a") as f:
                    f.write(f"{t} {rc}\n")
        if cancel["at"] is not None and time.monotonic() - cancel["at"] > spec["kill_wait"]:
            _kill(descendants(os.getpid()), signal.SIGKILL)
        try:  # reap orphans handed to this subreaper (and keep a task's status if it is one of them)
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                for p in live.values():
                    if p.pid == pid:
                        p.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    # the step is over: like slurmstepd, end whatever the tasks left running
    _kill(descendants(os.getpid()), signal.SIGKILL)
    return 0


# ----------------------------------------------------------------------------------------------------
# fake srun and scontrol (run by the batch script)


def _parse_srun(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if "=" in arg:
            name, value = arg.lstrip("-").split("=", 1)
        elif arg in ("--kill-on-bad-exit", "-K"):
            name, value = "kill-on-bad-exit", "1"
        elif arg in ("-N", "--nodes", "-n", "--ntasks", "-o", "--output", "--ntasks-per-node"):
            name, value = {"-N": "nodes", "-n": "ntasks", "-o": "output"}.get(arg, arg.lstrip("-")), argv[i]
            i += 1
        else:
            raise SystemExit(f"fake srun: option {arg} is not supported")
        opts[name] = value
    return opts, argv[i:]


def _output_name(pattern: str, env: dict, node: int, name: str, task: int, step: int) -> str:
    subs = {
        "x": env.get("SLURM_JOB_NAME", "job"),
        "j": env.get("SLURM_JOB_ID", "0"),
        "n": str(node),
        "t": str(task),
        "N": name,
        "s": str(step),
        "%": "%",
    }
    return re.sub(r"%([xjntNs%])", lambda m: subs[m.group(1)], pattern)


def fake_srun(argv: list[str]) -> int:
    opts, command = _parse_srun(argv)
    if not command:
        print("fake srun: no command", file=sys.stderr)
        return 2
    env = dict(os.environ)
    state = Path(env["FAKE_NODES_STATE"])
    cluster = json.loads((state / "cluster.json").read_text())
    names = expand_nodelist(env["SLURM_JOB_NODELIST"])
    per_node = int(opts.get("ntasks-per-node") or env.get("SLURM_NTASKS_PER_NODE") or 1)
    ntasks = per_node * len(names)
    attempt_dir = Path(env["FAKE_NODES_ATTEMPT"])
    step = len(list(attempt_dir.glob("step*")))
    step_dir = attempt_dir / f"step{step}"
    step_dir.mkdir()
    kill_on_bad_exit = opts.get("kill-on-bad-exit", "0") not in ("0", "")
    agents: dict[int, subprocess.Popen] = {}
    for k, name in enumerate(names):
        node_env = dict(
            env,
            SLURM_STEP_ID=str(step),
            SLURM_STEPID=str(step),
            SLURM_STEP_NODELIST=env["SLURM_JOB_NODELIST"],
            SLURM_STEP_NUM_NODES=str(len(names)),
            SLURM_STEP_NUM_TASKS=str(ntasks),
            SLURM_STEP_TASKS_PER_NODE=tasks_per_node_text(per_node, len(names)),
            SLURM_NTASKS=str(ntasks),
            SLURM_NPROCS=str(ntasks),
            SLURM_TASKS_PER_NODE=tasks_per_node_text(per_node, len(names)),
            SLURM_NODEID=str(k),
            SLURMD_NODENAME=name,
            SLURM_TOPOLOGY_ADDR=name,
            SLURM_GTIDS=",".join(str(k * per_node + i) for i in range(per_node)),
            TMPDIR=str(state / name / "tmp"),
        )
        tasks = []
        for i in range(per_node):
            t = k * per_node + i
            out = _output_name(opts["output"], env, k, name, t, step) if "output" in opts else None
            tasks.append({"taskid": t, "output": out, "env": dict(node_env, SLURM_PROCID=str(t), SLURM_LOCALID=str(i))})
        spec = {
            "node": k,
            "name": name,
            "hosts": str(state / name / "hosts"),
            "isolated": cluster["prefix"] is not None,
            "step_dir": str(step_dir),
            "argv": command,
            "kill_wait": cluster["kill_wait"],
            "tasks": tasks,
        }
        spec_path = step_dir / f"node{k}.json"
        spec_path.write_text(json.dumps(spec))
        agent = [sys.executable, str(HERE), "node-agent", str(spec_path)]
        agents[k] = subprocess.Popen((cluster["prefix"] or []) + agent)
        (step_dir / f"node{k}.pid").write_text(str(agents[k].pid))

    def cancel(signum=None, frame=None) -> None:
        for p in agents.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    seen: dict[int, int] = {}
    cancelled = False
    while True:
        for k in agents:
            f = step_dir / f"node{k}.results"
            if not f.exists():
                continue
            for line in f.read_text().splitlines():
                t, rc = (int(x) for x in line.split())
                if t in seen:
                    continue
                seen[t] = rc
                if rc != 0:
                    print(f"srun: error: {names[k]}: task {t}: {_exit_text(rc)}", file=sys.stderr, flush=True)
                    if kill_on_bad_exit and not cancelled:
                        print(f"srun: Terminating StepId={env['SLURM_JOB_ID']}.{step}", file=sys.stderr, flush=True)
                        cancelled = True
                        cancel()
        if all(p.poll() is not None for p in agents.values()):
            break
        time.sleep(0.1)
    codes = [rc if rc >= 0 else 128 - rc for rc in seen.values()]
    return max(codes, default=0) if len(seen) == ntasks else max([*codes, 1])


def fake_scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        names = expand_nodelist(argv[2] if len(argv) > 2 else os.environ["SLURM_JOB_NODELIST"])
        try:
            print("\n".join(names), flush=True)
        except BrokenPipeError:  # `| head -n 1`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if argv[:1] == ["requeue"] and len(argv) == 2:
        with open(Path(os.environ["FAKE_NODES_STATE"]) / "requeue.log", "a") as f:
            f.write(f"{argv[1]} {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        return 0
    print(f"fake scontrol: {' '.join(argv)} is not supported", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------------------
# the cluster and its jobs (used by the tests and by `run`)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch_options(script: str) -> dict[str, str]:
    """The ``#SBATCH --name=value`` lines of a batch script."""
    return dict(m.groups() for m in re.finditer(r"(?m)^#SBATCH --([a-z-]+)(?:=(.*))?$", script))


class FakeNodes:
    """``nodes`` simulated nodes under ``root`` (state, per-node hosts file and TMPDIR, the fake tools).

    ``isolate``: None = the nodes' own namespaces when this machine allows them (see :func:`isolation`), else
    shared ``/dev/shm`` and hostname (node names ``localhost``, then this machine's resolvable hostname);
    True = namespaces or :class:`RuntimeError`; False = no namespaces (to look at what sharing does)."""

    def __init__(self, root: Path, nodes: int = 2, isolate: bool | None = None, kill_wait: float = KILL_WAIT):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        prefix, how = isolation() if isolate is not False else (None, "not asked for")
        if isolate and prefix is None:
            raise RuntimeError(f"simulated nodes need their own namespaces: {how}")
        self.prefix, self.how = prefix, how
        self.isolated = prefix is not None
        if self.isolated:
            self.names = [f"node{k}" for k in range(nodes)]
            self.addresses = [f"127.0.0.{k + 1}" for k in range(nodes)]
        else:
            self.names = _shared_names(nodes)
            self.addresses = ["127.0.0.1"] * nodes
        self.bin = self.root / "bin"
        self.bin.mkdir(exist_ok=True)
        for tool in ("srun", "scontrol"):
            stub = self.bin / tool
            stub.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(HERE))} {tool} "$@"\n')
            stub.chmod(0o755)
        # the nodes' names first: a reverse lookup of a node's address gives its name
        hosts = "".join(f"{a} {n}\n" for a, n in zip(self.addresses, self.names)) + "127.0.0.1 localhost\n"
        try:  # keep this machine's own names resolvable on every node
            hosts += "".join(ln + "\n" for ln in Path("/etc/hosts").read_text().splitlines() if ln.strip())
        except OSError:
            pass
        for name in self.names:
            (self.root / name / "tmp").mkdir(parents=True, exist_ok=True)
            (self.root / name / "hosts").write_text(hosts)
        (self.root / "cluster.json").write_text(json.dumps({"prefix": prefix, "kill_wait": kill_wait}))
        self._jobs = 0
        self.jobs: list[Job] = []

    @property
    def nodelist(self) -> str:
        return compress_nodelist(self.names)

    def job(self, script: Path, job_id: int | None = None, env: dict | None = None) -> Job:
        """A batch job of the rendered ``script`` (its ``#SBATCH`` lines give the name, tasks and log)."""
        self._jobs += 1
        job = Job(self, Path(script).read_text(), job_id or self._next_id(), env or {})
        job.script = Path(script)
        self.jobs.append(job)
        return job

    def _next_id(self) -> int:
        return 4200 + self._jobs + os.getpid() % 1000

    def step(
        self, command: list[str], tasks_per_node: int = 1, env: dict | None = None, timeout: float = 120
    ) -> tuple[Job, subprocess.CompletedProcess]:
        """``srun --kill-on-bad-exit=1 COMMAND`` as the only step of a job (no batch script): returns the job
        (its logs are ``<job dir>/task<N>.out``) and srun's outcome."""
        self._jobs += 1
        n = len(self.names)
        opts = f"#SBATCH --nodes={n}\n#SBATCH --ntasks-per-node={tasks_per_node}\n#SBATCH --job-name=step\n"
        job = Job(self, opts, self._next_id(), env or {})
        self.jobs.append(job)
        job.attempts.append(Attempt(0))
        srun = [str(self.bin / "srun"), "--kill-on-bad-exit=1", f"--output={job.dir}/task%t.out", *command]
        try:
            done = subprocess.run(srun, env=job.env(0), capture_output=True, text=True, timeout=timeout)
        finally:
            job.cancel()  # nothing of the step outlives it (a no-op when it ended)
        return job, done

    def close(self) -> None:
        """SIGKILL whatever is left of every job of this cluster."""
        for job in self.jobs:
            job.cancel()


def _shared_names(nodes: int) -> list[str]:
    """Without namespaces: names that already resolve to this machine (``localhost``, the hostname)."""
    names = ["localhost"]
    host = socket.gethostname()
    try:
        if host != "localhost" and socket.gethostbyname(host):
            names.append(host)
    except OSError:
        pass
    if len(names) < nodes:
        raise RuntimeError(f"without namespaces only {len(names)} names resolve to this machine: {names}")
    return names[:nodes]


@dataclass
class Attempt:
    restart: int
    rc: int | None = None
    requeued: bool = False
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class Job:
    """One batch job: :meth:`start` an attempt, or :meth:`run` attempts until no requeue was asked for."""

    def __init__(self, cluster: FakeNodes, script: str, job_id: int, env: dict):
        self.cluster, self.text = cluster, script
        self.extra_env = {k: str(v) for k, v in env.items()}
        self.opts = sbatch_options(script)
        nodes = int(self.opts.get("nodes", "1"))
        if nodes != len(cluster.names):
            raise ValueError(f"the job asks for {nodes} node(s); this cluster has {len(cluster.names)}")
        self.name = self.opts.get("job-name", "job")
        self.job_id = job_id
        self.dir = cluster.root / f"job{job_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.master_port = free_port()
        self.watch_port = free_port()
        self.attempts: list[Attempt] = []
        self.script: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        """The batch script's own output (``#SBATCH --output``)."""
        pattern = self.opts.get("output", f"{self.dir}/slurm-%j.out")
        return Path(pattern.replace("%x", self.name).replace("%j", str(self.job_id)))

    def env(self, restart: int) -> dict:
        per_node = int(self.opts.get("ntasks-per-node", "1"))
        n = len(self.cluster.names)
        attempt_dir = self.dir / f"attempt{restart}"
        attempt_dir.mkdir(exist_ok=True)
        env = dict(
            os.environ,
            PATH=f"{self.cluster.bin}{os.pathsep}{os.environ['PATH']}",
            FAKE_NODES_STATE=str(self.cluster.root),
            FAKE_NODES_ATTEMPT=str(attempt_dir),
            SLURM_JOB_ID=str(self.job_id),
            SLURM_JOBID=str(self.job_id),
            SLURM_JOB_NAME=self.name,
            SLURM_JOB_NODELIST=self.cluster.nodelist,
            SLURM_NODELIST=self.cluster.nodelist,
            SLURM_NNODES=str(n),
            SLURM_JOB_NUM_NODES=str(n),
            SLURM_NODEID="0",
            SLURMD_NODENAME=self.cluster.names[0],
            SLURM_NTASKS=str(per_node * n),
            SLURM_NTASKS_PER_NODE=str(per_node),
            SLURM_TASKS_PER_NODE=tasks_per_node_text(per_node, n),
            SLURM_CPUS_PER_TASK=self.opts.get("cpus-per-task", "1"),
            SLURM_RESTART_COUNT=str(restart),
            SLURM_SUBMIT_DIR=str(Path.cwd()),
            MASTER_PORT=str(self.master_port),  # what _common.sh derives from the job id; free on this machine
            MEMTRAIN_NODE_WATCH_PORT=str(self.watch_port),
            TMPDIR=str(self.cluster.root / self.cluster.names[0] / "tmp"),
        )
        env.update(self.extra_env)
        return env

    def start(self) -> subprocess.Popen:
        """Start the next attempt of the batch script (on the first node), its output appended to its log."""
        restart = len(self.attempts)
        self.attempts.append(Attempt(restart))
        self.log.parent.mkdir(parents=True, exist_ok=True)
        assert self.script is not None, "a job made by step() has no batch script"
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                ["bash", str(self.script)], env=self.env(restart), stdout=out, stderr=subprocess.STDOUT
            )
        return self.proc

    def wait(self, timeout: float) -> Attempt:
        assert self.proc is not None
        attempt = self.attempts[-1]
        try:
            attempt.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise AssertionError(
                f"job {self.job_id} attempt {attempt.restart} still running after {timeout:.0f} s"
            ) from None
        attempt.ended = time.monotonic()
        attempt.requeued = f"{self.job_id} {attempt.restart}" in self.requeues()
        return attempt

    def run(self, timeout: float = 300, max_attempts: int = 3) -> list[Attempt]:
        """Attempts until one ends without asking for a requeue (at most ``max_attempts``)."""
        while len(self.attempts) < max_attempts:
            self.start()
            if not self.wait(timeout).requeued:
                break
        return self.attempts

    def requeues(self) -> list[str]:
        f = self.cluster.root / "requeue.log"
        return f.read_text().splitlines() if f.exists() else []

    def agents(self) -> dict[int, int]:
        """Node -> pid of that node's agent, for the current attempt's newest step."""
        steps = sorted((self.dir / f"attempt{len(self.attempts) - 1}").glob("step*"), key=lambda p: int(p.name[4:]))
        out = {}
        for f in steps[-1].glob("node*.pid") if steps else []:
            out[int(f.name[4:-4])] = int(f.read_text())
        return out

    def task_pids(self, node: int) -> list[int]:
        steps = sorted((self.dir / f"attempt{len(self.attempts) - 1}").glob("step*"), key=lambda p: int(p.name[4:]))
        f = steps[-1] / f"node{node}.tasks" if steps else None
        if f is None or not f.exists():
            return []
        return [int(line.split()[1]) for line in f.read_text().splitlines()]

    def wait_for_tasks(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.task_pids(k) for k in range(len(self.cluster.names))):
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the tasks of job {self.job_id} did not start")

    def signal_tasks(self, sig: int) -> None:
        """What ``#SBATCH --signal`` / ``scancel --signal`` do: ``sig`` to every task of the step, every node."""
        for pid in self.agents().values():
            _kill([pid], sig)

    def node_processes(self, node: int) -> list[int]:
        agent = self.agents().get(node)
        if agent is None:
            return []
        # unshare execs the agent: its pid is the one srun started
        return [p for p in [agent, *descendants(agent)] if alive(p)]

    def kill_node(self, node: int) -> list[int]:
        """SIGKILL every process of ``node`` (its agent, tasks, launcher and ranks) at once: the node is gone."""
        pids = self.node_processes(node)
        for _ in range(3):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGSTOP)  # nothing forks or reacts while the rest is collected
                except ProcessLookupError:
                    pass
            more = [p for pid in pids for p in descendants(pid) if p not in pids]
            if not more:
                break
            pids += more
        _kill(pids, signal.SIGKILL)
        return pids

    def cancel(self) -> None:
        for node in list(self.agents()):
            _kill(self.node_processes(node), signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def node_log(self, pattern: str = "*node{k}.out", node: int = 0) -> str:
        """Text of the logs under the batch log's folder whose names match ``pattern`` (``{k}``: ``node``)."""
        return "".join(p.read_text() for p in sorted(self.log.parent.glob(pattern.format(k=node))))


# ----------------------------------------------------------------------------------------------------
# command line


def _first_step(job: Job, timeout: float) -> bool:
    """Wait until the job's run has logged a step (``MEMTRAIN_RUN_DIR/metrics.jsonl``); False if it ended."""
    m = re.search(r"(?m)^export MEMTRAIN_RUN_DIR=(.*)$", job.text)
    if m is None:
        raise SystemExit("fake_nodes: the script exports no MEMTRAIN_RUN_DIR; cannot tell when training starts")
    metrics = Path(shlex.split(m.group(1))[0]) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.proc is not None and job.proc.poll() is None:
        if metrics.exists() and metrics.stat().st_size:
            return True
        time.sleep(0.05)
    return False


def _cmd_run(args) -> int:
    cluster = FakeNodes(Path(args.state), nodes=args.nodes)
    print(f"fake_nodes: {len(cluster.names)} nodes {cluster.nodelist} ({cluster.how})", flush=True)
    job = cluster.job(Path(args.script))
    t0 = time.monotonic()
    try:
        if args.usr1 or args.kill_node is not None:
            job.start()
            if _first_step(job, args.timeout):
                if args.usr1:
                    print("fake_nodes: first step logged; USR1 to every task on every node", flush=True)
                    job.signal_tasks(signal.SIGUSR1)
                else:
                    print(
                        f"fake_nodes: first step logged; SIGKILL to every process of node {args.kill_node}", flush=True
                    )
                    job.kill_node(args.kill_node)
            if job.wait(args.timeout).requeued:
                job.run(timeout=args.timeout)
        else:
            job.run(timeout=args.timeout)
    finally:
        cluster.close()
    for attempt in job.attempts:
        print(
            f"fake_nodes: job {job.job_id} attempt {attempt.restart}: exit {attempt.rc}"
            + (", requeued" if attempt.requeued else ""),
            flush=True,
        )
    print(f"fake_nodes: {time.monotonic() - t0:.0f} s; the job's logs:", flush=True)
    for log in sorted(job.log.parent.glob("*.out")):
        print(f"==> {log.name} <==\n{log.read_text().rstrip()}")
    return job.attempts[-1].rc or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["srun"]:
        return fake_srun(argv[1:])
    if argv[:1] == ["scontrol"]:
        return fake_scontrol(argv[1:])
    if argv[:1] == ["node-agent"]:
        return node_agent(argv[1])
    p = argparse.ArgumentParser(prog="fake_nodes.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a rendered batch script as a job on simulated nodes")
    r.add_argument("script")
    r.add_argument("--nodes", type=int, default=2)
    r.add_argument("--state", default="fake-nodes", help="folder for the cluster's state (default: fake-nodes)")
    r.add_argument("--timeout", type=float, default=600, help="seconds one attempt may take")
    what = r.add_mutually_exclusive_group()
    what.add_argument("--usr1", action="store_true", help="once a step is logged, USR1 to every task (preemption)")
    what.add_argument("--kill-node", type=int, metavar="K", help="once a step is logged, SIGKILL node K")
    args = p.parse_args(argv)
    return _cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
