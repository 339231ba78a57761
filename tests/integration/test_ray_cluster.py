"""fedtune-sim on an existing multi-node Ray cluster: a head and a worker node started with `ray start`
on loopback (two raylets, as two machines would run them), the federation pointed at it with --ray-address."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.common.flower.processes import free_port, start_group, stop_group
from fedtune.sim.cli import main

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
CPUS_PER_NODE = 1  # each Ray node can host one client at a time: two actors need both nodes

PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
actors = ray._private.state.actors()  # the GCS actor table: dead actors keep their node
on = {a["Address"]["NodeID"] for a in actors.values() if a["ActorClassName"].endswith("ClientAppActor")}
print(json.dumps({"alive": alive, "actor-nodes": sorted(on)}))
"""


def _probe(address: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture()
def ray_cluster(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={CPUS_PER_NODE}", "--num-gpus=0"]
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    procs = [start_group([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                          f"--temp-dir={ray_tmp}", *common], env=env, log_file=tmp_path / "head.log")]
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "health-check", f"--address={address}"], env=env,
                             capture_output=True).returncode != 0:
            assert procs[0].poll() is None and time.monotonic() < deadline, \
                (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        procs.append(start_group([RAY, "start", f"--address={address}", *common], env=env,
                                 log_file=tmp_path / "worker.log"))
        while len(_probe(address)["alive"]) < 2:
            assert procs[1].poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the worker node did not join the Ray cluster"
            time.sleep(1)
        yield address
    finally:
        for proc in reversed(procs):
            stop_group(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_federation_runs_on_a_two_node_ray_cluster(ray_cluster, tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    code = main(["--clients", "4", "--rounds", "2", "--model", str(tiny_model_dir), "--dataset", str(sentiment_csv),
                 "--set", "partition-by=group", "--set", "max-seq-len=16", "--set", "batch-size=32",
                 "--epsilon", "4", "--cpus-per-client", str(CPUS_PER_NODE), "--ray-address", ray_cluster,
                 "--out", str(out)])
    assert code == 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [len(r["clients"]) for r in rounds[1:]] == [4, 4]  # every client, every round
    assert all(c["status"] == "trained" and 0 < c["epsilon"] <= 4.0 for r in rounds[1:] for c in r["clients"])
    # The clients ran as actors of the existing cluster, on both of its nodes (one CPU each); the cluster
    # outlives the run (Flower connected to it instead of starting its own Ray).
    probe = _probe(ray_cluster)
    assert len(probe["alive"]) == 2
    assert set(probe["actor-nodes"]) == set(probe["alive"])
