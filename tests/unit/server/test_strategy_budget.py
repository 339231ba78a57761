"""AdapterFedAvg and node budgets: refusing nodes leave the sample; too few left ends the run cleanly."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.common.adapter import arrays_to_record, record_to_arrays
from fedtune.server.strategy import AdapterFedAvg


@pytest.fixture(autouse=True)
def _task_identity() -> Iterable[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class BudgetGrid:
    """Nodes that train until the round given in ``refuse_from``, then refuse with a reason."""

    def __init__(self, refuse_from: dict[int, int]) -> None:
        self.refuse_from = refuse_from
        self.asked: dict[int, list[int]] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.refuse_from)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node, server_round = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])
            if not msg.metadata.message_type.startswith("train"):
                metrics = MetricRecord({"num-examples": 10, "eval-loss": 1.0, "eval-accuracy": 0.5})
                replies.append(Message(RecordDict({"metrics": metrics}), reply_to=msg))
                continue
            self.asked.setdefault(server_round, []).append(node)
            if server_round >= self.refuse_from[node]:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "refused": 1, "epsilon": 1.0}),
                                      "status": ConfigRecord({"reason": "budget: epsilon would reach 9 > 8"})})
            else:
                arrays = {k: v + 1.0 for k, v in record_to_arrays(msg.content["arrays"]).items()}
                content = RecordDict({"arrays": arrays_to_record(arrays),
                                      "metrics": MetricRecord({"num-examples": 10, "refused": 0, "epsilon": 0.5})})
            replies.append(Message(content, reply_to=msg))
        return replies


def _start(grid: BudgetGrid, rounds: int, min_nodes: int) -> tuple[AdapterFedAvg, list[int]]:
    strategy = AdapterFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_nodes,
                             min_evaluate_nodes=1, min_available_nodes=1)
    evaluated: list[int] = []

    def evaluate_fn(r: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated.append(r)
        return MetricRecord({"accuracy": 0.5})

    strategy.start(grid=grid, initial_arrays=arrays_to_record({"w": np.zeros(2, dtype=np.float32)}),
                   num_rounds=rounds, train_config=ConfigRecord({"epsilon": 8.0}), evaluate_fn=evaluate_fn)
    return strategy, evaluated


def test_refusing_node_is_excluded_and_the_others_finish() -> None:
    grid = BudgetGrid({1: 2, 2: 99, 3: 99})  # node 1 refuses from round 2 on
    strategy, evaluated = _start(grid, rounds=4, min_nodes=2)
    asked = {r: sorted(nodes) for r, nodes in grid.asked.items()}
    assert asked == {1: [1, 2, 3], 2: [1, 2, 3], 3: [2, 3], 4: [2, 3]}
    assert strategy.stop_reason is None and evaluated == [0, 1, 2, 3, 4]
    refused = [r for r in strategy.train_rows[2] if r["status"] == "refused"]
    assert refused == [refused[0]] and refused[0]["reason"] == "budget: epsilon would reach 9 > 8"
    assert "refused in round 2" in strategy.excluded[1]


def test_run_ends_cleanly_when_too_few_nodes_can_train() -> None:
    grid = BudgetGrid({1: 2, 2: 3, 3: 99})
    strategy, evaluated = _start(grid, rounds=5, min_nodes=2)
    assert sorted(grid.asked) == [1, 2, 3]  # rounds 4 and 5 send no work at all
    assert strategy.stop_reason is not None
    assert strategy.stop_reason.startswith("stopped before round 4: 1 of 3 clients can still train, the run needs 2")
    assert "node 1: refused in round 2" in strategy.stop_reason
    assert evaluated == [0, 1, 2, 3, 4, 5]  # the run still completes (no exception, no hang)
