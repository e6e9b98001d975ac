"""Searches on real Ray clusters made on this machine with ``ray start`` (see raycluster.py):
fractional logical GPUs, and two raylets (two nodes)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

import fakes  # noqa: E402
from raycluster import LocalCluster  # noqa: E402

from granq_search.search.runner import run_search  # noqa: E402


def space_file(tmp_path, fidelity, parameters, initial_points=()) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({
        "base": "digits", "fidelity": fidelity,
        "objectives": [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}],
        "parameters": parameters, "initial_points": list(initial_points),
        "scheduler": {"type": "none"}, "sampler": {"type": "random", "seed": 1}}))
    return p


def last_results(out) -> list[dict]:
    rows = []
    for d in Path(out.ray_path).glob("*_*"):
        if (d / "result.json").is_file():
            lines = (d / "result.json").read_text().splitlines()
            rows.append(json.loads(lines[-1]))
    return rows


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(fakes)
    markers = tmp_path / "markers"
    markers.mkdir()
    # `ray start` clusters use token auth (Ray >= 2.59); a driver connecting to an explicit address
    # needs RAY_AUTH_MODE=token in its environment before Ray reads its config. This process imported
    # Ray long ago, so the cached config is refreshed the way Ray itself does (test-only).
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    from ray._raylet import Config

    Config.initialize("")
    c = LocalCluster(tmp_path, env={fakes.MARKERS: str(markers)})
    c.markers = markers
    try:
        yield c
    finally:
        c.stop()


def test_fractional_gpus_pack_four_trials_on_two_logical_gpus(tmp_path, cluster):
    address = cluster.start([{"num_cpus": 4, "num_gpus": 2}])
    space = space_file(tmp_path, {"train.epochs": 4, "train.warmup_epochs": 1, "train.iters_per_epoch": 100},
                       {"quant.act.threshold": {"type": "float", "low": 0.0, "high": 1.0}})
    out = run_search(space, name="packed", output_dir=tmp_path / "runs", num_samples=4, max_concurrent=4,
                     gpus_per_trial=0.5, address=address, progress=False, tracking=False,
                     trainable=fakes.synthetic_trial)
    assert out.status == "finished" and out.counts["complete"] == 4
    marks = fakes.read_markers(cluster.markers)
    assert len(marks) == 4
    assert Counter(m["cvd"] for m in marks) == {"0": 2, "1": 2}  # two trials per logical GPU
    assert max(m["t0"] for m in marks) < min(m["t1"] for m in marks)  # all four ran at once

    # the real trainable sees CUDA_VISIBLE_DEVICES but torch finds no CUDA here: it runs on the CPU
    space = space_file(tmp_path, {"train.epochs": 2, "train.warmup_epochs": 1, "train.iters_per_epoch": 2},
                       {"quant.act.bits": {"type": "categorical", "choices": [4]}})
    out = run_search(space, name="real-on-gpu-slot", output_dir=tmp_path / "runs", num_samples=1,
                     gpus_per_trial=0.5, address=address, progress=False, tracking=False)
    assert out.counts["complete"] == 1
    (result,) = last_results(out)
    assert result["final"] == 1.0 and result["device"] == "cpu"


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path, cluster, capfd):
    address = cluster.start([{"num_cpus": 1}, {"num_cpus": 1}])  # one trial fits on each node
    space = space_file(tmp_path, {"train.epochs": 2, "train.warmup_epochs": 1, "train.iters_per_epoch": 2},
                       {"quant.act.bits": {"type": "categorical", "choices": [3, 4]}},
                       initial_points=[{"quant.act.bits": 3}, {"quant.act.bits": 4}])
    out = run_search(space, name="two-nodes", output_dir=tmp_path / "runs", num_samples=2, max_concurrent=2,
                     address=address, progress=False)
    assert out.status == "finished" and out.counts["complete"] == 2
    nodes = {r["node_id"] for r in last_results(out)}
    assert len(nodes) == 2  # the real trainable reports the node it ran on
    assert out.best_config and Path(out.best_config).is_file()
    # the address passed the pre-Ray probe (a real GCS with token auth); this minimal Ray install
    # runs no dashboard on the cluster, and the driver says so
    assert out.dashboard_url is None
    assert "Ray dashboard: the cluster reports none" in capfd.readouterr().err
