"""The scaling model's calibration: fitting all-reduce latency and bandwidth, calibration files, the network of
``memtrain scale``, and ``tools/calibrate_scaling.py`` (its report from saved measurements; its gloo benchmark;
end to end on simulated nodes, slow)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from memtrain.errors import UserError
from memtrain.launch import scaling

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import calibrate_scaling  # noqa: E402

SIZES = [4096.0, 65536.0, 524288.0, 2**21, 2**23, 2**25]


def _times(latency: float, gbps: float, ranks: int = 2, noise: float = 0.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [scaling.allreduce_time(b, ranks, gbps, latency) * (1 + rng.uniform(-noise, noise)) for b in SIZES]


@pytest.mark.parametrize("ranks", [2, 8])
def test_fit_recovers_latency_and_bandwidth(ranks):
    fit = scaling.fit_allreduce(SIZES, _times(150e-6, 1.7, ranks), ranks)
    assert fit.latency_s == pytest.approx(150e-6, rel=1e-9)
    assert fit.gbps == pytest.approx(1.7, rel=1e-9)
    assert fit.median_rel_error < 1e-9 and fit.points == len(SIZES)


def test_fit_with_noise_stays_close():
    fit = scaling.fit_allreduce(SIZES, _times(80e-6, 12.0, noise=0.03, seed=3), 2)
    assert fit.latency_s == pytest.approx(80e-6, rel=0.1)
    assert fit.gbps == pytest.approx(12.0, rel=0.05)
    assert 0 < fit.median_rel_error < 0.05


def test_fit_clamps_a_negative_latency():
    # pure bandwidth, the small sizes a little fast: the free fit would give a negative latency
    times = [b / 2e9 * (0.8 if b < 1e5 else 1.0) for b in SIZES]
    fit = scaling.fit_allreduce(SIZES, times, 2)
    assert fit.latency_s == 0.0
    assert fit.gbps == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize(
    "sizes,times,ranks",
    [([4096.0], [1e-3], 2), ([4096.0, 4096.0], [1e-3, 2e-3], 2), (SIZES, [1e-3] * 6, 1), (SIZES, [0.0] * 6, 2)],
)
def test_fit_refuses_what_cannot_be_fitted(sizes, times, ranks):
    with pytest.raises(ValueError):
        scaling.fit_allreduce(sizes, times, ranks)


def test_fit_refuses_times_that_shrink_with_size():
    with pytest.raises(ValueError, match="do not grow"):
        scaling.fit_allreduce(SIZES, [1e-3 / (i + 1) for i in range(6)], 2)


def test_comm_time_is_two_hierarchical_allreduces():
    net = scaling.Network("n", intra_gbps=100.0, inter_gbps=10.0, latency_s=5e-6, inter_latency_s=40e-6)
    volume = 1e8 * 2  # DDP, 2 bytes per parameter: one all-reduce of the gradients
    want = (5e-6 + 2 * 7 / 8 * volume / 100e9) + (40e-6 + 2 * 3 / 4 * volume / 10e9)
    assert scaling.comm_time(1e8, 2, 0, nodes=4, gpus_per_node=8, net=net) == pytest.approx(want)
    # one node: no inter-node term, one GPU per node: no intra-node term
    assert scaling.comm_time(1e8, 2, 0, 1, 8, net) == pytest.approx(5e-6 + 2 * 7 / 8 * volume / 100e9)
    assert scaling.comm_time(1e8, 2, 0, 2, 1, net) == pytest.approx(40e-6 + volume / 10e9)
    # without inter_latency_s both levels have latency_s (the presets)
    preset = scaling.NETWORKS["ethernet-100g"]
    assert preset.inter_latency == preset.latency_s == 50e-6


def test_presets_predict_as_documented():
    """docs/scaling.md's H100 example (unchanged by the per-link latency)."""
    r = scaling.predict(0.0909, 191.1e6, 2, 8, scaling.NETWORKS["h100-nvlink-ib8x400"], overlap=0.5)
    assert r["comm_s"] == pytest.approx(0.002803, rel=1e-3)
    assert r["efficiency"] == pytest.approx(0.9848, rel=1e-4)


def _net() -> scaling.Network:
    return scaling.Network("cpu-gloo", intra_gbps=1.25, inter_gbps=0.9, latency_s=120e-6, inter_latency_s=300e-6)


def test_calibration_file_round_trips(tmp_path):
    net = _net()
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(scaling.calibration_dict(net, {"date": "2026-12-04"})))
    back = scaling.load_calibration(path)
    assert back == net
    for nodes, gpus in [(1, 2), (2, 1), (4, 8)]:
        assert scaling.predict(0.05, 5e6, nodes, gpus, back, bytes_per_param=4) == scaling.predict(
            0.05, 5e6, nodes, gpus, net, bytes_per_param=4
        )
    assert scaling.resolve_network(calibration=path) == net
    assert "300 us" in scaling.describe_network(net)


def test_scale_command_predicts_with_a_calibration_file(tmp_path, capsys):
    from memtrain.cli import main

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(scaling.calibration_dict(_net())))
    assert main(["scale", "--calibration", str(path), "--step-time", "0.2", "--params", "5e6", "--nodes", "1,2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("network cpu-gloo: 1.25 GB/s per GPU in a node, 0.9 GB/s per node; latency 120 us in")
    expected = scaling.predict(0.2, 5e6, 2, 8, _net())["step_s"]
    assert f"| {expected:.4g} |" in out.splitlines()[-1]
    assert (
        main(["scale", "--calibration", str(path), "--latency-us", "5", "--step-time", "0.2", "--params", "5e6"]) == 0
    )
    assert "latency 5 us\n" in capsys.readouterr().out
    path.write_text("{}")
    assert main(["scale", "--calibration", str(path), "--step-time", "0.2", "--params", "5e6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_calibration_network_from_fits():
    intra = scaling.fit_allreduce(SIZES, _times(100e-6, 2.0), 2)
    inter = scaling.fit_allreduce(SIZES, _times(250e-6, 0.5), 2)
    net = scaling.calibration_network("fitted", intra, inter)
    assert (net.intra_gbps, net.inter_gbps) == pytest.approx((2.0, 0.5))
    assert (net.latency_s, net.inter_latency) == pytest.approx((100e-6, 250e-6))


def _valid() -> dict:
    return scaling.calibration_dict(_net())


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(format="other/1"), "format must be"),
        (lambda d: d.pop("intra"), "'intra' must be a mapping"),
        (lambda d: d["inter"].pop("gbps"), "inter.gbps must be a number, got None"),
        (lambda d: d["intra"].update(gbps="fast"), "intra.gbps must be a number, got 'fast'"),
        (lambda d: d["intra"].update(gbps=0), "intra.gbps must be > 0"),
        (lambda d: d["inter"].update(latency_s=-1e-6), "inter.latency_s must be >= 0"),
        (lambda d: d["inter"].update(latency_s=True), "inter.latency_s must be a number"),
        (lambda d: d.update(name=""), "name must be a non-empty string"),
    ],
)
def test_malformed_calibration_names_file_and_field(tmp_path, change, message):
    data = _valid()
    change(data)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        scaling.load_calibration(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_unreadable_calibration_files(tmp_path):
    with pytest.raises(UserError, match="calibration file not found"):
        scaling.load_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad.json: not JSON"):
        scaling.load_calibration(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        scaling.load_calibration(tmp_path / "list.json")


def test_resolve_network_presets_and_overrides(tmp_path):
    assert scaling.resolve_network("a100-nvlink-ib4x200") is scaling.NETWORKS["a100-nvlink-ib4x200"]
    eth = scaling.resolve_network("ethernet-100g", inter_gbps=25.0)
    assert (eth.name, eth.intra_gbps, eth.inter_gbps, eth.latency_s) == ("custom", 230.0, 25.0, 50e-6)
    lat = scaling.resolve_network(latency_us=7.0)
    assert lat.latency_s == lat.inter_latency == pytest.approx(7e-6)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(_valid()))
    over = scaling.resolve_network(calibration=path, inter_gbps=3.0)
    assert (over.intra_gbps, over.inter_gbps, over.inter_latency) == (1.25, 3.0, 300e-6)
    assert over.name == "cpu-gloo (overridden)"
    with pytest.raises(UserError, match="unknown network 'infiniband'"):
        scaling.resolve_network("infiniband")
    with pytest.raises(UserError, match="--inter-gbps: must be > 0"):
        scaling.resolve_network(inter_gbps=0.0)
    with pytest.raises(UserError, match="--latency-us: must be >= 0"):
        scaling.resolve_network(latency_us=-1.0)


# ----------------------------------------------------------------------------------------------------
# tools/calibrate_scaling.py


def _measurements(net: scaling.Network, t1: float, t_shared: float, params: int) -> dict:
    """What ``run`` records, made from a known network: all-reduces exactly on the model, step times as
    ``predict`` gives them over the shared baseline, three repeats with a spread, widths 32 (``params``) and
    320 (ten times as many parameters, ten times the step time)."""
    allreduce = {
        "intra": [{int(b): scaling.allreduce_time(b, 2, net.intra_gbps, net.latency_s) for b in SIZES}] * 3,
        "inter": [{int(b): scaling.allreduce_time(b, 2, net.inter_gbps, net.inter_latency) for b in SIZES}] * 3,
    }
    train = []
    for d, n, scale in ((32, params, 1), (320, 10 * params, 10)):
        for k, jitter in enumerate((0.98, 1.0, 1.03)):
            steps = {
                "1x1": [t1 * scale],
                "shared": [t_shared * scale] * 2,
                "1x2": [t_shared * scale + scaling.comm_time(n, 4, 0, 1, 2, net)],
                "2x1": [t_shared * scale + scaling.comm_time(n, 4, 0, 2, 1, net)],
            }
            for layout, ts in steps.items():
                for t in ts:
                    row = {"layout": layout, "repeat": f"r{k}", "step_s": t * jitter, "params": n, "load": 1.0}
                    train.append({"d_model": d, **row})
    return {
        "date": "2026-12-04",
        "machine": "test",
        "commit": "abc1234",
        "repeats": 3,
        "bytes_per_param": 4,
        "allreduce": allreduce,
        "train": train,
    }


def test_report_fits_and_checks_saved_measurements(tmp_path, capsys):
    net = _net()
    meas = _measurements(net, t1=0.010, t_shared=0.012, params=400_000)
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps(meas))  # sizes become text keys, as run writes them
    assert calibrate_scaling.main(["report", str(path)]) == 0
    back = scaling.load_calibration(tmp_path / "calibration.json")
    assert back.intra_gbps == pytest.approx(net.intra_gbps) and back.inter_gbps == pytest.approx(net.inter_gbps)
    assert back.latency_s == pytest.approx(net.latency_s) and back.inter_latency == pytest.approx(net.inter_latency)
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["measured"] == {"date": "2026-12-04", "machine": "test", "commit": "abc1234", "repeats": 3}
    out = capsys.readouterr().out
    assert "| 2x1 |" in out and (tmp_path / "report.md").read_text().strip() in out

    checked = calibrate_scaling.check(meas["train"], back)
    rows = {r["layout"]: r for r in checked if r["d_model"] == 32}
    comm = scaling.comm_time(400_000, 4, 0, 2, 1, net)
    two = rows["2x1"]
    assert two["measured_s"] == pytest.approx(0.012 + comm)  # the median repeat (jitter 1.0)
    assert two["predicted_s"] == pytest.approx(0.010 + comm)  # from the 1 x 1 step time: misses the sharing
    assert two["error"] == pytest.approx((0.010 + comm) / (0.012 + comm) - 1)
    assert two["error_shared"] == pytest.approx(0.0, abs=1e-9)  # from the shared baseline: exact
    assert two["excess_s"] == pytest.approx(comm)
    assert two["ratio"] == pytest.approx((0.012 + comm) / 0.010)
    assert rows["shared"]["min_s"] == pytest.approx(0.012 * 0.98) and rows["shared"]["max_s"] == pytest.approx(
        0.012 * 1.03
    )
    # the training runs' excess over shared, fitted across the two widths, gives the network back
    fits = {row[0]: row[1:] for row in calibrate_scaling.effective_fits(checked)}
    assert fits["intra (1x2)"][:2] == [f"{net.latency_s * 1e6:.0f}", f"{net.intra_gbps:.3f}"]
    assert fits["inter (2x1)"][:2] == [f"{net.inter_latency * 1e6:.0f}", f"{net.inter_gbps:.3f}"]
    # a layout whose excess is not positive (noise larger than communication) is reported, not fitted
    noisy = [dict(r, excess_s=-0.001) if r["layout"] == "2x1" else r for r in checked]
    assert "not fittable" in calibrate_scaling.effective_fits(noisy)[1][3]


def test_report_of_a_malformed_measurements_file(tmp_path, capsys):
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"allreduce": {"intra": []}}))
    assert calibrate_scaling.main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a measurements file" in err and "Traceback" not in err


@pytest.mark.distributed
def test_gloo_allreduce_benchmark(tmp_path):
    """Two gloo processes on this node: a time for every size asked for (correctness, not speed)."""
    times = calibrate_scaling.allreduce_intra(tmp_path, [4, 64], iters=3, tag="t")
    assert sorted(times) == [4096, 65536]
    assert all(t > 0 for t in times.values())


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.distributed
def test_calibration_runs_end_to_end(tiny_data, tmp_path):
    """The tiniest setting on simulated nodes: every layout trains, the fit and the report are written."""
    from fake_nodes import isolation

    prefix, how = isolation()
    if prefix is None:
        pytest.skip(f"simulated nodes need a mount and UTS namespace each ({how})")
    argv = ["run", "--out", str(tmp_path), "--shards", str(tiny_data.shards), "--d-models", "32", "--steps", "10"]
    argv += ["--repeats", "1", "--allreduce-kib", "4,8192", "--iters", "3"]  # sizes far apart: the fit needs growth
    assert calibrate_scaling.main(argv) == 0
    meas = json.loads((tmp_path / "measurements.json").read_text())
    assert sorted(r["layout"] for r in meas["train"]) == sorted(["1x1", "shared", "shared", "1x2", "2x1"])
    assert all(r["step_s"] > 0 and r["params"] > 0 for r in meas["train"])
    net = scaling.load_calibration(tmp_path / "calibration.json")
    assert net.intra_gbps > 0 and net.inter_gbps > 0
    assert "| 2x1 |" in (tmp_path / "report.md").read_text()


def _sweep_dir(tmp_path: Path, overlap: float, net: scaling.Network) -> Path:
    """A collected sweep of one model: 1 GPU, 1 x 8, 2 x 8 and 4 x 8 GPUs, step times from the model with
    ``overlap`` (results.csv as ``memtrain sweep collect`` writes it, each run's config.yaml its nodes)."""
    import csv

    import yaml

    params, t1, per_step = 2e8, 0.1, 16384
    rows = []
    for i, (nodes, per_node) in enumerate([(1, 1), (1, 8), (2, 8), (4, 8)]):
        run_dir = tmp_path / f"pt-{i:03d}"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"slurm": {"nodes": nodes, "gpus_per_node": per_node}}))
        step = scaling.predict(t1, params, nodes, per_node, net, overlap=overlap)["step_s"]
        ranks = nodes * per_node
        tokens = 100 * per_step * ranks
        rows.append(
            {"run": run_dir.name, "run_dir": str(run_dir), "ranks": ranks, "params": int(params), "steps": 100}
            | {"tokens": tokens, "tokens_per_s": per_step * ranks / step, "final_loss": 3.0}
        )
    rows.append({"run": "no-checkpoint", "run_dir": "", "ranks": 8, "params": "", "steps": 100, "tokens": 1})
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return tmp_path


def test_sweep_check_fits_the_overlap(tmp_path, capsys):
    net = scaling.NETWORKS["ethernet-100g"]
    sweep = _sweep_dir(tmp_path, overlap=0.4, net=net)
    rows = calibrate_scaling.sweep_rows(sweep)
    assert [(r["nodes"], r["per_node"]) for r in rows] == [(1, 1), (1, 8), (2, 8), (4, 8)]
    checked, f = calibrate_scaling.sweep_check(rows, net, bytes_per_param=2.0, zero_stage=0)
    assert f == pytest.approx(0.4)
    assert [r["run"] for r in checked] == ["pt-001", "pt-002", "pt-003"]
    assert all(r["error"] == pytest.approx(0, abs=1e-9) for r in checked)  # the fitted overlap: exact
    assert checked[-1]["efficiency"] == pytest.approx(0.1 / rows[-1]["step_s"]) and checked[-1]["efficiency"] < 1
    assert calibrate_scaling.main(["sweep", str(sweep), "--net", "ethernet-100g"]) == 0
    out = capsys.readouterr().out
    assert "fitted overlap: 0.40 (memtrain scale --overlap 0.40)" in out and "| pt-003 | 200,000,000 | 4 | 8 |" in out


def test_fit_overlap_is_clamped():
    assert calibrate_scaling.fit_overlap([(1.0, 0.5, 2.0)]) == 0.0  # slower than all communication exposed
    assert calibrate_scaling.fit_overlap([(1.0, 0.5, 0.9)]) == 1.0
    assert calibrate_scaling.fit_overlap([(1.0, 0.0, 1.2)]) == 0.0


def test_sweep_without_results_or_baseline(tmp_path, capsys):
    assert calibrate_scaling.main(["sweep", str(tmp_path)]) == 2
    assert "results.csv: not found (run `memtrain sweep collect" in capsys.readouterr().err
    rows = [{"run": "a", "params": 1e6, "nodes": 2, "per_node": 1, "step_s": 0.1}]
    with pytest.raises(UserError, match="needs a one-rank run"):
        calibrate_scaling.sweep_check(rows, scaling.NETWORKS["ethernet-100g"], 2.0, 0)


def _worker_file(path: Path, world: int, latency: float, gbps: float) -> Path:
    """An allreduce-worker result (per size, the times of every timed iteration) on the model."""
    secs = {str(int(b)): [scaling.allreduce_time(b, world, gbps, latency) * k for k in (0.99, 1.0, 1.2)] for b in SIZES}
    path.write_text(json.dumps({"world_size": world, "seconds": secs}))
    return path


def test_fit_writes_a_calibration_from_worker_results(tmp_path, capsys):
    intra = _worker_file(tmp_path / "intra.json", 8, 30e-6, 150.0)
    inter = _worker_file(tmp_path / "inter.json", 4, 60e-6, 40.0)
    out = tmp_path / "cal.json"
    argv = ["fit", "--intra", str(intra), "--inter", str(inter), "--out", str(out), "--name", "cluster-a"]
    assert calibrate_scaling.main(argv) == 0
    net = scaling.load_calibration(out)
    assert net.name == "cluster-a"
    assert (net.intra_gbps, net.inter_gbps) == pytest.approx((150.0, 40.0))  # the median of each size
    assert (net.latency_s, net.inter_latency) == pytest.approx((30e-6, 60e-6))
    assert "written to" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps({"world_size": 2}))
    argv[2] = str(tmp_path / "bad.json")
    assert calibrate_scaling.main(argv) == 2
    assert "bad.json: not an all-reduce result" in capsys.readouterr().err


def test_run_resume_measures_only_what_is_missing(tmp_path, capsys):
    """``run --resume`` over a measurements.json that holds every point runs nothing and reports it."""
    from fake_nodes import isolation

    if isolation()[0] is None:
        pytest.skip("simulated nodes need a mount and UTS namespace each")
    (tmp_path / "measurements.json").write_text(json.dumps(_measurements(_net(), 0.010, 0.012, 400_000)))
    argv = ["run", "--out", str(tmp_path), "--shards", str(tmp_path / "unused"), "--d-models", "32", "--resume"]
    assert calibrate_scaling.main(argv) == 0
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("allreduce-*.json"))
    assert scaling.load_calibration(tmp_path / "calibration.json").inter_latency == pytest.approx(300e-6)
    assert "3 repeat(s)" in capsys.readouterr().out
