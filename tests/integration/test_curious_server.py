"""A scripted curious coordinator against the real ClientApp, through Flower's real simulation engine.

The coordinator (tests/integration/curious_app/curious.py) asks the same round twice with the same
weights and run seed, then with another run key and class order, then with labels other than the ones
the node declared. It must not be able to cancel the noise, open a new budget, or read a row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fedtune.common.settings import RunSettings
from fedtune.common.wire.contract import TrainReply
from fedtune.sim.nodes import SimulatedNodes, prepare
from tests.curious import run_scripted_server

APP = Path(__file__).parent / "curious_app"
pytestmark = pytest.mark.slow  # a 5-round federation (~1-2 min on 2 cores); make test-all


def test_a_curious_server_learns_nothing_it_should_not(tiny_model_dir, sentiment_csv, tmp_path):
    settings = RunSettings.from_config({"dataset": str(sentiment_csv), "partition-by": "group", "epsilon": 8.0,
                                        "model-path": str(tiny_model_dir)})
    env = prepare(settings, SimulatedNodes(tmp_path / "out", 1))
    seen, log = run_scripted_server(APP, tmp_path, env, num_clients=1, run_config={"model": str(tiny_model_dir)})
    first, second, reordered, bad = seen["replies"]

    # 1. Node-secret noise: the difference of two answers to the identical request is noise-sized, not zero.
    assert seen["diff"] > 0.1 * seen["step"] > 0

    # 2. Only the contract's fields left the node, in every reply.
    allowed_status, allowed_metrics = set(TrainReply.STATUS_KEYS), set(TrainReply.METRIC_KEYS)
    for reply in (first, second, reordered):
        assert set(reply["config"]) == {"status"} and set(reply["metrics"]) == {"metrics"}
        assert set(reply["config"]["status"]) == allowed_status
        assert set(reply["metrics"]["metrics"]) <= allowed_status | allowed_metrics | {"train-loss"}
        assert reply["arrays"] == ["arrays"]

    # 3. A new run key and another class order spend the same budget: epsilon keeps growing.
    eps = [r["metrics"]["metrics"]["epsilon"] for r in (first, second, reordered)]
    assert eps[0] < eps[1] < eps[2] <= 8.0
    ledger = [json.loads(x) for x in (tmp_path / "out" / "clients" / "client-0" / "ledger.jsonl").read_text()
              .splitlines()]
    rounds = [e for e in ledger if e.get("kind") == "round"]
    assert [e["decision"] for e in rounds] == ["charged"] * 3 + ["refused"]  # bad labels: refused, no charge
    assert {e["dataset"] for e in rounds} == {"sentiment/client-0"} and {e["rng"] for e in rounds} == {"secrets"}

    # 4. Labels that are not the node's declared ones: refused before any row is read; no row, no column name,
    # no path, and no examples count in the reply.
    status = bad["config"]["status"]
    assert status["status"] == "refused" and status["code"] == "POLICY_LABELS" and not bad["arrays"]
    assert bad["metrics"]["metrics"]["num-examples"] == 0 and rounds[-1]["fingerprint"] == ""
    text = json.dumps(bad | {"config": {"status": {k: v for k, v in status.items() if k != "node-sig"}}})  # base64
    rows = pd.read_csv(sentiment_csv)["text"]
    assert not any(row in text for row in rows) and "/" not in text.replace("see node log", "")
    assert not any(row in log for row in rows)  # nor in anything the run's log (server side) shows
