"""A scripted curious ServerApp sends overflowing weights to two nodes whose data differ in one target row.

On the old node, weights that overflow the forward pass of rows near a chosen direction made the update NaN
exactly when such a row was in the Poisson batch, and the reply said so (``TRAIN`` instead of ``trained``):
membership, round after round, with no noise in the way. Here both nodes must answer every crafted adapter
with the same status and the same fields (and, for a refusal before the charge, the same values).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedtune.common.settings import RunSettings
from fedtune.sim.nodes import SimulatedNodes, prepare
from tests.adversarial.node import TARGET
from tests.curious import run_scripted_server

APP = Path(__file__).parent / "overflow_app"
RECEIPT = {"ledger-key", "ledger-head", "node-sig", "node"}
pytestmark = pytest.mark.slow  # a real simulation of two nodes (~1-2 min on 2 cores); make test-all


def _neighbouring_nodes(out: Path) -> None:
    """Client 1's data: client 0's, with its first row replaced by the target row."""
    mine = pd.read_parquet(out / "clients/client-0/data.parquet")
    theirs = mine.copy()
    theirs.loc[0, "text"] = TARGET
    theirs.to_parquet(out / "clients/client-1/data.parquet", index=False)


def test_overflowing_weights_say_nothing_about_the_target_row(tiny_model_dir, sentiment_csv, tmp_path) -> None:
    settings = RunSettings.from_config({"dataset": str(sentiment_csv), "partitioner": "iid", "epsilon": 8.0,
                                        "model-path": str(tiny_model_dir)})
    env = prepare(settings, SimulatedNodes(tmp_path / "out", 2))
    _neighbouring_nodes(tmp_path / "out")
    seen, log = run_scripted_server(APP, tmp_path, env, num_clients=2, run_config={"model": str(tiny_model_dir)})
    assert set(seen) == {"ordinary", "float32-overflow", "huge", "at-the-bound", "nan", "targeted-overflow"}, seen
    for name, (a, b) in seen.items():
        assert a["config"]["status"]["status"] == b["config"]["status"]["status"], name
        assert a["config"]["status"].get("code") == b["config"]["status"].get("code"), name
        assert {k: set(v) for k, v in a["config"].items()} == {k: set(v) for k, v in b["config"].items()}, name
        assert {k: set(v) for k, v in a["metrics"].items()} == {k: set(v) for k, v in b["metrics"].items()}, name
        assert a["arrays"] == b["arrays"], name
    for name in ("float32-overflow", "huge", "nan", "targeted-overflow"):  # refused before the charge: same values
        a, b = seen[name]
        assert a["config"]["status"]["code"] == "BAD_REQUEST", name
        assert {k: v for k, v in a["config"]["status"].items() if k not in RECEIPT} == \
            {k: v for k, v in b["config"]["status"].items() if k not in RECEIPT}
    assert all(reply["config"]["status"]["status"] == "trained" for reply in seen["at-the-bound"])
    assert TARGET not in log
