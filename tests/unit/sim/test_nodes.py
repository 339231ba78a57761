"""fedtune-sim sets up simulated nodes like deployed ones: own data file, own policy, own state directory."""

from __future__ import annotations

import json

import pandas as pd

from fedtune.client.node_config import node_config
from fedtune.client.policy import load_policy
from fedtune.common.runtime import SIM_NODES
from fedtune.common.settings import RunSettings
from fedtune.common.tasks.classify.data import load_labelled
from fedtune.server.app import held_out
from fedtune.sim.nodes import SimulatedNodes, prepare


def test_held_out_rows_never_reach_a_node_and_nodes_get_their_own_config(tmp_path, monkeypatch):
    frame = pd.DataFrame({"text": [f"review number {i}" for i in range(300)],
                          "label": ["pos" if i % 2 else "neg" for i in range(300)],
                          "group": [f"g{i % 9}" for i in range(300)]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    settings = RunSettings.from_config({"dataset": str(tmp_path / "d.csv"), "partition-by": "group",
                                        "max-train-examples": 200, "epsilon": 3.0})
    env = prepare(settings, SimulatedNodes(tmp_path / "out", 3))
    test_texts = set(held_out(settings).dataset["text"])
    assert len(test_texts) == 45
    seen: set[str] = set()
    for pid in range(3):
        part = pd.read_parquet(tmp_path / "out" / "clients" / f"client-{pid}" / "data.parquet")
        assert not set(part["text"]) & test_texts and not set(part["text"]) & seen
        seen |= set(part["text"])
        assert set(part["label"]) <= {"neg", "pos"}  # labels travel by name, mapped by the node
    assert len(seen) == 200
    assert set(seen) | test_texts <= set(load_labelled(settings.data).dataset["text"])

    monkeypatch.setenv(SIM_NODES.name, env[SIM_NODES.name])
    config = node_config({"partition-id": 1, "num-partitions": 3})
    assert config.simulated and config.node == "simulation:client-1" and config.insecure_seed is None
    policy = load_policy(config.policy)
    assert policy.dataset_id == "d/client-1" and policy.max_epsilon == 3.0
    nodes = json.loads((tmp_path / "out" / "flower" / "nodes.json").read_text())
    assert set(nodes) == {"0", "1", "2"}
