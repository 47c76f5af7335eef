"""Two nodes on one machine, for every launcher: rendered batch scripts run as real two-node jobs.

``tools/fake_nodes.py`` makes each simulated node a mount + UTS namespace (hostname ``node0``/``node1``, its own
``/dev/shm`` and ``TMPDIR``, an ``/etc/hosts`` in which ``node1`` is ``127.0.0.2``) and runs the batch script
with fake ``srun`` (one agent per node starts that node's tasks) and ``scontrol`` (node lists, requeue). The
runs use the tiny config on CPU with gloo:

* 2 nodes x 1 rank trains what 1 node x 2 ranks trains, under ``srun``, ``torchrun`` and the DeepSpeed
  launcher (``data.num_canonical_nodes: 2`` on both, so that both read the same sample order);
* USR1 to both nodes (``scancel --signal=USR1``) checkpoints once, the job requeues and the resumed job
  finishes with the losses of the uninterrupted one (torchrun);
* a node whose processes are all SIGKILLed ends the job within ``dist.timeout_s``, and the node left names it;
* mosaicml-streaming elects one shared-memory leader per node;
* with ``MEMTRAIN_REQUIRE_SLURM=1`` (root, Debian's Slurm): the same job on a real two-node Slurm cluster on
  this machine (``tools/local_slurm.py`` with two slurmd, each in its own namespaces).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import records, render_job, tiny_raw, weights, write_yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import fake_nodes  # noqa: E402
import local_slurm  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

STEPS = 100
RUN = [
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.ckpt_every=50",
    "train.keep_ckpts=5",
    "train.stop_check_every=5",
    "data.num_canonical_nodes=2",  # the same sample order on one node and on two
    "dist.timeout_s=30",
]
TIMEOUT_S = 30


def _isolation() -> None:
    prefix, how = fake_nodes.isolation()
    if prefix is None:
        pytest.skip(f"simulated nodes need a mount and UTS namespace each ({how})")


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> Path:
    """A copy of the tiny shards with every shard decompressed beforehand, as on a cluster's shared file system
    after a first run: streaming decompresses a local shard in place through one temporary name
    (``<shard>.tmp``) for every process, so two nodes' first ranks that decompress the same shard at the same
    moment can collide (one renames the file the other is still writing)."""
    from memtrain.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base.compression import decompress

    out = tmp_path_factory.mktemp("shards") / "shards"
    shutil.copytree(tiny_data.shards, out)
    for index in out.glob("*/index.json"):
        for shard in json.loads(index.read_text())["shards"]:
            raw, zipped = shard["raw_data"], shard.get("zip_data")
            if zipped and not (index.parent / raw["basename"]).exists():
                data = decompress(shard["compression"], (index.parent / zipped["basename"]).read_bytes())
                (index.parent / raw["basename"]).write_bytes(data)
    return out


@pytest.fixture(scope="module")
def no_sinfo():
    """``memtrain submit`` checks against a cluster of one partition ``cpu`` (2 nodes of 2 CPUs)."""
    from memtrain.launch import slurm

    with pytest.MonkeyPatch.context() as mp:
        part = slurm.Partition("cpu", nodes=2, gpus_per_node=0, cpus_per_node=2)
        mp.setattr(slurm, "cluster_partitions", lambda: {"cpu": part})
        mp.setattr(slurm, "default_partition", lambda: "cpu")
        yield


def _job(root: Path, shards: Path, launcher: str, nodes: int, tasks: int, *extra: str) -> tuple[Path, Path]:
    """A rendered job of the tiny config under ``root``; returns (batch script, run dir)."""
    root.mkdir(parents=True)
    run_dir = root / "run"
    engine = ["dist.engine=deepspeed"] if launcher == "deepspeed" else []
    raw = tiny_raw(shards, run_dir, [*RUN, *engine, *extra])
    cfg = write_yaml(root / "cfg.yaml", raw)
    flags = ["--nodes", str(nodes), "--tasks-per-node", str(tasks), "--launcher", launcher, "--partition", "cpu"]
    flags += ["--time", "01:00:00", "--cpus-per-task", "1" if launcher == "srun" else str(tasks)]  # a core per rank
    return render_job(root, [str(cfg), *flags]), run_dir


def _cluster(root: Path, nodes: int) -> fake_nodes.FakeNodes:
    return fake_nodes.FakeNodes(root, nodes=nodes, isolate=True)


ENV = {"OMP_NUM_THREADS": "1"}


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss/total"] for step, r in records(run_dir).items()}


def _canonical_nodes(run_dir: Path) -> int | None:
    """The node count the run's sample order was laid out for, from its last checkpoint's loader state."""
    import torch

    def find(obj):
        if isinstance(obj, dict):
            if "num_canonical_nodes" in obj:
                return obj["num_canonical_nodes"]
            return next((v for v in map(find, obj.values()) if v is not None), None)
        return None

    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    for f in sorted(last.rglob("*.pt")):  # trainer.pt (plain engine) or DeepSpeed's client state
        # this test's own checkpoint; DeepSpeed's files need full unpickling (they hold functools.partial)
        found = find(torch.load(f, map_location="cpu", weights_only=False))
        if found is not None:
            return int(found)
    return None


def _wait(predicate, timeout: float, what: str, job: fake_nodes.Job | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if job is not None and job.proc is not None and job.proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{job.log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _logs(script: Path, tail: int = 4000) -> str:
    """The job's logs (each one's last ``tail`` characters; 0: all of it)."""
    return "\n".join(f"== {p.name}\n{p.read_text()[-tail:]}" for p in sorted(script.parent.glob("logs/*.out")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards, no_sinfo):
    """Finished jobs by (launcher, nodes, ranks per node), each run once per module when first asked for."""
    _isolation()
    root = tmp_path_factory.mktemp("multinode")
    done: dict[tuple[str, int, int], tuple[Path, Path]] = {}
    clusters = []

    def get(launcher: str, nodes: int, tasks: int) -> tuple[Path, Path]:
        key = (launcher, nodes, tasks)
        if key not in done:
            where = root / f"{launcher}-{nodes}x{tasks}"
            script, run_dir = _job(where, shards, launcher, nodes, tasks)
            cluster = _cluster(where / "nodes", nodes)
            clusters.append(cluster)
            (attempt,) = cluster.job(script, env=ENV).run(timeout=240)
            assert attempt.rc == 0, _logs(script)
            done[key] = (script, run_dir)
        return done[key]

    yield get
    for c in clusters:
        c.close()


# ----------------------------------------------------------------------------------------------------
# 1. two nodes of one rank train what one node of two ranks trains


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "torchrun", "deepspeed"])
def test_two_nodes_train_what_one_node_of_two_ranks_trains(runs, launcher):
    script, two_nodes = runs(launcher, 2, 1)
    # the reference: one node, two ranks (torchrun's for the plain engine, whose ranks do not depend on the
    # launcher; the DeepSpeed launcher's for the DeepSpeed engine)
    _, one_node = runs("deepspeed" if launcher == "deepspeed" else "torchrun", 1, 2)
    for run_dir in (two_nodes, one_node):  # both read the order laid out for data.num_canonical_nodes
        assert _canonical_nodes(run_dir) == 2, f"{run_dir}: sample order not laid out for data.num_canonical_nodes=2"
    a, b = _losses(two_nodes), _losses(one_node)
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == sorted(a)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), f"step {step}"
    logs = _logs(script)
    assert "on node[0-1], head node0:" in logs  # the batch script saw two nodes; the head is node0
    if launcher == "srun":  # one task per rank: rank 1 ran on node1
        assert len(list(script.parent.glob("logs/*rank1.out"))) == 1
    else:  # one launcher per node, each with its own log
        assert sorted(p.name.rsplit("-", 1)[1] for p in script.parent.glob("logs/*-node*.out")) == [
            "node0.out",
            "node1.out",
        ]
    summary = json.loads((two_nodes / "summary.json").read_text())
    assert summary["complete"] and summary["step"] == STEPS


# ----------------------------------------------------------------------------------------------------
# 2. preemption: USR1 to both nodes, one checkpoint, requeue, the same losses as without


@pytest.mark.slow
def test_preempted_two_node_job_requeues_and_matches_the_uninterrupted_one(runs, shards, tmp_path, no_sinfo):
    _, straight = runs("torchrun", 2, 1)
    script, run_dir = _job(tmp_path / "job", shards, "torchrun", 2, 1)
    cluster = _cluster(tmp_path / "nodes", 2)
    job = cluster.job(script, env=ENV)
    try:
        job.start()
        metrics = run_dir / "metrics.jsonl"
        _wait(lambda: metrics.exists() and metrics.read_text().strip(), 180, "the first step", job)
        job.signal_tasks(signal.SIGUSR1)  # scancel --signal=USR1: every task of the step, on both nodes
        first = job.wait(120)
        assert first.rc == 0 and first.requeued, _logs(script)
        marker = json.loads((run_dir / "PREEMPTED").read_text())
        stopped = marker["step"]
        assert 0 < stopped < STEPS and marker["attempt"] == f"{job.job_id}.0"
        # rank 0 names the signal, or "peer" when the other node's rank had it first at the ranks' check
        assert marker["signal"] in ("SIGUSR1", "peer")
        assert (run_dir / "checkpoints" / f"step_{stopped:07d}" / "meta.json").is_file()
        # the second attempt: the batch script again, SLURM_RESTART_COUNT=1
        (second,) = job.run(timeout=180)[1:]
        assert second.rc == 0 and not second.requeued, _logs(script)
    finally:
        cluster.close()
    logs = _logs(script, tail=0)
    # one checkpoint, written by rank 0 (node0) after the step all ranks agreed on
    preempted = re.findall(r"preempted \((SIGUSR1|peer)\) after step (\d+); checkpoint written", logs)
    assert [int(step) for _, step in preempted] == [stopped], _logs(script)
    assert logs.count(f"requeueing job {job.job_id} (requeue 1 of") == 1, _logs(script)
    for node in (0, 1):  # each node's wrapper got the signal and passed it on to its rank
        node_log = job.node_log(node=node)
        assert f"node {node}: SIGUSR1 received; forwarding it to the training ranks" in node_log
    assert job.requeues() == [f"{job.job_id} 0"]
    assert not (run_dir / "PREEMPTED").exists()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, STEPS + 1))  # each step once
    a, b = _losses(run_dir), _losses(straight)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), f"step {step}"
    wa, wb = weights(run_dir, STEPS), weights(straight, STEPS)
    assert all((wa[k] - wb[k]).abs().max().item() <= 1e-6 for k in wb)


# ----------------------------------------------------------------------------------------------------
# 3. a node dies: the job ends within dist.timeout_s and the node left names it


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("launcher,victim", [("srun", 1), ("torchrun", 0), ("deepspeed", 1)])
def test_a_dead_node_ends_the_job_and_is_named(shards, tmp_path, no_sinfo, launcher, victim):
    _isolation()
    script, run_dir = _job(tmp_path / "job", shards, launcher, 2, 1, "train.steps=100000", "train.ckpt_every=0")
    cluster = _cluster(tmp_path / "nodes", 2)
    job = cluster.job(script, env=ENV)
    try:
        job.start()
        metrics = run_dir / "metrics.jsonl"
        _wait(lambda: metrics.exists() and metrics.read_text().strip(), 180, "the first step", job)
        t0 = time.monotonic()
        killed = job.kill_node(victim)
        attempt = job.wait(TIMEOUT_S + 60)
        elapsed = time.monotonic() - t0
        assert not any(fake_nodes.alive(pid) for pid in killed)
        left = [p for k in (0, 1) for p in job.node_processes(k)]
    finally:
        cluster.close()
    survivor = 1 - victim
    logs = _logs(script)
    assert attempt.rc not in (0, None) and not attempt.requeued, logs
    assert elapsed < TIMEOUT_S, f"{elapsed:.0f} s\n{logs}"
    assert left == [], "processes of the job outlived it"
    text = job.node_log("*-rank{k}.out" if launcher == "srun" else "*-node{k}.out", survivor)  # one task a node
    me, lost = f"node {survivor} (node{survivor})", f"node {victim} (node{victim})"
    assert f"memtrain: {me}: lost {lost} at " in text, logs
    assert f"memtrain: {me}: exit code 1 after losing {lost}" in text, logs


# ----------------------------------------------------------------------------------------------------
# 4. one streaming shared-memory leader per node

LEADER_PROBE = """\
import json, os, socket, sys
from pathlib import Path
from memtrain.launch.env import adopt_slurm_env
adopt_slurm_env()
from memtrain.engine.distributed import init_distributed
info = init_distributed("cpu", "gloo", timeout_s=30)
from memtrain.data.loader import make_loader
loader = make_loader(Path(sys.argv[1]), "train", batch_size=2, shuffle=False, seed=0)
shm = loader.dataset._locals_shm
st = os.stat("/dev/shm/" + shm.shm.name.lstrip("/"))
rows = next(iter(loader))
out = dict(rank=info.rank, local_rank=info.local_rank, node=int(os.environ["SLURM_NODEID"]),
           host=socket.gethostname(), prefix=loader.dataset._shm_prefix_int, created=bool(shm.created_shms),
           segment=[st.st_dev, st.st_ino], rows=[int(r.sum()) for r in rows])
import torch.distributed as dist
dist.barrier()
loader.close()
print("PROBE " + json.dumps(out), flush=True)
"""


def test_streaming_elects_one_shared_memory_leader_per_node(shards, tmp_path):
    _isolation()
    probe = tmp_path / "probe.py"
    probe.write_text(LEADER_PROBE)
    cluster = _cluster(tmp_path / "nodes", 2)
    job, done = cluster.step(
        [sys.executable, str(probe), str(shards)],
        tasks_per_node=2,
        env=dict(ENV, MASTER_ADDR="node0", PYTHONPATH=str(ROOT)),
    )
    outs = {p.name: p.read_text() for p in sorted(job.dir.glob("task*.out"))}
    assert done.returncode == 0, done.stderr + "".join(outs.values())[-4000:]
    found = [json.loads(ln[6:]) for text in outs.values() for ln in text.splitlines() if ln.startswith("PROBE ")]
    assert sorted((r["rank"], r["node"], r["local_rank"]) for r in found) == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 0),
        (3, 1, 1),
    ]
    for node in (0, 1):
        ranks = [r for r in found if r["node"] == node]
        assert {r["host"] for r in ranks} == {f"node{node}"}
        leaders = [r["rank"] for r in ranks if r["created"]]
        assert leaders == [2 * node], ranks  # exactly one leader: the node's first rank registered the dataset
        assert len({tuple(r["segment"]) for r in ranks}) == 1  # the other rank attached to that same segment
    # the two nodes' segments are different files even when they have the same name (each node's /dev/shm)
    assert len({tuple(r["segment"]) for r in found}) == 2
    assert len({tuple(r["rows"]) for r in found}) == 4  # and every rank read its own rows


# ----------------------------------------------------------------------------------------------------
# 5. a real two-node Slurm cluster on this machine


@pytest.mark.slow
def test_two_node_job_on_a_local_slurm_cluster(shards, tmp_path):
    if os.environ.get("MEMTRAIN_REQUIRE_SLURM") != "1":
        pytest.skip(
            "needs a local two-node Slurm cluster: set MEMTRAIN_REQUIRE_SLURM=1 on a machine with Slurm "
            "installed, as root (.ci/run does)"
        )
    missing = local_slurm.missing_binaries()
    assert not missing, f"install with: {local_slurm.install_hint()}"
    root = tmp_path / "slurm"
    env = dict(os.environ, **local_slurm.start(root, nodes=2, ctld_port=16917, d_port=16918))
    try:
        jobs = {}
        for name, nodes, tasks in (("two", 2, 1), ("one", 1, 2)):
            run_dir = tmp_path / "runs" / name
            raw = tiny_raw(shards, run_dir, [*RUN, f"run.name={name}", "train.steps=30"])
            cfg = write_yaml(tmp_path / f"{name}.yaml", raw)
            out = subprocess.run(
                [sys.executable, "-m", "memtrain", "submit", str(cfg), "--nodes", str(nodes)]
                + ["--tasks-per-node", str(tasks), "--launcher", "torchrun", "--time", "00:10:00"]
                + ["--workdir", str(tmp_path)],
                env=env,
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, out.stderr
            jobs[name] = (out.stdout.split()[2].rstrip(":"), run_dir)
        for name, (job, _) in jobs.items():
            _wait(lambda j=job: _slurm_state(env, j) in TERMINAL, 300, f"job {job} ({name}) to finish")
            logs = "".join(p.read_text() for p in sorted(tmp_path.glob(f"slurm-jobs/{name}-*/logs/*.out")))
            assert _slurm_state(env, job) == "COMPLETED", logs[-5000:]
        logs = "".join(p.read_text() for p in sorted(tmp_path.glob("slurm-jobs/two-*/logs/*.out")))
        assert "on node[0-1], head node0:" in logs, logs[-3000:]
        a, b = _losses(jobs["two"][1]), _losses(jobs["one"][1])
        assert sorted(a) == list(range(1, 31)) and sorted(a) == sorted(b)
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), f"step {step}"
    finally:
        local_slurm.stop(root)


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def _slurm_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for tok in out.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "UNKNOWN"


# ----------------------------------------------------------------------------------------------------
# the node watch on its own (memtrain.launch.node.NodeWatch): goodbye, a closed connection, silence


def _watch_env(node: int, port: int) -> dict:
    return {
        "SLURM_NODEID": str(node),
        "SLURMD_NODENAME": f"node{node}",
        "SLURM_NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MEMTRAIN_NODE_WATCH_PORT": str(port),
    }


def _wait_peers(watch, n: int) -> None:
    _wait(lambda: len(watch.peers) == n and all(p.node is not None for p in watch.peers), 10, f"{n} peer(s)")


def test_node_watch_names_a_vanished_node_and_not_one_that_said_goodbye(capsys, monkeypatch):
    from memtrain.launch import node

    monkeypatch.setattr(node, "PING_S", 0.2)
    monkeypatch.setattr(node, "SILENT_S", 1.5)
    port = fake_nodes.free_port()
    head = node.NodeWatch(_watch_env(0, port))
    assert head.active and head.start()
    try:
        # a node that ends in order is not reported
        polite = node.NodeWatch(_watch_env(1, port))
        polite.start()
        _wait_peers(head, 1)
        polite.close(1)
        _wait(lambda: not head.peers, 10, "the goodbye")
        assert head.lost == []
        # a node whose wrapper vanishes (SIGKILL: the connection closes without a goodbye)
        gone = node.NodeWatch(_watch_env(1, port))
        gone.start()
        _wait_peers(head, 1)
        gone._closing = True  # its threads stop without a goodbye or a report of their own
        for peer in list(gone.peers):
            peer.sock.close()
        _wait(lambda: head.lost, 10, "the loss")
        assert head.lost == ["node 1 (node1)"]
        # a node that froze: connected, then silent
        head.lost.clear()
        frozen = socket.create_connection(("127.0.0.1", port))
        frozen.sendall(b"hello 1 node 1 (node1)\n")
        _wait(lambda: head.lost, 10, "the silence")
        assert head.lost == ["node 1 (node1)"]
        frozen.close()
    finally:
        head.close(0)
    err = capsys.readouterr().err
    assert err.count("memtrain: node 0 (node0): lost node 1 (node1) at ") == 2, err
    assert "(its connection closed without a goodbye)" in err and "(silent for " in err


def test_node_watch_port_and_off_switch():
    from memtrain.launch.node import NodeWatch, watch_port

    assert watch_port({"MASTER_PORT": "24242"}) == 44242
    assert watch_port({"MASTER_PORT": "50000"}) == 30000
    assert watch_port({"MASTER_PORT": "24242", "MEMTRAIN_NODE_WATCH_PORT": "5000"}) == 5000
    assert watch_port({"MASTER_PORT": "24242", "MEMTRAIN_NODE_WATCH": "0"}) is None
    assert not NodeWatch({"SLURM_NNODES": "1", "MASTER_ADDR": "x", "MASTER_PORT": "24242"}).active
    assert NodeWatch({"SLURM_NNODES": "2", "MASTER_ADDR": "x", "MASTER_PORT": "24242"}).active
