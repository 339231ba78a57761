"""AdapterFedAvg weighs each trained node within a bound (``weighting``, ``max-node-examples``) and records the
weight in the node's row of metrics.jsonl."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord

from fedtune.common.settings import RunSettings
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.server.strategy import AdapterFedAvg
from tests.unit.server.fakes import REQUEST_TEMPLATE, RUN_ID, evaluated, shifted, trained

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class ClaimsGrid:
    """Round 1 only: node i answers with the global adapter + shift[i] and claims examples[i]."""

    def __init__(self, shift: dict[int, float], examples: dict[int, int]) -> None:
        self.shift, self.examples = shift, examples

    def get_node_ids(self) -> list[int]:
        return sorted(self.shift)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            out.append(trained(m, shifted(m, self.shift[node]), examples=self.examples[node])
                       if m.metadata.message_type.startswith("train") else evaluated(m))
        return out


def _round(grid: ClaimsGrid, **weights) -> tuple[AdapterFedAvg, float]:
    strategy = AdapterFedAvg(REQUEST_TEMPLATE, run_id=RUN_ID, fraction_train=1.0, fraction_evaluate=0.0,
                             min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, **weights)
    seen: list[float] = []

    def evaluate_fn(r: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append(float(record_to_arrays(arrays)["w"][0]))
        return MetricRecord({"accuracy": 0.5})

    strategy.start(grid=grid, initial_arrays=arrays_to_record({"w": np.zeros(2, dtype=np.float32)}), num_rounds=1,
                   evaluate_fn=evaluate_fn)
    return strategy, seen[-1]


def _weights(strategy: AdapterFedAvg) -> dict[int, float]:
    return {o.node_id: o.weight for o in strategy.outcomes[1]}


HONEST_SHIFT, HONEST_EXAMPLES = {1: 1.0, 2: 2.0, 3: 3.0}, {1: 100, 2: 120, 3: 80}


def test_honest_nodes_of_similar_size_are_weighted_by_their_examples_as_before():
    strategy, value = _round(ClaimsGrid(HONEST_SHIFT, HONEST_EXAMPLES))
    assert _weights(strategy) == {1: 100.0, 2: 120.0, 3: 80.0}
    assert value == pytest.approx((100 * 1 + 120 * 2 + 80 * 3) / 300, rel=1e-6)


def test_a_node_claiming_a_billion_examples_weighs_the_cap():
    grid = ClaimsGrid({**HONEST_SHIFT, 4: 3.0}, {**HONEST_EXAMPLES, 4: 10**9})
    strategy, value = _round(grid)
    assert _weights(strategy) == {1: 100.0, 2: 120.0, 3: 80.0, 4: 440.0}  # 4 x median(80, 100, 120, 1e9)
    assert 1.0 <= value < 2.6  # within the honest nodes' range, not the claimant's 3.0 (unbounded: 3.0)
    strategy, _ = _round(grid, max_node_examples=150)
    assert _weights(strategy)[4] == 150.0
    strategy, value = _round(grid, weighting="equal")
    assert set(_weights(strategy).values()) == {1.0} and value == pytest.approx(9.0 / 4, rel=1e-6)


def test_the_run_settings_reach_the_strategy():
    settings = RunSettings.from_config({"weighting": "equal", "max-node-examples": 500})
    strategy = AdapterFedAvg.from_settings(settings, REQUEST_TEMPLATE, RUN_ID)
    assert (strategy.weighting, strategy.max_node_examples) == ("equal", 500)
    with pytest.raises(ValueError, match="weighting='median'"):
        AdapterFedAvg(REQUEST_TEMPLATE, run_id=RUN_ID, weighting="median")
